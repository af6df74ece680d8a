"""The storage contract shared by the file and Redis stores."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: A session's stored data: a JSON object.
Record = dict[str, Any]

#: A pure function from the stored record to the record to store.  It may
#: raise to abort the update, and then nothing is written.
Change = Callable[[Record], Record]


class StorageError(Exception):
    """The store could not do what was asked; nothing was changed.

    ``kind`` is short and stable (it labels metrics and log lines);
    ``status`` is the HTTP status a request that hit it should answer.
    """

    def __init__(self, kind: str, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


class CorruptRecord(Exception):
    """Stored bytes that do not decode to a record."""


def hashed_id(key: str) -> str:
    """Return the short hash under which a session may appear in logs."""
    # The raw cookie is a bearer credential; its hash is not, and it is the
    # same hash that names the session's file, so logs lead to the file.
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_record(record: Record) -> bytes:
    """Serialize a record: compact JSON, never pickle."""
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def decode_record(raw: bytes) -> Record:
    """Parse a record written by :func:`encode_record`."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(str(exc)) from exc
    if not isinstance(record, dict):
        raise CorruptRecord("a record must be a JSON object")
    return record


@dataclass(frozen=True)
class Stats:
    """What ``flask sessions stats`` reports."""

    sessions: int
    bytes: int
    #: Seconds since the least recently written live session was written.
    oldest_age: float | None


@dataclass
class PruneReport:
    """What one ``flask sessions prune`` pass did."""

    removed: int = 0
    kept: int = 0
    bytes_freed: int = 0


class Store(ABC):
    """Session records and the global counter.

    Implementations must make :meth:`update` and :meth:`increment_global`
    atomic across threads, processes and (for shared stores) machines, must
    not leave a lock behind when a process dies mid-operation, and must treat a
    record that was not written for its ``ttl`` as absent.

    The methods to implement are :meth:`load`, :meth:`update`, :meth:`delete`,
    :meth:`increment_global`, :meth:`read_global`, :meth:`stats` and
    :meth:`check`; :meth:`prune` only where expiry is not automatic.
    """

    #: Short name for logs, metrics and ``/healthz``.
    name: str = "store"
    #: Called when a same-session update had to wait for or redo its work.
    on_contention: Callable[[], None] = staticmethod(lambda: None)
    #: Called with the hashed id of a session whose stored data was corrupt.
    on_corrupt: Callable[[str], None] = staticmethod(lambda hashed: None)

    @abstractmethod
    def load(self, key: str) -> Record | None:
        """Return the live record under ``key``, or None.  Never writes."""

    @abstractmethod
    def update(self, key: str, change: Change, ttl: int) -> Record:
        """Atomically replace the record with ``change(record)`` and return it.

        An absent or expired record is passed as ``{}``.  The written record
        lives ``ttl`` seconds from now.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the record under ``key``, if any."""

    @abstractmethod
    def increment_global(self, by: int = 1) -> int:
        """Atomically add ``by`` to the global counter and return its value."""

    @abstractmethod
    def read_global(self) -> int:
        """Return the global counter."""

    @abstractmethod
    def stats(self, lifetime: int) -> Stats:
        """Count the live sessions and the space they use.

        ``lifetime`` is the configured session lifetime, for stores that only
        know when a session expires, not when it was written.
        """

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageError` unless the store is readable and writable."""

    def prune(self, progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
        """Remove expired sessions; a no-op where the backend expires them."""
        return PruneReport()
