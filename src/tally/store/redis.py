"""Sessions and the global counter in Redis (or Valkey), shared by many machines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import (
    Change,
    CorruptRecord,
    Record,
    Stats,
    StorageError,
    Store,
    decode_record,
    encode_record,
    hashed_id,
)

log = logging.getLogger(__name__)

# Compare-and-set with a deadline in the server's own clock.  A client that
# times out answers 503, but its command may still sit in the socket buffer of
# a stalled (SIGSTOPped, swapping) Redis and run when it wakes; the deadline
# turns such a late write into a no-op, so nothing happens that was reported
# as not having happened.  An empty ARGV[2] deletes the key.
_CAS = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[4]) then return -1 end
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
elseif tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""

# INCRBY under the same kind of deadline.
_INCR = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[2]) then return false end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""

#: Give up on a same-session transaction after this many conflicts in a row.
MAX_ATTEMPTS = 1000


def _translate(exc: redis.RedisError) -> StorageError:
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


class RedisStore(Store):
    """Each session is one JSON string key with a TTL; the global counter is an integer key."""

    name = "redis"

    def __init__(self, url: str, timeout: float = 2.0, prefix: str = "tally:") -> None:
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
        self._cas = self.client.register_script(_CAS)
        self._incr = self.client.register_script(_INCR)

    def _key(self, key: str) -> str:
        return self._session_prefix + key

    def _deadline(self, server_time: tuple[int, int]) -> int:
        # Half the timeout leaves the reply time to arrive before the client
        # gives up, so an applied write is almost never reported as failed.
        return server_time[0] * 1_000_000 + server_time[1] + int(self.timeout * 500_000)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise _translate(exc) from exc

    def _decode(self, rkey: str, raw: bytes | None) -> Record | None:
        if raw is None:
            return None
        try:
            return decode_record(raw)
        except CorruptRecord:
            # Never unpickle: delete exactly the bytes we saw, if still there.
            self._call(self._cas, keys=[rkey], args=[raw, "", 0, 2**62])
            hashed = hashed_id(rkey[len(self._session_prefix) :])
            log.warning("corrupt session %s (%d bytes) deleted from Redis; the client starts afresh", hashed, len(raw))
            self.on_corrupt(hashed)
            return None

    def load(self, key: str) -> Record | None:
        rkey = self._key(key)
        return self._decode(rkey, self._call(self.client.get, rkey))

    def update(self, key: str, change: Change, ttl: int) -> Record:
        rkey = self._key(key)
        for _ in range(MAX_ATTEMPTS):
            pipe = self.client.pipeline(transaction=False)
            pipe.get(rkey).time()
            raw, server_time = self._call(pipe.execute)
            current = self._decode(rkey, raw)
            record = change(dict(current) if current else {})
            args = [raw or b"", encode_record(record), ttl * 1000, self._deadline(server_time)]
            done = self._call(self._cas, keys=[rkey], args=args)
            if done == 1:
                return record
            if done == -1:
                raise StorageError("unavailable", "Redis answered too late", 503)
            self.on_contention()
        raise StorageError("contention", "too many concurrent updates of one session", 503)

    def delete(self, key: str) -> None:
        self._call(self.client.delete, self._key(key))

    def increment_global(self, by: int = 1) -> int:
        server_time = self._call(self.client.time)
        value = self._call(self._incr, keys=[self._global], args=[by, self._deadline(server_time)])
        if value is None:
            raise StorageError("unavailable", "Redis answered too late", 503)
        return int(value)

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

        return self._call(collect)

    def check(self) -> None:
        self._call(self.client.set, self.prefix + "healthz", "ok", px=60_000)
