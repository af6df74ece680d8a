"""Sessions as files under the instance folder, on cachelib's ``FileSystemCache``.

cachelib gives the layout: one file per session, named by the sha256 of its
key, mode 0600.  Its write path does not fit a counter: it replaces whole files
with no lock (so concurrent writers lose updates), pickles, and above its
threshold deletes live sessions.  :class:`RecordFileCache` keeps the layout and
replaces the IO:

* Every file holds two fixed slots.  A write goes to the older slot in place
  and the newer one stays intact, so a process killed mid-write leaves the
  previous acknowledged value readable.  Each slot carries a CRC32 that
  exposes a torn or foreign write.
* A writer holds ``flock`` on the session's own file for the read-modify-write
  only.  The kernel drops it when the process dies, so a kill -9 leaves no
  lock behind.  Nothing is ever renamed over a session file (a rename would
  orphan the lock); files are only unlinked, under the lock, by prune and
  quarantine, and a writer that finds its file unlinked opens it again.
* Readers take no lock: a slot being written fails its CRC and the reader
  falls back to the other, previous, slot.
* There is no threshold: nothing is evicted, and ``flask sessions prune``
  removes only expired sessions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from cachelib.file import FileSystemCache

from .awake import spin
from .base import (
    Change,
    CorruptRecord,
    PruneReport,
    Record,
    Stats,
    StorageError,
    Store,
    added,
    decode_record,
    encode_record,
    integer_field,
)
from .group import GroupCommit, Update

#: magic, expires (unix time, 0 = never), sequence number, payload length, crc32
_HEADER = struct.Struct("<4sdQII")
_MAGIC = b"TLY1"
#: Both slots fit in one 4 KiB block, so a session costs one block on disk.
SLOT_SIZE = 512
MAX_PAYLOAD = SLOT_SIZE - _HEADER.size
_SESSION_NAME = re.compile(r"[0-9a-f]{64}")
GLOBAL_FILE = "global"
#: A prune reports its progress every this many files.
PROGRESS_EVERY = 100_000
#: Threads that check and unlink files during a prune.
PRUNE_THREADS = 4
#: How long a writer that finds a session's lock busy tries again before it
#: sleeps on it: a few times the lock's usual hold (:func:`_spin_lock`).
LOCK_SPIN_SECONDS = 50e-6
#: Below this much free space, /healthz reports the disk as full.
MIN_FREE_BYTES = 64 * 1024
QUARANTINE_DIR = "quarantine"
#: What :meth:`RecordFileCache.prune_file` returns for a file that was gone
#: before it could be judged (another prune, a quarantine): neither removed by
#: this prune nor kept.
GONE = -1

log = logging.getLogger(__name__)

_OS_ERRORS = {
    errno.ENOSPC: ("disk_full", "the session disk is full", 507),
    errno.EDQUOT: ("disk_full", "the session disk quota is exhausted", 507),
    errno.EROFS: ("read_only", "the session store is on a read-only filesystem", 503),
    errno.EACCES: ("permission", "permission denied on the session store", 503),
    errno.EPERM: ("permission", "permission denied on the session store", 503),
}


def storage_error(exc: OSError) -> StorageError:
    """Translate an OSError from the session folder into a StorageError."""
    kind, message, status = _OS_ERRORS.get(
        exc.errno or 0, ("io_error", f"the session store failed: {exc.strerror}", 503)
    )
    return StorageError(kind, message, status)


class _Slot:
    """One decoded, checksum-verified slot."""

    __slots__ = ("expires", "record", "seq")

    def __init__(self, expires: float, seq: int, record: Record) -> None:
        self.expires = expires
        self.seq = seq
        self.record = record


def _pack(payload: bytes, expires: float, seq: int) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<dQ", expires, seq)))
    return _HEADER.pack(_MAGIC, expires, seq, len(payload), crc) + payload


def _apply(batch: list[Update], record: Record | None) -> tuple[bytes, int] | None:
    """Apply each update of ``batch`` in turn to ``record`` (None: absent).

    Sets each update's outcome, and returns the payload to write with the
    ttl of the last update applied, or None when none changed anything.
    """
    written = None
    for update in batch:
        update.record = update.error = None
        if record is None and not update.create:
            continue  # it may not bring the session into being: it leaves None
        try:
            changed = update.change({} if record is None else dict(record))
            # Checked for each update: one that does not fit fails alone, as
            # it would have had it come by itself.
            payload = encode_record(changed)
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"a session record is limited to {MAX_PAYLOAD} bytes")
        except Exception as exc:
            update.error = exc  # nothing of it is applied; the next goes on from the record before it
            continue
        record = update.record = changed
        written = payload, update.ttl
    return written


def _check_slot(raw: bytes, offset: int) -> tuple[int, float, bytes] | None:
    """Return (seq, expires, payload) of the slot at ``offset`` if its header and CRC hold."""
    if len(raw) < offset + _HEADER.size:
        return None
    magic, expires, seq, length, crc = _HEADER.unpack_from(raw, offset)
    start = offset + _HEADER.size
    payload = raw[start : start + length]
    if magic != _MAGIC or length > MAX_PAYLOAD or len(payload) != length:
        return None
    # The CRC covers expires and seq (the header's bytes 4 to 20), then the payload.
    if zlib.crc32(payload, zlib.crc32(raw[offset + 4 : offset + 20])) != crc:
        return None
    return seq, expires, payload


def _newest(raw: bytes) -> _Slot | None:
    """Return the newest valid slot; raise CorruptRecord for foreign bytes."""
    if not raw:
        return None
    checked = [s for s in (_check_slot(raw, 0), _check_slot(raw, SLOT_SIZE)) if s]
    # Newest first, and only its JSON is parsed: the older slot is the fallback
    # for a torn write, which its CRC has already caught.
    for seq, expires, payload in sorted(checked, reverse=True):
        try:
            return _Slot(expires, seq, decode_record(payload))
        except CorruptRecord:
            continue
    raise CorruptRecord("no valid slot")


def _try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock if it is free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _spin_lock(fd: int) -> bool:
    """Try for ``fd``'s lock for up to :data:`LOCK_SPIN_SECONDS` awake, before sleeping on it.

    The lock is held for one read-modify-write of a few microseconds; a
    writer that sleeps on it instead pays a context switch and a wake-up,
    which cost more than the wait (see :mod:`.awake`).
    """
    return spin(lambda: _try_lock(fd), LOCK_SPIN_SECONDS)


def _live(slot: _Slot | None, now: float) -> bool:
    return slot is not None and (slot.expires == 0 or slot.expires > now)


class RecordFileCache(FileSystemCache):
    """cachelib's file cache with locked, in-place, JSON records.

    Of cachelib it keeps the layout: the folder and the file names.  Records go
    through :meth:`update_path`, the atomic read-modify-write the counter needs,
    and :meth:`read_path`; cachelib's ``get`` and ``set`` (pickle, no lock) are
    never called.
    """

    def __init__(self, cache_dir: str, default_timeout: int = 0, fsync: bool = False) -> None:
        # cachelib creates the folder with the umask's mode; sessions are
        # credentials, so the folder is the owner's alone.  An unusable folder
        # (a mount not there yet) must not stop the service from starting:
        # requests answer 503 until it is usable, and writes create it.
        with contextlib.suppress(OSError):
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        # threshold=0: cachelib's pruning evicts live sessions and reads every
        # file on every write once over the threshold.  With it, cachelib's
        # constructor does nothing after the makedirs that may fail here.
        with contextlib.suppress(OSError):
            super().__init__(cache_dir, threshold=0, default_timeout=default_timeout, mode=0o600)
        self.fsync = fsync
        #: Called when a writer has to wait for another writer: its lock, or its write.
        self.on_lock_wait: Callable[[], None] = lambda: None
        self._group: GroupCommit[Update] = GroupCommit(lambda: self.on_lock_wait())
        #: Called with the path and raw bytes of a record that was quarantined.
        self.on_quarantine: Callable[[str, bytes], None] = lambda path, raw: None

    # -- low-level IO ------------------------------------------------------

    def _open_locked(self, path: str, create: bool = True, block: bool = True) -> int | None:
        """Open ``path`` and take its exclusive lock; None if absent or busy."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(path, flags, self._mode or 0o600)
            except FileNotFoundError:
                if not create:
                    return None
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # deleted or never made
                continue
            try:
                if not _try_lock(fd):
                    if not block:
                        os.close(fd)
                        return None
                    self.on_lock_wait()
                    if not _spin_lock(fd):
                        fcntl.flock(fd, fcntl.LOCK_EX)
                # A prune or quarantine may have unlinked the file while we
                # waited; writing to it then would be lost, so reopen.
                if os.fstat(fd).st_nlink:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not create:
                return None

    @staticmethod
    def _read(fd: int) -> bytes:
        return os.pread(fd, 2 * SLOT_SIZE, 0)

    def _quarantine(self, path: str, fd: int) -> None:
        """Move a corrupt file's bytes aside and unlink it; we hold its lock."""
        # All of it, however long: the quarantined bytes must be the original's.
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        folder = os.path.join(self._path, QUARANTINE_DIR)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        target = os.path.join(folder, f"{os.path.basename(path)}.{time.time_ns()}")
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(raw)
        # Unlink rather than rename: a writer waiting on this file's lock
        # sees st_nlink == 0 and starts over on a fresh file.
        os.unlink(path)
        log.warning(
            "corrupt session %s (%d bytes) moved to %s; the client starts afresh", describe(path), len(raw), target
        )
        self.on_quarantine(path, raw)

    def _newest_or_quarantine(self, path: str, fd: int) -> _Slot | None:
        try:
            return _newest(self._read(fd))
        except CorruptRecord:
            self._quarantine(path, fd)
            return None

    def update_path(self, path: str, change: Change, ttl: int, create: bool = True) -> Record | None:
        """The atomic read-modify-write on one file; None if absent and not ``create``.

        This process's concurrent updates of the same file are made together,
        in one locked write (:mod:`.group`).
        """
        return self._group.run(path, Update(change, ttl, create), lambda batch: self._commit(path, batch)).result()

    def _commit(self, path: str, batch: list[Update]) -> None:
        """Apply ``batch`` in order, under the file's lock, in one write."""
        create = any(update.create for update in batch)
        try:
            while True:
                fd = self._open_locked(path, create=create)
                if fd is None:
                    return  # absent, and no update may create it: each leaves None
                # What queued while this waited for the lock (often a write of
                # another process's) goes in this write, not in one more.
                batch += self._group.joined(path)
                try:
                    now = time.time()
                    current = self._newest_or_quarantine(path, fd)
                    if current is None and not os.fstat(fd).st_nlink:
                        if not create:
                            return
                        continue  # it was quarantined; start on a fresh file
                    applied = _apply(batch, current.record if current and _live(current, now) else None)
                    if applied is None:
                        return  # no update of the batch changed anything
                    payload, ttl = applied
                    seq = current.seq + 1 if current else 1
                    data = _pack(payload, now + ttl if ttl else 0.0, seq)
                    if os.pwrite(fd, data, (seq % 2) * SLOT_SIZE) != len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    if self.fsync:
                        os.fsync(fd)
                    return
                finally:
                    os.close(fd)  # also releases the lock
        except OSError as exc:
            raise storage_error(exc) from exc

    @staticmethod
    def read_slot(path: str) -> _Slot | None:
        """Read a file's newest slot without a lock; raise CorruptRecord for foreign bytes."""
        try:
            with open(path, "rb", buffering=0) as f:
                return _newest(f.read(2 * SLOT_SIZE))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc) from exc

    def read_path(self, path: str) -> Record | None:
        """Read a live record without a lock, quarantining a corrupt one."""
        try:
            slot = self.read_slot(path)
        except CorruptRecord:
            self._quarantine_unless_fixed(path)
            return None
        return slot.record if slot and _live(slot, time.time()) else None

    def _quarantine_unless_fixed(self, path: str) -> None:
        # Under the lock, a concurrent writer may have repaired the file.
        try:
            fd = self._open_locked(path, create=False)
            if fd is not None:
                try:
                    self._newest_or_quarantine(path, fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise storage_error(exc) from exc

    def path_for(self, key: str) -> str:
        """Return the file that holds ``key``."""
        return self._get_filename(key)

    # -- maintenance -------------------------------------------------------

    def delete(self, key: str, mgmt_element: bool = False) -> bool:
        """Remove the record under ``key``."""
        self.delete_path(self._get_filename(key))
        return True

    def delete_path(self, path: str) -> None:
        """Remove the record in ``path``, under its lock."""
        try:
            fd = self._open_locked(path, create=False)
            if fd is not None:
                os.unlink(path)
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc) from exc

    def prune_file(self, path: str) -> int | None:
        """Unlink ``path`` if it holds no live session; return the bytes freed.

        Returns None when the session is kept: live, or busy with a writer (a
        writer means it is in use); and :data:`GONE` when the file was no
        longer there to judge.  A corrupt file is quarantined.
        """
        try:
            fd = self._open_locked(path, create=False, block=False)
            if fd is None:
                # Absent, busy, or unlinked as it was opened: only a busy one is still there.
                return None if os.path.lexists(path) else GONE
            try:
                # Judged under the lock: a request may have written just now.
                size = os.fstat(fd).st_blocks * 512
                if _live(self._newest_or_quarantine(path, fd), time.time()):
                    return None
                if os.fstat(fd).st_nlink:
                    os.unlink(path)
                return size
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc) from exc

    def session_files(self) -> Iterator[os.DirEntry[str]]:
        """Yield the folder's session files (not the global counter, not temp files)."""
        try:
            entries = os.scandir(self._path)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                if _SESSION_NAME.fullmatch(entry.name):
                    yield entry


class FileStore(Store):
    """The default store: a folder of session files, shared by one machine's processes."""

    name = "files"

    def __init__(self, folder: str, fsync: bool = False) -> None:
        self.cache = RecordFileCache(folder, fsync=fsync)
        self.cache.on_lock_wait = lambda: self.on_contention()
        self.cache.on_quarantine = lambda path, raw: self.on_corrupt(describe(path))
        self.folder = folder
        self._global = os.path.join(folder, GLOBAL_FILE)

    def load(self, key: str) -> Record | None:
        return self.cache.read_path(self.cache.path_for(key))

    def update(self, key: str, change: Change, ttl: int, create: bool = True) -> Record | None:
        return self.cache.update_path(self.cache.path_for(key), change, ttl, create)

    def delete(self, key: str) -> None:
        self.cache.delete(key)

    def increment_global(self, by: int = 1) -> int:
        record = self.cache.update_path(self._global, lambda r: added(r, "value", by), 0)
        assert record is not None
        return integer_field(record, "value")

    def read_global(self) -> int:
        record = self.cache.read_path(self._global)
        return integer_field(record, "value") if record else 0

    def stats(self, lifetime: int) -> Stats:
        """Count the live sessions, each judged by the expiry its own file records.

        ``lifetime`` is not used: a session lives as long as the lifetime it
        was written with, which the caller's configuration need not share.
        """
        now = time.time()
        count = size = 0
        oldest: float | None = None
        for entry in self.cache.session_files():
            try:
                if not _live(self.cache.read_slot(entry.path), now):
                    continue
                info = entry.stat()
            except CorruptRecord:
                continue  # not a session until a request quarantines it
            except FileNotFoundError:
                continue  # pruned or deleted since it was listed
            count += 1
            size += info.st_blocks * 512
            # Every write moves the mtime, so it is when the session was last written.
            oldest = info.st_mtime if oldest is None else min(oldest, info.st_mtime)
        return Stats(count, size, None if oldest is None else now - oldest)

    def count(self) -> int:
        # Names only: a count must stay cheap over a million files.
        return sum(1 for _ in self.cache.session_files())

    def check(self) -> None:
        # The in-place write proves the folder writable; it does not need a
        # new block, so free space is checked apart: new sessions need it.
        self.cache.update_path(os.path.join(self.folder, "healthz"), lambda r: {"at": time.time()}, 0)
        try:
            fs = os.statvfs(self.folder)
        except OSError as exc:
            raise storage_error(exc) from exc
        if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
            raise storage_error(OSError(errno.ENOSPC, "no space left"))

    def prune(self, lifetime: int, progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
        """Remove expired sessions, each judged by the expiry its own file records.

        ``lifetime`` is not used.  A session lives as long as the lifetime it
        was written with, and the prune need not share it: cron runs it
        without the service's environment.  Nor can a file's mtime stand in
        for its expiry: how long after it the session lives is known only
        from inside the file.
        """
        report = PruneReport()
        entries = self.cache.session_files()
        next_progress = PROGRESS_EVERY
        # Threads overlap the syscalls of the candidates (the GIL is released
        # in them), above all the freeing of an unlinked file on its last close.
        with ThreadPoolExecutor(PRUNE_THREADS) as pool:
            # In batches: Executor.map would queue a future per file at once.
            while batch := list(itertools.islice(entries, 4096)):
                # Each file is read once, with no lock, in this thread (faster
                # than in the pool, measured).  One that reads as live is kept:
                # keeping is always safe, and most sessions are live.  The rest
                # are judged again under their lock, as a request may have
                # written one just now; prune_file also quarantines a corrupt one.
                now = time.time()
                candidates = []
                for entry in batch:
                    try:
                        if _live(self.cache.read_slot(entry.path), now):
                            report.kept += 1
                            continue
                    except CorruptRecord:
                        pass
                    candidates.append(entry.path)
                for freed in pool.map(self.cache.prune_file, candidates):
                    if freed is None:
                        report.kept += 1
                    elif freed != GONE:
                        report.removed += 1
                        report.bytes_freed += freed
                if progress and report.kept + report.removed >= next_progress:
                    progress(report)
                    next_progress += PROGRESS_EVERY
        return report


def describe(path: str) -> str:
    """Name a session file in logs by its hashed id (see :func:`hashed_id`)."""
    return os.path.basename(path)[:16]
