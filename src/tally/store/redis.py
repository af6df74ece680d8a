"""Sessions and the global counter in Redis (or Valkey), shared by many machines.

A session is a hash: each field holds one session key's value as JSON, and the
field ``_v`` counts writes.  A JSON integer is also Redis's integer text, so
``HINCRBY`` adds to the counter in place, exactly over all of int64 (Lua's
numbers are doubles and could not), in one round trip and without retries.
Any other change is a compare-and-set on ``_v``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

from .base import Change, CorruptRecord, OutOfRange, Record, Stats, StorageError, Store, hashed_id

log = logging.getLogger(__name__)

# Each script first checks a deadline in the server's own clock.  A client
# that times out answers 503, but its command may still sit in the socket
# buffer of a stalled (SIGSTOPped, swapping) Redis and run when it wakes; the
# deadline turns such a late write into a no-op, so nothing happens that was
# reported as not having happened.  (A test that SIGSTOPs Redis catches it.)
_LATE = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then return {err = 'TALLY_LATE'} end
"""

# KEYS[1] session; ARGV: deadline, field, by, ttl ms, create (1/0).
_ADD = (
    _LATE
    + """
if ARGV[5] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], '_v', 1)
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
-- Read back as a string: an integer reply becomes a Lua double, inexact past 2^53.
return redis.call('HGET', KEYS[1], ARGV[2])
"""
)

# KEYS[1] session; ARGV: deadline, expected _v ('' = absent), ttl ms, then field, value pairs.
_CAS = (
    _LATE
    + """
if (redis.call('HGET', KEYS[1], '_v') or '') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], '_v', (tonumber(ARGV[2]) or 0) + 1, unpack(ARGV, 4))
  if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
end
return 1
"""
)

# KEYS[1] global counter; ARGV: deadline, by.
_INCR = _LATE + "redis.call('INCRBY', KEYS[1], ARGV[2]) return redis.call('GET', KEYS[1])"

#: Give up on a same-session compare-and-set after this many conflicts in a row.
MAX_ATTEMPTS = 1000
#: How often to measure the offset between our clock and Redis's.
CLOCK_CHECK_SECONDS = 5.0


def _translate(exc: redis.RedisError) -> Exception:
    if isinstance(exc, redis.exceptions.ResponseError):
        if "TALLY_LATE" in str(exc):
            return StorageError("unavailable", "Redis answered too late", 503)
        if "overflow" in str(exc):
            return OutOfRange("the counter would leave the signed 64-bit range")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return StorageError("redis_oom", "Redis is out of memory", 503)
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return StorageError("read_only", "Redis is read-only (a replica?)", 503)
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return StorageError("permission", "Redis refused our credentials", 503)
    if isinstance(exc, redis.exceptions.TimeoutError):
        return StorageError("unavailable", "Redis did not answer in time", 503)
    if isinstance(exc, redis.exceptions.ConnectionError):
        return StorageError("unavailable", "Redis is unreachable", 503)
    return StorageError("redis_error", f"Redis failed: {exc}", 503)


def _decode(fields: dict[bytes, bytes]) -> Record:
    try:
        return {k.decode(): json.loads(v) for k, v in fields.items() if k != b"_v"}
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(str(exc)) from exc


def _encode(record: Record) -> list[str]:
    return [part for k, v in record.items() for part in (k, json.dumps(v, separators=(",", ":")))]


def _closed(conn: AbstractConnection) -> bool:
    """Whether an idle connection has anything to read, which means Redis closed it."""
    sock = conn._sock  # type: ignore[attr-defined]
    if type(sock) is not socket.socket:  # not connected yet, or TLS (whose recv takes no flags)
        try:
            return sock is not None and bool(conn.can_read())
        except redis.exceptions.ConnectionError:
            return True
    # One system call; can_read() would switch the socket to non-blocking and back around it.
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"" at end of stream, or stray bytes
    except BlockingIOError:
        return False  # nothing to read: open and clean
    except OSError:
        pass  # reset
    return True


class RedisStore(Store):
    """Each session is one hash with a TTL; the global counter is an integer key."""

    name = "redis"

    def __init__(self, url: str, timeout: float = 2.0, prefix: str = "tally:") -> None:
        if not timeout > 0:  # a zero SO_RCVTIMEO would wait forever on a hung Redis
            raise ValueError(f"the Redis timeout must be a positive number of seconds, not {timeout!r}")
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # redis-py retries timeouts by default: that multiplies the wait
            # for a hung server, and resends commands that may have run.
            retry=Retry(NoBackoff(), 0),
        )
        self.timeout = timeout
        self.prefix = prefix
        self._session_prefix = prefix + "session:"
        self._global = prefix + "global"
        self._add = self.client.register_script(_ADD)
        self._cas = self.client.register_script(_CAS)
        self._incr = self.client.register_script(_INCR)
        self._clock_lock = threading.Lock()
        self._offset_us = 0
        self._offset_checked = -CLOCK_CHECK_SECONDS
        #: Idle connections for the hot path (:meth:`_evalsha`), and the process they belong to.
        self._idle: list[AbstractConnection] = []
        self._idle_pid = os.getpid()

    def _key(self, key: str) -> str:
        return self._session_prefix + key

    def _deadline(self) -> int:
        """The last moment, in Redis's clock (µs), at which a write may still apply.

        Half the timeout from now leaves the reply time to arrive before we
        give up, so an applied write is almost never reported as failed.  The
        offset of Redis's clock from our monotonic one (which no clock step
        here can move) is measured every few seconds, rather than asking
        Redis the time on every write, which would cost a round trip.
        """
        now = time.monotonic()
        if now - self._offset_checked > CLOCK_CHECK_SECONDS:
            with self._clock_lock:
                if now - self._offset_checked > CLOCK_CHECK_SECONDS:
                    sent = time.monotonic()
                    seconds, micros = self._call(self.client.time)
                    received = time.monotonic()
                    self._offset_us = seconds * 1_000_000 + micros - int((sent + received) * 500_000)
                    self._offset_checked = received
        return int(time.monotonic() * 1_000_000) + self._offset_us + int(self.timeout * 500_000)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise _translate(exc) from exc

    def _fetch(self, rkey: str) -> tuple[Record | None, str]:
        """Return the live record (None if absent or corrupt) and its version."""
        try:
            fields = self.client.hgetall(rkey)
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise _translate(exc) from exc
            fields = {b"": b"not a hash"}  # someone else's data under our key: corrupt
        except redis.RedisError as exc:
            raise _translate(exc) from exc
        if not fields:
            return None, ""
        try:
            return _decode(fields), fields.get(b"_v", b"").decode()
        except CorruptRecord:
            # Never unpickle, never guess: delete, and the client starts afresh.
            self._call(self.client.delete, rkey)
            hashed = hashed_id(rkey[len(self._session_prefix) :])
            log.warning("corrupt session %s deleted from Redis; the client starts afresh", hashed)
            self.on_corrupt(hashed)
            return None, ""

    def load(self, key: str) -> Record | None:
        return self._fetch(self._key(key))[0]

    def _checkout(self) -> AbstractConnection:
        """Take an idle connection that Redis has not closed, or make one.

        A plain free list rather than redis-py's pool, whose checkout takes
        locks and records observability counters on every call: about 40 µs
        of a 130 µs call on the benchmark machine.  The check that matters is
        kept: an idle connection with anything to read has been closed by
        Redis (idle timeout, restart, CLIENT KILL), and sending on it would
        fail a request that never reached Redis.  A connection goes back only
        after a whole reply was read, so it holds no stale reply.
        """
        if self._idle_pid != os.getpid():  # forked: the parent's sockets are not ours
            self._idle, self._idle_pid = [], os.getpid()
        try:
            conn = self._idle.pop()  # atomic, as is append
        except IndexError:
            pool = self.client.connection_pool
            # No Python-level read timeout: the kernel keeps it (see _kernel_timeouts).
            kwargs = {**pool.connection_kwargs, "socket_timeout": None, "redis_connect_func": self._kernel_timeouts}
            return pool.connection_class(**kwargs)  # type: ignore[no-any-return]
        if _closed(conn):
            conn.disconnect()  # it reconnects when it next sends
        return conn

    def _kernel_timeouts(self, conn: AbstractConnection) -> None:
        """Make a hot-path connection's socket blocking, with its timeouts kept by the kernel.

        Python implements a socket timeout by polling before every send and
        receive; SO_RCVTIMEO and SO_SNDTIMEO bound the same waits inside the
        one system call, and a wait that runs out fails the same way, as a
        ConnectionError that :meth:`_evalsha` reports.  The connect itself
        keeps redis-py's Python-level timeout.
        """
        sock = conn._sock  # type: ignore[attr-defined]
        if type(sock) is socket.socket:  # TCP or Unix; a TLS socket keeps Python's timeout
            # At least 1 µs: a zero timeval means no timeout at all.
            limit = struct.pack("ll", *divmod(max(1, round(self.timeout * 1_000_000)), 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        else:
            conn.socket_timeout = self.timeout  # type: ignore[attr-defined]
            sock.settimeout(self.timeout)
        conn.on_connect()

    def _evalsha(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script; a StorageError says whether it may have run.

        When Redis stalls after running a script but before replying (its
        replies go out after the whole batch of commands it is working on),
        the client cannot know the outcome: no protocol can settle that, so
        the answer says so instead of claiming that nothing changed.

        It bypasses redis-py's per-command wrapper, whose retry bookkeeping
        and observability hooks cost about 60 µs of CPU of a 140 µs call on
        the benchmark machine, for retries that are off here anyway.
        """
        conn = self._checkout()
        sent = False
        try:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            try:
                conn.send_command(*command)
                sent = True
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                self.client.script_load(script.script)  # Redis restarted or flushed its scripts
                conn.send_command(*command)
                return conn.read_response()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            conn.disconnect()
            if sent:
                raise StorageError(
                    "unavailable", "Redis did not answer in time; this change may or may not have been applied", 503
                ) from exc
            raise
        finally:
            # Disconnected or not, it holds no unread reply (redis-py
            # disconnects on any error mid-read); it reconnects when next used.
            self._idle.append(conn)

    def add(self, key: str, field: str, by: int, ttl: int, create: bool = True) -> int | None:
        args = [self._deadline(), field, by, ttl * 1000, int(create)]
        try:
            value = self._call(self._evalsha, self._add, [self._key(key)], args)
        except StorageError as exc:
            if exc.kind != "redis_error":
                raise
            # HINCRBY on a field that is not an integer: repair by the slow path.
            return super().add(key, field, by, ttl, create)
        return None if value is None else int(value)

    def update(self, key: str, change: Change, ttl: int, create: bool = True) -> Record | None:
        rkey = self._key(key)
        for _ in range(MAX_ATTEMPTS):
            current, version = self._fetch(rkey)
            if current is None and not create:
                return None
            record = change(dict(current) if current else {})
            args = [self._deadline(), version, ttl * 1000, *_encode(record)]
            if self._call(self._evalsha, self._cas, [rkey], args) == 1:
                return record
            self.on_contention()
        raise StorageError("contention", "too many concurrent updates of one session", 503)

    def delete(self, key: str) -> None:
        self._call(self.client.delete, self._key(key))

    def increment_global(self, by: int = 1) -> int:
        return int(self._call(self._evalsha, self._incr, [self._global], [self._deadline(), by]))

    def read_global(self) -> int:
        return int(self._call(self.client.get, self._global) or 0)

    def _keys(self) -> Iterator[bytes]:
        return self.client.scan_iter(match=self._session_prefix + "*", count=1000)

    def stats(self, lifetime: int) -> Stats:
        def collect() -> Stats:
            count = size = 0
            soonest: int | None = None
            for rkey in self._keys():
                pipe = self.client.pipeline(transaction=False)
                pipe.memory_usage(rkey).pttl(rkey)
                usage, pttl = pipe.execute()
                if usage is None or pttl == -2:
                    continue  # expired between SCAN and now
                count += 1
                size += usage
                if pttl >= 0:
                    soonest = pttl if soonest is None else min(soonest, pttl)
            oldest = None if soonest is None or not lifetime else lifetime - soonest / 1000
            return Stats(count, size, oldest)

        return self._call(collect)  # type: ignore[no-any-return]

    def check(self) -> None:
        self._call(self.client.set, self.prefix + "healthz", "ok", px=60_000)
