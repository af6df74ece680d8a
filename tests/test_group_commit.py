"""One process's concurrent updates of a session are written together, and each is answered as if it came alone.

The updates here queue in a known order: the test holds the session file's
lock, as another process's writer would, and starts each update only once the
one before it is waiting.  The first waits for the lock; the rest queue behind
it and are made in one write once it is done.  Each file slot carries a
sequence number that grows by one a write, which counts the writes.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.store import INT64_MAX, INT64_MIN, StorageError
from tally.store.files import MAX_PAYLOAD, FileStore, RecordFileCache

KEY = "session:group"
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


def queued(store: FileStore, calls: list[Callable[[], Any]]) -> list[Outcome]:
    """Run ``calls`` at once, each in its own thread, queued in their order behind a held lock."""
    waiting = threading.Semaphore(0)
    store.on_contention = waiting.release
    with ThreadPoolExecutor(len(calls)) as pool:
        with lock_held(store):
            futures = []
            for call in calls:
                futures.append(pool.submit(call))
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
    assert seq(store) == before + 2, "the first update's write, then one for the five queued behind it"


def test_a_batch_whose_write_fails_answers_every_update_in_it_with_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(str(tmp_path))
    assert store.add(KEY, "counter", 1, 60) == 1
    write, writes = os.pwrite, []

    def first_whole_then_cut_short(fd: int, data: bytes, offset: int) -> int:
        writes.append(data)
        return write(fd, data if len(writes) == 1 else data[: len(data) // 2], offset)

    monkeypatch.setattr(os, "pwrite", first_whole_then_cut_short)
    assert queued(store, [add(store) for _ in range(4)]) == [2] + ["StorageError"] * 3
    monkeypatch.undo()
    assert len(writes) == 2, "the three queued updates were one write"
    assert store.load(KEY) == {"counter": 2}, "the cut write left the value before it"


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
