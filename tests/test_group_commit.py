"""One process's concurrent updates of a session are written together, and each is answered as if it came alone.

The updates here queue in a known order: the test holds the session file's
lock, as another process's writer would, and starts each update only once the
one before it is waiting.  The first waits for the lock; the rest queue behind
it, and join its write once it has the lock.  Each file slot carries a
sequence number that grows by one a write, which counts the writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.store import INT64_MAX, INT64_MIN, Record, StorageError
from tally.store.files import MAX_PAYLOAD, FileStore, RecordFileCache
from tally.store.group import LEAD_LIMIT, GroupCommit, Update

KEY = "session:group"
T = TypeVar("T")
Outcome = int | None | str


def outcome(future: Future[Any]) -> Outcome:
    """The counter an update left, None if it wrote nothing, or the name of what it raised."""
    try:
        result = future.result(timeout=10)
    except Exception as exc:
        return type(exc).__name__
    return result if result is None or isinstance(result, int) else result.get("counter")


def seq(store: FileStore) -> int:
    """The sequence number of the session's newest slot: how many writes it has had."""
    slot = RecordFileCache.read_slot(store.cache.path_for(KEY))
    return slot.seq if slot else 0


@contextmanager
def lock_held(store: FileStore) -> Iterator[None]:
    """Hold the session file's lock, as a writer in another process would."""
    path = store.cache.path_for(KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def in_thread(call: Callable[..., T], *args: Any) -> Future[T]:
    """Run ``call`` in a daemon thread: one that a fault leaves waiting for good cannot hang the test run."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(call(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def queued(store: FileStore, calls: list[Callable[[], Any]]) -> list[Outcome]:
    """Run ``calls`` at once, each in its own thread, queued in their order behind a held lock."""
    waiting = threading.Semaphore(0)
    store.on_contention = waiting.release
    with lock_held(store):
        futures = []
        for call in calls:
            futures.append(in_thread(call))
            assert waiting.acquire(timeout=5), "each update waits: the first for the lock, the rest for its write"
    return [outcome(f) for f in futures]


def add(store: FileStore, by: int = 1, create: bool = False) -> Callable[[], int | None]:
    return lambda: store.add(KEY, "counter", by, 60, create)


def test_updates_queued_behind_a_write_are_made_in_one_and_each_sees_its_own_value(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    assert store.add(KEY, "counter", 1, 60) == 1
    before = seq(store)
    assert queued(store, [add(store) for _ in range(6)]) == [2, 3, 4, 5, 6, 7]
    assert store.load(KEY) == {"counter": 7}
    assert seq(store) == before + 1, "the five that queued while the first waited for the lock went in its write"


def test_a_batch_whose_write_fails_answers_every_update_in_it_with_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(str(tmp_path))
    assert store.add(KEY, "counter", 1, 60) == 1
    write, writes = os.pwrite, []

    def cut_short(fd: int, data: bytes, offset: int) -> int:
        writes.append(data)
        return write(fd, data[: len(data) // 2], offset)

    monkeypatch.setattr(os, "pwrite", cut_short)
    assert queued(store, [add(store) for _ in range(4)]) == ["StorageError"] * 4
    monkeypatch.undo()
    assert len(writes) == 1, "the four updates were one write"
    assert store.load(KEY) == {"counter": 1}, "the cut write left the value before it"


def test_the_error_of_a_failed_batch_names_the_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(str(tmp_path))
    store.add(KEY, "counter", 1, 60)
    errors: list[StorageError] = []
    write = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: write(fd, data[:1], offset))

    def recorded() -> None:
        try:
            store.add(KEY, "counter", 1, 60, False)
        except StorageError as exc:
            errors.append(exc)

    queued(store, [recorded for _ in range(3)])
    assert [(e.kind, e.status) for e in errors] == [("disk_full", 507)] * 3


def test_updates_that_may_not_create_a_session_leave_it_absent_until_one_that_may(tmp_path: Path) -> None:
    # A client's cookie never brings a session into being; the app's own new session does.
    store = FileStore(str(tmp_path))
    calls = [add(store), add(store), add(store, 5, create=True), add(store)]
    assert queued(store, calls) == [None, None, 5, 6]
    assert store.load(KEY) == {"counter": 6}


# -- Any batch answers as the same updates one at a time would ---------------

ADD = st.tuples(st.just("add"), st.sampled_from([1, -1, 7, INT64_MAX, INT64_MIN]), st.booleans())
#: Sets a text field of the given length: past MAX_PAYLOAD the record does not fit, and the update fails.
NOTE = st.tuples(st.just("note"), st.integers(0, MAX_PAYLOAD), st.booleans())


def call(store: FileStore, op: tuple[str, int, bool]) -> Callable[[], Any]:
    kind, n, create = op
    if kind == "add":
        return add(store, n, create)
    return lambda: store.update(KEY, lambda record: record | {"note": "x" * n}, 60, create)


@settings(max_examples=60, deadline=None)
@given(start=st.one_of(st.none(), st.integers(-3, 3)), ops=st.lists(st.one_of(ADD, NOTE), min_size=2, max_size=6))
def test_a_batch_answers_and_stores_what_the_same_updates_one_at_a_time_would(
    start: int | None, ops: list[tuple[str, int, bool]]
) -> None:
    with tempfile.TemporaryDirectory() as alone_dir, tempfile.TemporaryDirectory() as batch_dir:
        alone, batched = FileStore(alone_dir), FileStore(batch_dir)
        for store in (alone, batched):
            if start is not None:
                store.add(KEY, "counter", start, 60)
        one_at_a_time = []
        for op in ops:
            with ThreadPoolExecutor(1) as pool:
                one_at_a_time.append(outcome(pool.submit(call(alone, op))))
        assert queued(batched, [call(batched, op) for op in ops]) == one_at_a_time
        assert batched.load(KEY) == alone.load(KEY)


def chain(
    updates: int, fail_at: int | None = None, give_up: Callable[[BaseException], BaseException | None] | None = None
) -> tuple[list[Outcome], list[int], list[int]]:
    """Run ``updates`` updates through a GroupCommit, each arriving while the write before it is made.

    Returns each update's outcome, the thread of each update's caller, and the
    thread that made each write.  The write of update ``fail_at`` raises, and
    ``give_up`` is the group's.
    """
    group: GroupCommit[Update] = GroupCommit() if give_up is None else GroupCommit(give_up=give_up)
    arrived = threading.Semaphore(0)
    group.on_wait = arrived.release
    callers = [0] * updates
    writers: list[int] = []
    futures: dict[int, Future[Record | None]] = {}  # by number: a thread may start the next before this one is filed

    def call(n: int) -> Record | None:
        callers[n] = threading.get_ident()
        return group.run(KEY, Update(lambda record: {"counter": n}, 60, True), commit).result()

    def start(n: int) -> None:
        futures[n] = in_thread(call, n)

    def commit(batch: list[Update]) -> None:
        (update,) = batch  # one arrives per write: each batch holds one
        n = len(writers)
        writers.append(threading.get_ident())
        if n + 1 < updates:
            start(n + 1)
            assert arrived.acquire(timeout=5), "the next update queued behind this write"
        if n == fail_at:
            raise OSError(errno.EIO, "write failed")
        update.record = update.change({})

    start(0)
    # Update n's write started update n + 1 before n was answered, so each is filed by the time it is read.
    return [outcome(futures[n]) for n in range(updates)], callers, writers


def test_a_leader_makes_what_queues_behind_it_then_hands_on_after_lead_limit_batches() -> None:
    outcomes, callers, writers = chain(LEAD_LIMIT + 3)
    assert outcomes == list(range(LEAD_LIMIT + 3)), "each caller gets its own update's record"
    # The first caller makes LEAD_LIMIT writes in a row, its own and those
    # queued behind each; then the first of the queue leads from there.
    assert writers == [callers[0]] * LEAD_LIMIT + [callers[LEAD_LIMIT]] * 3


def test_a_failed_write_of_a_batch_the_leader_went_on_to_answers_that_batch_and_hands_on() -> None:
    outcomes, callers, writers = chain(5, fail_at=2)
    assert outcomes == [0, 1, "OSError", 3, 4], "the leader's own update stood; only the failed batch failed"
    assert writers == [callers[0]] * 3 + [callers[3]] * 2, "after the failure the next in the queue leads"


def test_a_failed_write_can_fail_what_queued_behind_it_unmade() -> None:
    outcomes, callers, writers = chain(3, fail_at=1, give_up=lambda exc: TimeoutError(f"after {exc}"))
    assert outcomes == [0, "OSError", "TimeoutError"], "the queued update failed with give_up's error"
    assert writers == [callers[0]] * 2, "and was never written"


def test_a_writer_that_finds_the_lock_busy_tries_again_before_it_sleeps_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(str(tmp_path))
    store.add(KEY, "counter", 1, 60)
    waits: list[None] = []
    store.on_contention = lambda: waits.append(None)
    lock, busy, calls = fcntl.flock, [0], []

    def flock(fd: int, operation: int) -> None:
        calls.append(operation)
        if operation == fcntl.LOCK_EX | fcntl.LOCK_NB and busy[0]:
            busy[0] -= 1
            raise BlockingIOError(errno.EWOULDBLOCK, "busy")
        lock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    busy[0] = 1  # freed by the first try again: taken without a blocking flock
    assert store.add(KEY, "counter", 1, 60) == 2
    assert fcntl.LOCK_EX not in calls and len(waits) == 1
    calls.clear()
    busy[0] = 10**9  # busy past the spin: the writer sleeps on the lock, once
    assert in_thread(store.add, KEY, "counter", 1, 60).result(timeout=5) == 3
    assert calls.count(fcntl.LOCK_EX) == 1 and len(waits) == 2


@pytest.mark.parametrize("gevent", [True, False], ids=["gevent", "threads"])
def test_under_gevent_a_queued_update_never_waits_awake(gevent: bool) -> None:
    """A queued update that waited awake under gevent would hold up the very greenlet that it waits for."""
    script = f"""
if {gevent}:
    from gevent import monkey
    monkey.patch_all()
import threading, time
from tally.store import group
spins = []
spin = group.spin
def counted(ready, seconds):
    spins.append(seconds)
    return spin(ready, seconds)
group.spin = counted
commits = group.GroupCommit()
def commit(batch):
    time.sleep(0.05)  # under gevent, back to the hub: the other updates come and queue
    for update in batch:
        update.record = {{"counter": 1}}
updates = [group.Update(lambda record: record, 60, True) for _ in range(3)]
threads = [threading.Thread(target=commits.run, args=("k", update, commit)) for update in updates]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(10)
assert [update.result() for update in updates] == [{{"counter": 1}}] * 3
print(len(spins))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    queued_and_waited_awake = int(run.stdout)
    assert queued_and_waited_awake == 0 if gevent else queued_and_waited_awake >= 1
