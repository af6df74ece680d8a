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


class OutOfRange(ValueError):
    """An addition would take a counter outside signed 64 bits; nothing was written."""


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def integer_field(record: Record, field: str) -> int:
    """Return ``record[field]`` as an int, 0 when absent or not an int."""
    value = record.get(field, 0)
    # bool is an int; anything else not an int is not ours to trust.
    return value if type(value) is int else 0


def added(record: Record, field: str, by: int) -> Record:
    """Return ``record`` with ``by`` added to ``field``, or raise OutOfRange."""
    value = integer_field(record, field) + by
    if not INT64_MIN <= value <= INT64_MAX:
        raise OutOfRange(f"{field} would leave the signed 64-bit range")
    return record | {field: value}


def hashed_id(key: str) -> str:
    """Return the short hash under which a session may appear in logs."""
    # The raw cookie is a bearer credential; its hash is not, and it is the
    # same hash that names the session's file, so logs lead to the file.
    return hashlib.sha256(key.encode()).hexdigest()[:16]


#: Made once: json.dumps with options builds an encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_record(record: Record) -> bytes:
    """Serialize a record: compact JSON, never pickle."""
    return _ENCODER.encode(record).encode()


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
    :meth:`increment_global`, :meth:`read_global`, :meth:`stats`,
    :meth:`count` and :meth:`check`; :meth:`add` where the backend can add faster than a
    read-modify-write, and :meth:`prune` where expiry is not automatic.

    ``create=False`` on a write means "only if the session exists": a client's
    cookie must never bring a session into being under an id it chose.
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
    def update(self, key: str, change: Change, ttl: int, create: bool = True) -> Record | None:
        """Atomically replace the record with ``change(record)`` and return it.

        An absent or expired record is passed as ``{}``, or, with
        ``create=False``, nothing is written and None is returned.  The
        written record lives ``ttl`` seconds from now.
        """

    def add(self, key: str, field: str, by: int, ttl: int, create: bool = True) -> int | None:
        """Atomically add ``by`` to an integer field and return its new value.

        Raises :class:`OutOfRange`, writing nothing, past signed 64 bits.
        """
        record = self.update(key, lambda r: added(r, field, by), ttl, create)
        return None if record is None else integer_field(record, field)

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
    def count(self) -> int:
        """Count the stored sessions quickly: on files, expired ones count until pruned."""

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageError` unless the store is readable and writable."""

    def warnings(self) -> list[str]:
        """Settings of the backend that would break a promise (say, evict sessions); none by default."""
        return []

    def migrate(self, progress: Callable[[int], None] | None = None) -> int:
        """Move sessions stored under an earlier layout to the current one; return how many."""
        return 0

    def prune(self, lifetime: int, progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
        """Remove expired sessions; a no-op where the backend expires them.

        ``lifetime`` is the configured session lifetime: a session written
        more recently than that is kept without being looked at.
        """
        return PruneReport()
