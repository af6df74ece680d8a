"""The file store's promises: torn writes, corrupt files, expiry, a safe prune."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import session_files_in
from tally import create_app
from tally.store import files
from tally.store.files import SLOT_SIZE


def only_session_file(app: Flask) -> Path:
    [path] = session_files_in(app.config["SESSION_DIR"])
    return path


def test_a_torn_write_leaves_the_last_acknowledged_value(app: Flask, client: FlaskClient) -> None:
    client.get("/inc")
    client.get("/inc")  # sequence 2, in slot 0; sequence 1 stays in slot 1
    path = only_session_file(app)
    with path.open("r+b") as f:
        # The next write goes to slot 1: tear it halfway, as a kill -9 could.
        f.seek(SLOT_SIZE)
        f.write(b"TLY1" + b"\xff" * 20)
    assert client.get("/counter").text == "counter is 2"
    assert client.get("/inc").text == "counter is 3"


def test_a_write_cut_off_halfway_leaves_the_previous_value(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.get("/inc")
    client.get("/inc")
    write = os.pwrite

    def dies_halfway(fd: int, data: bytes, offset: int) -> int:
        write(fd, data[: len(data) // 2], offset)
        raise SystemExit("killed mid-write")  # not an Exception: nothing handles it, as with kill -9

    monkeypatch.setattr(os, "pwrite", dies_halfway)
    with pytest.raises(SystemExit):
        client.get("/inc")
    monkeypatch.undo()
    assert client.get("/counter").text == "counter is 2"
    assert client.get("/inc").text == "counter is 3"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-json", "long"])
def test_a_corrupt_file_is_quarantined_and_the_client_starts_afresh(
    app: Flask, client: FlaskClient, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    client.get("/inc?by=5")
    path = only_session_file(app)
    raw = path.read_bytes()
    bad = {
        "garbage": b"\x80\x04\x95 not a session at all",
        "truncated": raw[:30],
        "empty-json": b"{}",
        # Longer than both slots, and than any one read: all of it is kept.
        "long": bytes(range(256)) * 400,
    }[damage]
    path.write_bytes(bad)
    with caplog.at_level(logging.WARNING):
        assert client.get("/counter").text == "counter is 0"
    assert not path.exists(), "moved away, not copied: the original is gone"
    quarantined = list((path.parent / "quarantine").iterdir())
    assert [q.read_bytes() for q in quarantined] == [bad], "the quarantined bytes are the original's"
    assert path.name[:16] in caplog.text
    assert client.get_cookie("session").value not in caplog.text  # type: ignore[union-attr]
    assert client.get("/inc").text == "counter is 1"


def test_a_session_expires_on_the_server(tmp_path: Path) -> None:
    app = create_app(
        {"PERMANENT_SESSION_LIFETIME": 1, "SESSION_DIR": str(tmp_path), "SECRET_KEY": "k"}, instance_path=str(tmp_path)
    )
    client = app.test_client()
    client.get("/inc?by=9")
    cookie = client.get_cookie("session").value  # type: ignore[union-attr]
    time.sleep(1.1)
    client.set_cookie("session", cookie)  # the client still presents it
    assert client.get("/counter").text == "counter is 0"
    assert client.get("/inc").text == "counter is 1"
    assert client.get_cookie("session").value != cookie, "an expired id is never reused"  # type: ignore[union-attr]


def test_an_expired_record_is_never_written_on(tmp_path: Path) -> None:
    # Requests never meet this (an expired id is replaced before a write), so the store's
    # contract is checked on the store: an expired record is absent, not a starting point.
    store = files.FileStore(str(tmp_path / "s"))
    store.add("session:k", "counter", 9, 1)
    time.sleep(1.1)
    assert store.load("session:k") is None
    assert store.add("session:k", "counter", 1, 60, create=False) is None, "only if it exists"
    assert store.add("session:k", "counter", 1, 60) == 1, "from nothing, not from 9"


def test_every_write_extends_a_sessions_life(tmp_path: Path) -> None:
    app = create_app(
        {"PERMANENT_SESSION_LIFETIME": 2, "SESSION_DIR": str(tmp_path), "SECRET_KEY": "k"}, instance_path=str(tmp_path)
    )
    client = app.test_client()
    assert client.get("/inc").text == "counter is 1"
    cookie = client.get_cookie("session").value  # type: ignore[union-attr]
    for n in (2, 3, 4):
        time.sleep(1.2)  # 3.6 s in all: past the first write's lifetime, within each write's
        assert client.get("/inc").text == f"counter is {n}"
    assert client.get_cookie("session").value == cookie  # type: ignore[union-attr]


def test_no_live_session_is_evicted_however_many_there_are(tmp_path: Path) -> None:
    # cachelib evicts above its threshold (500 by default); an eviction may
    # also start higher up.  Through the store itself: 20,000 in a few seconds.
    store = files.FileStore(str(tmp_path / "s"))
    keys = [f"session:{n:043d}" for n in range(20_000)]
    for n, key in enumerate(keys):
        assert store.add(key, "counter", n, 3600) == n
    assert store.count() == 20_000
    assert all(store.load(key) == {"counter": n} for n, key in enumerate(keys))


#: Audit events that list a folder, or remove, rename or open a file.
_WATCHED = {"open", "os.listdir", "os.scandir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate"}
_seen: list[tuple[str, str]] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _seen is not None and event in _WATCHED and args and isinstance(args[0], str | bytes | os.PathLike):
        _seen.append((event, os.path.abspath(os.fsdecode(args[0]))))


@contextlib.contextmanager
def file_events() -> Iterator[list[tuple[str, str]]]:
    """Record every file a block opens, lists, removes or renames, through Python's audit hooks."""
    global _seen, _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # a hook cannot be removed: it stays, idle, for the session
        _hooked = True
    events: list[tuple[str, str]] = []
    _seen = events
    try:
        yield events
    finally:
        _seen = None


def test_a_write_touches_its_own_sessions_file_and_nothing_else(tmp_path: Path) -> None:
    # No eviction at any size: an eviction, at whatever size it starts, must list
    # the sessions or keep their count somewhere, and remove some.  Each write of
    # a new or a stored session opens that session's file alone, lists no folder
    # and removes nothing, so none can start at 20,001 sessions or a billion.
    folder = tmp_path / "s"
    store = files.FileStore(str(folder))
    keys = [f"session:{n:043d}" for n in range(3)]
    store.add(keys[0], "counter", 1, 3600)
    writes: list[Callable[[], object]] = [
        lambda: store.add(keys[0], "counter", 1, 3600),
        lambda: store.add(keys[1], "counter", 1, 3600),
        lambda: store.update(keys[0], lambda r: r | {"name": "a"}, 3600),
        lambda: store.update(keys[2], lambda r: r | {"name": "b"}, 3600),
        lambda: store.update(keys[0], lambda r: r, 3600, create=False),
    ]
    for write, key in zip(writes, [keys[0], keys[1], keys[0], keys[2], keys[0]], strict=True):
        with file_events() as events:
            write()
        assert events and set(events) == {("open", store.cache.path_for(key))}, events


def test_a_served_write_touches_its_own_sessions_file_and_nothing_else(app: Flask, client: FlaskClient) -> None:
    # The same through the app: a new client's session also counts against its
    # address's quota, in a file of its own under quotas/.
    quotas = os.path.join(app.config["SESSION_DIR"], "quotas")
    with file_events() as events:
        assert client.get("/inc").text == "counter is 1"
    own = str(only_session_file(app))
    assert {event for event, _ in events} == {"open"}, events
    assert {path for _, path in events if os.path.dirname(path) != quotas} == {own}, events
    for method, path in (("GET", "/inc"), ("POST", "/inc?by=5"), ("POST", "/reset"), ("GET", "/counter")):
        with file_events() as events:
            assert client.open(path, method=method).status_code == 200
        assert set(events) == {("open", own)}, (path, events)


def test_prune_removes_expired_sessions_keeps_live_ones_and_says_what_it_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(
        {"PERMANENT_SESSION_LIFETIME": 60, "SESSION_DIR": str(tmp_path / "s"), "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    an_hour_ago = time.time() - 3600
    with monkeypatch.context() as past:
        past.setattr(time, "time", lambda: an_hour_ago)
        for _ in range(5):
            app.test_client().get("/inc")  # written an hour ago, to live a minute
    live = app.test_client()
    live.get("/inc?by=3")
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert result.exit_code == 0
    assert "removed 5 expired sessions, kept 1, freed 20.0 KiB (20480 bytes)" in result.output
    assert live.get("/counter").text == "counter is 3"
    stats = app.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "sessions: 1\n" in stats and "bytes: 4096" in stats and "oldest: written 0s ago" in stats


def test_prune_while_serving_never_removes_a_live_session(tmp_path: Path) -> None:
    app = create_app(
        {"PERMANENT_SESSION_LIFETIME": 1, "SESSION_DIR": str(tmp_path / "s"), "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    clients = [app.test_client() for _ in range(1500)]
    for c in clients:
        c.get("/inc")
    time.sleep(1.1)  # all expired now
    writers = clients[::50]
    counts = dict.fromkeys(range(len(writers)), 0)
    done = threading.Event()

    def write() -> None:
        while not done.is_set():
            for n, c in enumerate(writers):
                assert c.get("/inc").status_code == 200
                counts[n] += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(3):
            assert app.test_cli_runner().invoke(args=["sessions", "prune"]).exit_code == 0
    finally:
        done.set()
        thread.join()
    # Expired sessions read as new, so each writer counts from its first increment after expiry.
    for n, c in enumerate(writers):
        assert c.get("/counter").text == f"counter is {counts[n]}"


def test_prune_reports_progress_on_long_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "PROGRESS_EVERY", 10)
    app = create_app({"SESSION_DIR": str(tmp_path / "s"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    for _ in range(25):
        app.test_client().get("/inc")
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert "25 files checked, 0 removed" in result.output
    assert "removed 0 expired sessions, kept 25" in result.output


@pytest.mark.parametrize(("setting", "fsyncs"), [("true", 1), ("false", 0)])
def test_the_fsync_setting_fsyncs_each_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, fsyncs: int
) -> None:
    monkeypatch.setenv("TALLY_SESSION_FSYNC", setting)
    app = create_app({"SESSION_DIR": str(tmp_path / "s"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    client = app.test_client()
    client.get("/inc")
    synced: list[tuple[int, bytes]] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        # Which file is synced, and what it holds then.
        synced.append((os.fstat(fd).st_ino, os.pread(fd, 2 * SLOT_SIZE, 0)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    for _ in range(5):
        client.get("/inc")
    client.get("/global/inc")
    assert len(synced) == 6 * fsyncs, "one fsync per write"
    assert client.get("/counter").text == "counter is 6"
    if fsyncs:
        files_written = [only_session_file(app)] * 5 + [Path(app.config["SESSION_DIR"]) / "global"]
        assert [inode for inode, _ in synced] == [path.stat().st_ino for path in files_written], "of the file written"
        for n, (_, held) in enumerate(synced[:5], start=2):
            assert b'"counter":%d' % n in held, "after the write, not before it"
        assert b'"value":1' in synced[5][1]


def _six_expired_sessions(tmp_path: Path) -> tuple[files.FileStore, list[str]]:
    """A file store holding six sessions, each written once, an hour ago, with a 1 s lifetime."""
    store = files.FileStore(str(tmp_path / "s"))
    keys = [f"session:{n:043d}" for n in range(6)]
    an_hour_ago = time.time() - 3600
    with pytest.MonkeyPatch.context() as past:  # rather than sleep past the lifetime
        past.setattr(time, "time", lambda: an_hour_ago)
        for key in keys:
            store.add(key, "counter", 1, 1)
    return store, keys


def test_prune_keeps_a_session_written_between_its_read_and_its_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race, made to happen: prune reads a file as expired, and before it
    # takes the file's lock a request that had read the session as live just
    # before its expiry writes it.  Judged again under the lock, it is kept.
    store, keys = _six_expired_sessions(tmp_path)
    written = keys[::2]
    real_prune_file = store.cache.prune_file

    def write_first(path: str) -> int | None:
        for key in written:
            if store.cache.path_for(key) == path:
                store.cache.update_path(path, lambda record: {"counter": 7}, 60)
        return real_prune_file(path)

    monkeypatch.setattr(store.cache, "prune_file", write_first)
    report = store.prune(lifetime=1)
    assert (report.removed, report.kept) == (3, 3)
    assert [store.load(key) for key in keys] == [{"counter": 7}, None] * 3


def test_prune_counts_a_file_gone_before_its_judgement_neither_removed_nor_kept_and_a_busy_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another prune (from cron, beside one run by hand) or a quarantine removes
    # some of the files this prune listed as candidates, before it judges them.
    store, keys = _six_expired_sessions(tmp_path)
    taken = {store.cache.path_for(key) for key in keys[::2]}
    real_prune_file = store.cache.prune_file

    def taken_first(path: str) -> int | None:
        if path in taken:
            os.unlink(path)
        return real_prune_file(path)

    monkeypatch.setattr(store.cache, "prune_file", taken_first)
    # One more is busy: a writer holds its lock, so it is in use, and kept.  The
    # writer lets go after 5 s at most, so a prune that waited for it would go
    # on, remove it, and fail the counts rather than hang.
    locked, done = threading.Event(), threading.Event()

    def writer() -> None:
        fd = os.open(store.cache.path_for(keys[1]), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        locked.set()
        done.wait(5)
        os.close(fd)

    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(writer)
        assert locked.wait(5)
        report = store.prune(lifetime=1)
        done.set()
        holding.result()
    assert (report.removed, report.kept, report.bytes_freed) == (2, 1, 2 * 4096)


def test_prune_judges_each_candidate_again_once_it_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race at its narrowest: the write lands after every check prune could make
    # without the file's lock, just before prune opens the file to take it.  Only a
    # judgement made under the lock sees it.  Prune opens a file without O_CREAT; the
    # writes here open with it, which tells them apart.
    store, keys = _six_expired_sessions(tmp_path)
    pending = {store.cache.path_for(key) for key in keys[::2]}
    real_open = os.open

    def write_just_before_the_lock(path: str, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if not flags & os.O_CREAT and path in pending:
            pending.discard(path)
            store.cache.update_path(path, lambda record: {"counter": 7}, 60)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", write_just_before_the_lock)
    report = store.prune(lifetime=1)
    monkeypatch.undo()
    assert not pending, "every write was made during the prune"
    assert (report.removed, report.kept) == (3, 3)
    assert [store.load(key) for key in keys] == [{"counter": 7}, None] * 3


def test_a_slot_that_holds_a_pickle_is_never_unpickled(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A well-formed newest slot, checksum and all, whose payload is a pickle: the bytes a
    # pickling store would write.  JSON is the only format read, so the slot counts as
    # torn, and the previous one stands.
    client.get("/inc")
    path = only_session_file(app)
    monkeypatch.setattr(files, "encode_record", lambda record: pickle.dumps(record, protocol=2))
    store = app.session_interface.store  # type: ignore[attr-defined]
    store.cache.update_path(str(path), lambda record: {"counter": 7}, 60)
    monkeypatch.undo()
    assert pickle.dumps({"counter": 7}, protocol=2) in path.read_bytes()
    assert client.get("/counter").text == "counter is 1"
    assert client.get("/inc").text == "counter is 2"


def test_stats_count_each_live_session_its_blocks_and_the_oldest_write(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(app.config["SESSION_DIR"])

    def sessions() -> set[Path]:
        return set(session_files_in(folder))

    empty = app.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "sessions: 0\n" in empty and "bytes: 0 (0 B)" in empty and "oldest: none" in empty, empty
    for _ in range(3):
        assert app.test_client().get("/inc").text == "counter is 1"
    live = sessions()
    now = time.time()
    for path, age in zip(sorted(live), (100, 300, 200), strict=True):
        os.utime(path, (now - age, now - age))  # every write moves the mtime: written `age` s ago
    assert app.test_client().get("/inc").text == "counter is 1"
    [vanishing] = sessions() - live  # a prune removes it while stats reads it
    store = app.session_interface.store  # type: ignore[attr-defined]
    with monkeypatch.context() as past:
        past.setattr(time, "time", lambda: now - 3600)
        store.add("session:" + "e" * 43, "counter", 1, 60)  # written an hour ago, to live a minute
    [expired] = sessions() - live - {vanishing}
    corrupt = folder / ("0" * 64)
    corrupt.write_bytes(b"not a session")
    # The folder's order is the filesystem's choice: the ones not to count come first
    # here, and the oldest live session is not the last.
    listed = store.cache.session_files
    rank = [vanishing, corrupt, expired, *sorted(live)]
    in_rank = sorted(listed(), key=lambda entry: rank.index(Path(entry.path)))
    monkeypatch.setattr(store.cache, "session_files", lambda: iter(in_rank))
    read_slot = store.cache.read_slot

    def read_then_vanish(path: str) -> object:
        slot = read_slot(path)
        if path == str(vanishing):
            os.unlink(path)
        return slot

    monkeypatch.setattr(store.cache, "read_slot", read_then_vanish)
    output = app.test_cli_runner().invoke(args=["sessions", "stats"]).output
    size = sum(path.stat().st_blocks * 512 for path in live)
    assert "sessions: 3\n" in output and f"bytes: {size} (" in output, output
    oldest = re.search(r"oldest: written (\d+)s ago", output)
    assert oldest and 300 <= int(oldest.group(1)) <= 302, output


def test_migrate_on_files_moves_nothing(app: Flask) -> None:
    # Only Redis ever had an earlier layout; the command still answers on files.
    assert app.test_client().get("/inc").text == "counter is 1"
    result = app.test_cli_runner().invoke(args=["sessions", "migrate"])
    assert result.exit_code == 0 and "moved 0 sessions" in result.output


def test_the_global_counter_never_expires(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/global/inc").text == "global counter is 1"
    a_year_on = time.time() + 365 * 24 * 3600
    monkeypatch.setattr(time, "time", lambda: a_year_on)
    assert client.get("/global").text == "global counter is 1"
    assert client.get("/global/inc").text == "global counter is 2"


def test_a_write_that_meets_a_corrupt_file_sets_it_aside_and_writes_a_fresh_one(
    app: Flask, client: FlaskClient
) -> None:
    # The global counter's file, which (unlike a session's) a write may create: the
    # write must go to a new file, not into the one just unlinked, where it would be lost.
    assert client.get("/global/inc").text == "global counter is 1"
    path = Path(app.config["SESSION_DIR"]) / files.GLOBAL_FILE
    path.write_bytes(b"not a counter")
    assert client.get("/global/inc").text == "global counter is 1"
    assert client.get("/global").text == "global counter is 1"
    assert [p.read_bytes() for p in (path.parent / files.QUARANTINE_DIR).iterdir()] == [b"not a counter"]


@pytest.mark.parametrize(("create", "added"), [(True, 5), (False, None)])
def test_a_writer_that_waited_for_a_file_removed_meanwhile_never_writes_into_it(
    tmp_path: Path, create: bool, added: int | None
) -> None:
    # Prune and quarantine unlink a file while they hold its lock.  A writer that was
    # waiting for that lock starts on a fresh file (or, only if the session exists,
    # gives up), rather than write where no one would read it again.
    store = files.FileStore(str(tmp_path / "s"))
    assert store.add("session:k", "counter", 9, 60) == 9
    path = store.cache.path_for("session:k")
    waiting = threading.Event()
    store.on_contention = waiting.set
    lock = os.open(path, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(store.add, "session:k", "counter", 5, 60, create)
        try:
            assert waiting.wait(5), "the writer waits for the lock"
            os.unlink(path)
        finally:
            os.close(lock)  # which releases it
        assert writer.result(5) == added
    assert store.load("session:k") == (None if added is None else {"counter": added})


def test_each_corrupt_file_is_quarantined_into_a_private_folder(app: Flask) -> None:
    folder = Path(app.config["SESSION_DIR"])
    clients = [app.test_client() for _ in range(2)]
    for client in clients:
        assert client.get("/inc?by=5").text == "counter is 5"
    for path in session_files_in(folder):
        path.write_bytes(b"not a session")
    for client in clients:  # one after the other, into the same folder
        assert client.get("/inc").text == "counter is 1"
    quarantine = folder / files.QUARANTINE_DIR
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700
    held = list(quarantine.iterdir())
    assert len(held) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in held)


def test_prune_quarantines_a_corrupt_file_and_keeps_the_live_ones(app: Flask) -> None:
    folder = Path(app.config["SESSION_DIR"])
    for _ in range(2):
        assert app.test_client().get("/inc").text == "counter is 1"
    corrupt = folder / ("0" * 64)
    corrupt.write_bytes(b"not a session")
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert "removed 1 expired sessions, kept 2" in result.output, result.output
    assert not corrupt.exists()
    assert [p.read_bytes() for p in (folder / files.QUARANTINE_DIR).iterdir()] == [b"not a session"]


def test_a_record_of_exactly_a_slots_size_is_kept_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    store = files.FileStore(str(tmp_path / "s"))
    room = files.MAX_PAYLOAD - len('{"note":""}')
    assert store.update("session:k", lambda record: {"note": "x" * room}, 60) == {"note": "x" * room}
    assert store.load("session:k") == {"note": "x" * room}
    with pytest.raises(ValueError, match=f"limited to {files.MAX_PAYLOAD} bytes"):
        store.update("session:k", lambda record: {"note": "x" * (room + 1)}, 60)
    assert store.load("session:k") == {"note": "x" * room}, "nothing written"
