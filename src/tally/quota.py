"""Bounds on new sessions: per client address (a rate), and for the whole store (a cap).

A client with no cookie jar makes a session on every request; one address
made 28,000 in ten seconds.  Each address may create
``NEW_SESSIONS_PER_MINUTE`` sessions (429 with ``Retry-After`` past that), and
an operator may cap the store at ``MAX_SESSIONS`` (507 at the cap).  Neither
touches sessions that exist: they keep counting, and nothing is evicted.

The rate is kept by the ``limits`` library (Flask-Limiter's), in a storage
that every worker and instance shares: the Redis that holds the sessions, or,
for the file store, files beside the sessions (see :class:`FileQuotaStorage`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
import time
from typing import Any

from flask import Flask, current_app, request
from limits import RateLimitItemPerMinute
from limits.errors import StorageError as LimitsStorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from werkzeug.exceptions import TooManyRequests

from .sessions import TallySessionInterface
from .store import StorageError, Store
from .store.files import GONE, RecordFileCache

#: How long a count of the stored sessions stands before it is taken again.
COUNT_SECONDS = 10.0
QUOTA_DIR = "quotas"


class FileQuotaStorage(Storage):
    """A ``limits`` storage in files, shared by every process on the machine.

    ``limits`` ships memory (one process only), Redis, Memcached, MongoDB and
    etcd storages, none of which the file store may assume.  Each counter is
    one record file, updated with the file store's own locked
    read-modify-write, so the fixed windows hold across workers and
    instances, and a killed process leaves no lock behind.
    """

    STORAGE_SCHEME = None  # made directly, never from a URI

    def __init__(self, folder: str, **options: Any) -> None:
        super().__init__(wrap_exceptions=True)
        self.folder = folder
        self.cache = RecordFileCache(folder)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return StorageError

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest())

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()

        def count(record: dict[str, Any]) -> dict[str, Any]:
            if record.get("until", 0) <= now:  # a new window
                return {"n": amount, "until": now + expiry}
            return {"n": record["n"] + amount, "until": record["until"]}

        record = self.cache.update_path(self._path(key), count, int(expiry) + 1)
        assert record is not None
        return int(record["n"])

    def _live(self, key: str) -> dict[str, Any]:
        record = self.cache.read_path(self._path(key)) or {}
        return record if record.get("until", 0) > time.time() else {}

    def get(self, key: str) -> int:
        return int(self._live(key).get("n", 0))

    def get_expiry(self, key: str) -> float:
        return float(self._live(key).get("until", time.time()))

    def check(self) -> bool:
        return os.access(self.folder, os.W_OK)

    def reset(self) -> int | None:
        removed = 0
        for entry in self.cache.session_files():
            self.cache.delete_path(entry.path)
            removed += 1
        return removed

    def clear(self, key: str) -> None:
        self.cache.delete_path(self._path(key))

    def sweep(self) -> tuple[int, int]:
        """Remove the counts whose window has passed; return how many were removed and kept.

        Each address that ever made a session leaves a file here, and Redis
        would expire it but a folder does not: ``flask sessions prune`` sweeps it.
        """
        removed = kept = 0
        for entry in self.cache.session_files():
            freed = self.cache.prune_file(entry.path)
            if freed is None:
                kept += 1
            elif freed != GONE:
                removed += 1
        return removed, kept


def client_key(address: str | None) -> str:
    """The key a client's new sessions are counted under: its address, or its IPv6 /64.

    One IPv6 client usually holds a whole /64 and may pick any address in it,
    so counted by address it would have no limit at all.
    """
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an address (a unix socket's peer): counted as given
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped:  # ::ffff:192.0.2.1, an IPv4 client on a dual-stack socket
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class Quota:
    """The checks made before a new session is stored."""

    def __init__(self, store: Store, per_minute: int, cap: int, storage: Storage | None) -> None:
        self.store = store
        self.cap = cap
        self.item = RateLimitItemPerMinute(per_minute) if per_minute else None
        self.limiter = FixedWindowRateLimiter(storage) if storage and per_minute else None
        self._counted_at = -COUNT_SECONDS
        self._count = 0
        self._lock = threading.Lock()

    def before_create(self) -> None:
        """Raise 429 past this address's rate, or a 507 StorageError at the store's cap."""
        if self.limiter and self.item:
            address = client_key(request.remote_addr)
            try:
                allowed = self.limiter.hit(self.item, "new-sessions", address)
                if not allowed:
                    reset = self.limiter.get_window_stats(self.item, "new-sessions", address).reset_time
            except LimitsStorageError as exc:
                if isinstance(exc.storage_error, StorageError):
                    # Our own file storage: its fault is the session disk's (full is a 507), not the quota's.
                    raise exc.storage_error from exc
                raise StorageError("unavailable", "the session quota could not be checked", 503) from exc
            if not allowed:
                wait = max(1, int(reset - time.time() + 0.999))
                raise TooManyRequests(
                    f"this address made {self.item.amount} new sessions in the last minute; "
                    f"keep your cookie, or try again in {wait} s",
                    retry_after=wait,
                )
        if self.cap and self._stored() >= self.cap:
            raise StorageError("store_full", f"the session store holds its maximum of {self.cap} sessions", 507)

    def _stored(self) -> int:
        """The number of stored sessions, counted at most every few seconds, plus those made since."""
        now = time.monotonic()
        if now - self._counted_at > COUNT_SECONDS:
            with self._lock:
                if now - self._counted_at > COUNT_SECONDS:
                    self._count = self.store.count()
                    self._counted_at = time.monotonic()
        return self._count

    def created(self) -> None:
        """Count a session this process just stored, until the next count."""
        self._count += 1


def _sync(storage: object) -> Storage:
    # storage_from_string may make an async storage (async+redis://); the
    # settings refuse those, so this holds.
    assert isinstance(storage, Storage)
    return storage


def _folder(app: Flask) -> str | None:
    """The folder of the per-address counts, where they are kept in files (no Redis, no other storage)."""
    if app.config.get("RATELIMIT_STORAGE_URI") or app.config.get("REDIS_URL"):
        return None
    return os.path.join(app.config["SESSION_DIR"], QUOTA_DIR)


def _storage(app: Flask) -> Storage:
    folder = _folder(app)
    if folder:
        return FileQuotaStorage(folder)
    uri = app.config.get("RATELIMIT_STORAGE_URI")
    if uri:
        return _sync(storage_from_string(uri, wrap_exceptions=True))
    redis_url = str(app.config["REDIS_URL"])  # _folder found one, or the counts would be in files
    # The sessions' own Redis, with the same timeouts and no retries, so a hung Redis fails fast here too.
    from .store.redis_connect import no_retries, topology  # here: the file store needs no Redis client

    timeout = float(app.config["REDIS_TIMEOUT"])
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": no_retries()}
    prefix = app.config["REDIS_PREFIX"] + "quota"
    read = topology(redis_url)
    more: dict[str, Any] = {}
    if read is None:
        # limits names a Unix socket's Redis redis+unix://; Tally reads unix:// as redis-py's from_url does.
        uri = "redis+" + redis_url if redis_url.startswith("unix://") else redis_url
    else:
        # limits reads no TLS form (rediss+sentinel://, rediss+cluster://), no query arguments and no
        # Sentinel database from these URLs: it gets the hosts in its own form, and the rest as it is
        # read for the sessions' store, as redis-py's arguments.
        uri = f"redis+{read.kind}://{read.hosts}"
        options.update(read.options)
        if read.kind == "sentinel":
            # use_replicas: limits would read a window's reset time (Retry-After) from a replica, which
            # may lag or hang while the primary, where the count is kept, answers.
            more = {
                "service_name": read.service,
                "db": read.db,
                "sentinel_kwargs": dict(options),
                "use_replicas": False,
            }
    return _sync(storage_from_string(uri, wrap_exceptions=True, key_prefix=prefix, **more, **options))


def init_app(app: Flask) -> None:
    """Check the quota before each new session is stored."""
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)
    per_minute = int(app.config["NEW_SESSIONS_PER_MINUTE"])
    storage = _storage(app) if per_minute else None
    quota = Quota(interface.store, per_minute, int(app.config["MAX_SESSIONS"]), storage)
    app.extensions["tally.quota"] = quota
    interface.before_create = quota.before_create
    created = interface.on_created

    def on_created() -> None:
        quota.created()
        created()

    interface.on_created = on_created


def sweep(app: Flask) -> tuple[int, int] | None:
    """Remove the file store's expired per-address counts; None where there are none to sweep."""
    folder = _folder(app)  # None: another storage, which expires them itself
    if folder is None or not os.path.isdir(folder):
        return None
    return FileQuotaStorage(folder).sweep()


def quota() -> Quota:
    """The app's quota."""
    found: Quota = current_app.extensions["tally.quota"]
    return found
