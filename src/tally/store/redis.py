"""Sessions and the global counter in Redis (or Valkey): one server, Sentinel or Cluster.

A session is a hash: each field holds one session key's value as JSON, and the
field ``_v`` counts writes.  A JSON integer is also Redis's integer text, so
``HINCRBY`` adds to the counter in place, exactly over all of int64 (Lua's
numbers are doubles and could not), in one round trip and without retries.
Any other change is a compare-and-set on ``_v``.

A session's key is ``<prefix>session:<sha256 of its id>``: whoever can list
the keys learns no cookie.  Each script touches that one key, so on a Cluster
it runs on the one primary that holds the key's slot.  Sessions stored by
earlier versions under the raw id are renamed to the hashed key on first use
(one server or Sentinel; earlier versions had no Cluster), or all at once by
``flask sessions migrate``.

Everything goes through redis-py's public API: its connection pools (whose
connections the scripts keep leased between commands, ``redis_connect.Leases``),
its timeouts (which gevent's sockets honour without blocking other greenlets),
registered scripts and pipelines; the ``hiredis`` parser speeds it up when
installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, TypeVar

import redis
import redis.connection
from redis import exceptions as rx
from redis.sentinel import MasterNotFoundError

from .awake import let_others_run, waits_through_hub
from .base import Change, CorruptRecord, OutOfRange, PruneReport, Record, Stats, StorageError, Store, hashed_id
from .group import GroupCommit, Job
from .redis_connect import Target, connect, leases, replies

#: hiredis's packer of one command; None without hiredis (it is in the redis extra), and redis-py packs.
_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack_command

    _pack_command = _hiredis_pack_command
except ImportError:
    _pack_command = None

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Script:
    text: str

    @cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()


# Each script first checks a deadline in the server's own clock.  A client
# that times out answers 503, but its command may still sit in the socket
# buffer of a stalled (SIGSTOPped, swapping) Redis and run when it wakes; the
# deadline turns such a late write into a no-op, so nothing happens that was
# reported as not having happened.  (A test that SIGSTOPs Redis catches it.)
# Then, where the caller passed a second key (a session's key under the old
# layout), a session stored there moves to the first key, TTL and all.
_PREAMBLE = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[1]) then return {err = 'TALLY_LATE'} end
if KEYS[2] and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[1])
end
"""

# KEYS[1] session (KEYS[2] its old key); ARGV: deadline, field, by, ttl ms, create (1/0).
_ADD = _Script(
    _PREAMBLE
    + """
if ARGV[5] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], '_v', 1)
redis.call('HSET', KEYS[1], '_w', t[1])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
-- Read back as a string: an integer reply becomes a Lua double, inexact past 2^53.
return redis.call('HGET', KEYS[1], ARGV[2])
"""
)

# KEYS[1] session (KEYS[2] its old key); ARGV: deadline, expected _v ('' = absent), ttl ms, then field, value pairs.
_CAS = _Script(
    _PREAMBLE
    + """
if (redis.call('HGET', KEYS[1], '_v') or '') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], '_v', (tonumber(ARGV[2]) or 0) + 1, '_w', t[1], unpack(ARGV, 4))
  if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
end
return 1
"""
)

# KEYS[1] session (KEYS[2] its old key); ARGV: deadline.  Reads through the move.
_LOAD = _Script(_PREAMBLE + "return redis.call('HGETALL', KEYS[1])")

# KEYS[1] global counter; ARGV: deadline, by.
_INCR = _Script(_PREAMBLE + "redis.call('INCRBY', KEYS[1], ARGV[2]) return redis.call('GET', KEYS[1])")

#: Give up on a same-session compare-and-set after this many conflicts in a row.
MAX_ATTEMPTS = 1000
#: How often to measure the offset between our clock and Redis's.
CLOCK_CHECK_SECONDS = 5.0
#: How often /healthz asks Redis for its settings again.
WARNINGS_SECONDS = 60.0
#: Eviction policies that never delete a key Tally wrote.  Every session has a
#: TTL, so the volatile-* policies would evict them as readily as allkeys-*.
SAFE_EVICTION = {"noeviction"}
_HASHED = re.compile(r"[0-9a-f]{64}")

_MAYBE = "this change may or may not have been applied"


#: What redis-py raises: its errors, and a Cluster's own complaints (no node reachable, a slot unserved).
Failure = (redis.RedisError, rx.RedisClusterException)


_REFUSALS = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, Redis refusing our credentials.

    A Cluster client that no startup node would let in raises RedisClusterException
    *from* the AuthenticationError; the cause says what went wrong.
    """
    seen: BaseException | None = exc
    for _ in range(10):  # bounded: a cause chain is short, and could loop
        if seen is None:
            return False
        if isinstance(seen, _REFUSALS):
            return True
        seen = seen.__cause__
    return False


def _translate(exc: Exception) -> Exception:
    text = str(exc)
    if _refused(exc):
        return StorageError("permission", "Redis refused our credentials", 503)
    # MOVED (an AskError), ASK, TRYAGAIN and CLUSTERDOWN: redis-py's parser turns
    # the reply's first word into the class, so the text no longer starts with it.
    if isinstance(exc, rx.AskError | rx.TryAgainError | rx.ClusterDownError):
        return StorageError("unavailable", "the Redis Cluster is changing; try again shortly", 503)
    if isinstance(exc, rx.ResponseError):
        if "TALLY_LATE" in text:
            return StorageError("unavailable", "Redis answered too late", 503)
        if "overflow" in text:
            return OutOfRange("the counter would leave the signed 64-bit range")
        if text.startswith("NOREPLICAS"):
            return StorageError("not_replicated", "Redis refused the write: too few replicas follow it", 503)
    if isinstance(exc, rx.OutOfMemoryError):
        return StorageError("redis_oom", "Redis is out of memory", 503)
    if isinstance(exc, rx.ReadOnlyError):
        return StorageError("read_only", "Redis is read-only (a replica?)", 503)
    if isinstance(exc, MasterNotFoundError):
        return StorageError("unavailable", "no Redis primary is known (a failover?)", 503)
    if isinstance(exc, rx.TimeoutError):
        return StorageError("unavailable", "Redis did not answer in time", 503)
    if isinstance(exc, rx.ConnectionError | rx.ClusterError | rx.RedisClusterException):
        return StorageError("unavailable", "Redis is unreachable", 503)
    return StorageError("redis_error", f"Redis failed: {exc}", 503)


#: Fields of ours in a session's hash: the write count, and when it was last written (Redis's clock, s).
_BOOKKEEPING = frozenset({b"_v", b"_w"})


def _packed(connection: redis.connection.Connection, commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """The commands in Redis's protocol, as one write.

    With hiredis, by its own ``pack_command``: since redis-py 8.2 the
    connection's packer first runs every argument through redis-py's encoder
    in Python, which took an EVALSHA of Tally's from 3.2 to 6.9 µs to pack
    (hiredis alone: 0.9 µs).  hiredis encodes a str, an int or bytes itself,
    as the encoder does (UTF-8 for text), and Tally's arguments are only these.
    """
    if _pack_command is None:
        packed: list[bytes] = connection.pack_commands(commands)  # type: ignore[no-untyped-call]
        return packed
    return [b"".join([_pack_command(command) for command in commands])]


class _Commands(Job):
    """One caller's commands for one Redis, and their replies."""

    __slots__ = ("commands", "replies")

    def __init__(self, commands: tuple[tuple[Any, ...], ...]) -> None:
        super().__init__()
        self.commands = commands
        self.replies: list[Any] = []

    def result(self) -> list[Any]:
        """The replies, or raise what stopped the batch."""
        self.raise_error()
        return self.replies


def _unsent(error: BaseException) -> BaseException | None:
    """What the commands queued behind a batch that failed with ``error`` get.

    After a timeout, Redis hangs: they fail unsent, rather than each batch in
    turn waiting out a timeout of its own.  After anything else (a connection
    cut by a failover) they go on, down a new connection.
    """
    if isinstance(error, rx.TimeoutError):
        return StorageError("unavailable", "Redis did not answer in time", 503)
    return None


#: Under gevent, one worker's commands for one Redis (one connection pool)
#: that come while another's are under way are sent after them as one
#: pipeline (:mod:`.group`); a leader first lets the greenlets that are ready
#: run, and those that reach their own commands join its first batch.  A
#: worker then makes one write, one read and one wait in its hub for the lot,
#: and Redis one read and one write, where each request made its own: under
#: gevent's load the CPU is never idle.  Threads are not batched: their waits
#: overlap on connections of their own, and the hand-offs cost more than they
#: saved (sync workers never have two requests).
_pipelines: GroupCommit[_Commands] = GroupCommit(give_up=_unsent, gather=let_others_run)


def _send(client: redis.Redis, *commands: tuple[Any, ...]) -> list[Any]:
    """Send ``commands`` to the client's Redis in one write, and read their replies.

    An error reply comes back in the list as its exception, as a pipeline's
    ``execute(raise_on_error=False)`` gives it.
    """
    if not waits_through_hub():
        return _exchange(client, commands)
    return _pipelines.run(client.connection_pool, _Commands(commands), partial(_commit, client)).result()


def _ends_in_wait(commands: tuple[tuple[Any, ...], ...]) -> tuple[tuple[tuple[Any, ...], ...], tuple[Any, ...] | None]:
    """A job's commands before the ``WAIT`` that ends them, and that ``WAIT`` (None if none does)."""
    if commands[-1][0] == "WAIT":
        return commands[:-1], commands[-1]
    return commands, None


def _commit(client: redis.Redis, batch: list[_Commands]) -> None:
    """Send the commands of ``batch`` as one pipeline, and hand each caller its replies.

    A ``WAIT`` waits for every write made before it on its connection, so
    the jobs' ``WAIT`` goes once, after all the writes (once for each
    distinct one): the replicas confirm the whole batch in one round trip.
    A ``WAIT`` after each job's write would make the next write wait for it,
    with a lagging replica a third of the timeout each, and the later writes late.
    """
    parts = [_ends_in_wait(job.commands) for job in batch]
    waits = list(dict.fromkeys(wait for _, wait in parts if wait is not None))
    answers = _exchange(client, [command for commands, _ in parts for command in commands] + waits)
    waited = dict(zip(waits, answers[len(answers) - len(waits) :], strict=True))
    start = 0
    for job, (commands, wait) in zip(batch, parts, strict=True):
        job.replies = answers[start : start + len(commands)]
        start += len(commands)
        if wait is not None:
            job.replies.append(waited[wait])


def _exchange(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` down one of the client's connections in one write, and read their replies.

    This is what a pipeline does, through redis-py's public API
    (``pack_commands``, ``send_packed_command``, ``read_response``) on a
    connection leased from the client's pool, without the per-command
    bookkeeping of ``execute_command`` (retry wrappers that do not retry here,
    response callbacks that EVALSHA has none of, observability records), which
    cost more CPU than the round trip itself.
    """
    pool = client.connection_pool
    connection = leases.take(pool)
    try:
        connection.send_packed_command(_packed(connection, commands))  # type: ignore[no-untyped-call]
        replies.wait(connection)
        answers: list[Any] = []
        for _ in commands:
            try:
                answers.append(connection.read_response())
            except rx.ResponseError as exc:
                answers.append(exc)
    except BaseException:
        # Timed out or cut off mid-reply: its replies may still arrive, so it
        # must not serve another request (redis-py disconnects it too).
        leases.drop(pool, connection, failed=True)
        raise
    leases.give_back(pool, connection)
    return answers


def _decode(fields: dict[bytes, bytes]) -> Record:
    try:
        return {k.decode(): json.loads(v) for k, v in fields.items() if k not in _BOOKKEEPING}
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(str(exc)) from exc


def _encode(record: Record) -> list[str]:
    return [part for k, v in record.items() for part in (k, json.dumps(v, separators=(",", ":"), allow_nan=False))]


class RedisStore(Store):
    """Each session is one hash with a TTL; the global counter is an integer key."""

    name = "redis"

    def __init__(self, url: str, timeout: float = 2.0, prefix: str = "tally:", replicas: int = 0) -> None:
        if not timeout > 0:  # also refuses NaN
            raise ValueError(f"the Redis timeout must be a positive number of seconds, not {timeout!r}")
        if replicas < 0:
            raise ValueError(f"the number of replicas to wait for must be 0 or more, not {replicas!r}")
        self.target: Target = connect(url, timeout)
        self.timeout = timeout
        #: Replicas that must confirm a write (WAIT) before it is acknowledged.
        self.replicas = replicas
        # The script may run as late as half the timeout from now, and WAIT may
        # then take a third: the reply still comes before the client gives up.
        self._wait_ms = max(1, int(timeout * 1000 / 3))
        self.prefix = prefix
        self._session_prefix = prefix + "session:"
        self._global = prefix + "global"
        self._offsets: dict[int, tuple[int, float]] = {}
        self._warnings: list[str] = []
        self._warned_at = -WARNINGS_SECONDS

    # -- keys ----------------------------------------------------------------

    def _keys(self, key: str) -> list[str]:
        """The session's key, and on a single primary also its key under the old layout."""
        hashed = self._session_prefix + hashlib.sha256(key.encode()).hexdigest()
        # On a Cluster the two would lie in different slots, and no earlier
        # version ran on a Cluster, so there is nothing there to move.
        return [hashed] if self.target.cluster else [hashed, self._session_prefix + key]

    # -- running commands ----------------------------------------------------

    def _on(self, key: str, action: Callable[[redis.Redis], T]) -> T:
        """Run ``action`` on the primary that holds ``key``, translating failures.

        A Cluster's ``MOVED`` or ``ASK`` means the command did not run there:
        relearn the layout and send it once more.  A lost connection may
        mean a failover, so the layout is relearned for the next request.
        """
        for attempt in (1, 2):
            client = self._checked(self.target.client_for, key)
            try:
                return action(client)
            except (rx.MovedError, rx.AskError) as exc:
                self.target.refresh()
                if attempt == 2:
                    raise _translate(exc) from exc
            except (rx.ConnectionError, rx.TimeoutError) as exc:
                self._checked(self.target.refresh)
                raise _translate(exc) from exc
            except Failure as exc:
                raise _translate(exc) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _checked(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except Failure as exc:
            raise _translate(exc) from exc

    def _deadline(self, client: redis.Redis) -> int:
        """The last moment, in this primary's clock (µs), at which a write may still apply.

        Half the timeout from now leaves the reply time to arrive before we
        give up, so an applied write is almost never reported as failed.  The
        offset of Redis's clock from our monotonic one (which no clock step
        here can move) is measured every few seconds for each primary, rather
        than asking Redis the time on every write, which would cost a round trip.
        """
        now = time.monotonic()
        known = self._offsets.get(id(client))
        if known is None or now - known[1] > CLOCK_CHECK_SECONDS:
            if known is not None:
                # Claimed before asking, with no lock held across the round trip:
                # meanwhile, and if Redis does not answer, the other requests go
                # on with the offset they have instead of queueing to ask again.
                self._offsets[id(client)] = (known[0], now)
            sent = time.monotonic()
            # Down a kept connection like the scripts, so that a failure here lets go of the others too.
            (reply,) = _send(client, ("TIME",))
            received = time.monotonic()
            if isinstance(reply, Exception):  # an error reply (an ACL without TIME), raised as redis-py would
                raise reply
            seconds, micros = reply
            known = (int(seconds) * 1_000_000 + int(micros) - int((sent + received) * 500_000), received)
            self._offsets[id(client)] = known
        offset = known[0]
        return int(time.monotonic() * 1_000_000) + offset + int(self.timeout * 500_000)

    def _script(self, script: _Script, keys: list[str], args: list[Any], write: bool = True) -> Any:
        """Run a script on the primary of ``keys[0]``; a write waits for the configured replicas.

        With replicas, the script and ``WAIT`` go down one connection in one
        round trip (since Redis 7, ``WAIT`` inside a script would not wait).
        Whenever the outcome is unknown, the error says so.
        """

        def run(client: redis.Redis) -> Any:
            for _ in (1, 2):
                argv = [self._deadline(client), *args]  # anew after a reload: the first try took time
                command = ("EVALSHA", script.sha, len(keys), *keys, *argv)
                waits = write and self.replicas
                try:
                    if not waits:
                        (result,) = _send(client, command)
                    else:
                        result, acknowledged = _send(client, command, ("WAIT", self.replicas, self._wait_ms))
                except (rx.ConnectionError, rx.TimeoutError) as exc:
                    if not write:
                        raise
                    raise StorageError("unavailable", f"Redis did not answer; {_MAYBE}", 503) from exc
                if isinstance(result, rx.NoScriptError):
                    client.script_load(script.text)  # a restarted, flushed or newly promoted primary
                    continue
                if isinstance(result, Exception):
                    raise result
                if not waits:
                    return result
                if isinstance(acknowledged, Exception) or acknowledged < self.replicas:
                    raise StorageError(
                        "not_replicated", f"fewer than {self.replicas} Redis replicas confirmed the write; {_MAYBE}"
                    )
                return result
            raise StorageError("redis_error", "Redis lost the script as soon as it was loaded")

        try:
            return self._on(keys[0], run)
        except StorageError as exc:
            if exc.kind == "unavailable" and write and _MAYBE in exc.message:
                self._checked(self.target.refresh)
            raise

    # -- the Store interface -------------------------------------------------

    def _fetch(self, key: str) -> tuple[Record | None, str]:
        """Return the live record (None if absent or corrupt) and its version."""
        keys = self._keys(key)
        try:
            flat = self._script(_LOAD, keys, [], write=False)
        except StorageError as exc:
            if "WRONGTYPE" not in exc.message:
                raise
            flat = [b"", b"not a hash"]  # someone else's data under our key: corrupt
        if not flat:
            return None, ""
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        try:
            return _decode(fields), fields.get(b"_v", b"").decode()
        except CorruptRecord:
            # Never unpickle, never guess: delete, and the client starts afresh.
            self._on(keys[0], lambda client: client.delete(keys[0]))
            hashed = hashed_id(key)
            log.warning("corrupt session %s deleted from Redis; the client starts afresh", hashed)
            self.on_corrupt(hashed)
            return None, ""

    def load(self, key: str) -> Record | None:
        return self._fetch(key)[0]

    def add(self, key: str, field: str, by: int, ttl: int, create: bool = True) -> int | None:
        try:
            value = self._script(_ADD, self._keys(key), [field, by, ttl * 1000, int(create)])
        except StorageError as exc:
            if exc.kind != "redis_error":
                raise
            # HINCRBY on a field that is not an integer: repair by the slow path.
            return super().add(key, field, by, ttl, create)
        return None if value is None else int(value)

    def update(self, key: str, change: Change, ttl: int, create: bool = True) -> Record | None:
        keys = self._keys(key)
        for _ in range(MAX_ATTEMPTS):
            current, version = self._fetch(key)
            if current is None and not create:
                return None
            record = change(dict(current) if current else {})
            if self._script(_CAS, keys, [version, ttl * 1000, *_encode(record)]) == 1:
                return record
            self.on_contention()
        raise StorageError("contention", "too many concurrent updates of one session", 503)

    def delete(self, key: str) -> None:
        keys = self._keys(key)
        self._on(keys[0], lambda client: client.delete(*keys))

    def increment_global(self, by: int = 1) -> int:
        return int(self._script(_INCR, [self._global], [by]))

    def read_global(self) -> int:
        return int(self._on(self._global, lambda client: client.get(self._global)) or 0)

    def _session_keys(self, client: redis.Redis) -> Iterator[bytes]:
        return client.scan_iter(match=self._session_prefix + "*", count=1000)

    def stats(self, lifetime: int) -> Stats:
        def collect() -> Stats:
            count = size = 0
            oldest: float | None = None
            for client in self.target.primaries():
                now, _ = client.time()
                for rkey in self._session_keys(client):
                    pipe = client.pipeline(transaction=False)
                    pipe.memory_usage(rkey)
                    pipe.pttl(rkey)
                    pipe.hget(rkey, "_w")
                    usage, pttl, written = pipe.execute()
                    if usage is None or pttl == -2:
                        continue  # expired between SCAN and now
                    count += 1
                    size += usage
                    # Each write records its time: the lifetime it was written
                    # with need not be this process's (cron runs without the
                    # service's environment).  Sessions of older versions
                    # have only their TTL, judged by this lifetime.
                    if written is not None:
                        age = float(now - int(written))
                    elif pttl >= 0 and lifetime:
                        age = lifetime - pttl / 1000
                    else:
                        continue
                    oldest = age if oldest is None else max(oldest, age)
            return Stats(count, size, oldest)

        return self._checked(collect)

    def count(self) -> int:
        return self._checked(lambda: sum(1 for client in self.target.primaries() for _ in self._session_keys(client)))

    def prune(self, lifetime: int, progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
        """Redis expires sessions itself: report what is kept, as ``stats`` counts it."""
        return PruneReport(kept=self.stats(lifetime).sessions)

    def migrate(self, progress: Callable[[int], None] | None = None) -> int:
        """Move every session stored under its raw id to its hashed key; return how many moved."""
        if self.target.cluster:
            return 0
        moved = 0
        try:
            for client in self.target.primaries():
                for rkey in self._session_keys(client):
                    name = rkey.decode(errors="replace")[len(self._session_prefix) :]
                    # The load script's preamble moves it, atomically and under its deadline.
                    if not _HASHED.fullmatch(name) and self._script(_LOAD, self._keys(name), [], write=False):
                        moved += 1
                        if progress:
                            progress(moved)
        except Failure as exc:
            raise _translate(exc) from exc
        return moved

    def check(self) -> None:
        # A write where the key lives (on a Cluster, routed like any key), and
        # a PING to every other primary, which holds other sessions.
        self._on(self.prefix + "healthz", lambda client: client.set(self.prefix + "healthz", "ok", px=60_000))
        self._checked(lambda: [client.ping() for client in self.target.primaries()])

    def warnings(self) -> list[str]:
        """Redis settings that would break Tally's promises, where Redis lets us read them.

        Asked at most once a minute: ``/healthz`` reports them, and may be polled often.
        """
        now = time.monotonic()
        if now - self._warned_at > WARNINGS_SECONDS:
            self._warnings, self._warned_at = self._read_warnings(), now
        return self._warnings

    def _read_warnings(self) -> list[str]:
        found = []
        try:
            for client in self.target.primaries():
                policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
                if policy and policy not in SAFE_EVICTION:
                    found.append(
                        f"Redis maxmemory-policy is {policy}: when memory runs short Redis deletes sessions; "
                        "set it to noeviction"
                    )
        except Failure:
            pass  # CONFIG is often disabled on managed Redis; nothing to say then
        return sorted(set(found))

    def close(self) -> None:
        """Close every connection."""
        self.target.close()
