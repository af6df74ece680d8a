"""Connecting to Redis by URL: one server, a Sentinel set-up or a Cluster.

The URL forms are those of the ``limits`` library (Flask-Limiter's storage):

* ``redis://[[user]:password@]host:port[/db]``, ``rediss://`` (TLS), ``unix://path``;
* ``redis+sentinel://[[user]:password@]h1:26379,h2:26379/SERVICE[/db]``: the
  primary that the sentinels name, followed when it moves;
* ``redis+cluster://[[user]:password@]h1:7000,h2:7001``: a Redis Cluster.

``rediss+sentinel://`` and ``rediss+cluster://`` are the TLS forms.  The
credentials apply to the data nodes and to the sentinels alike, and query
arguments (``?ssl_ca_certs=...``) mean what they mean to redis-py's own
``from_url``, which parses them: only the list of hosts is read here, because
redis-py reads no Sentinel or Cluster URL itself.

Every client has redis-py's retries turned off.  A command that timed out may
have run; sending it again could count an increment twice.

:data:`leases` keeps the connections that Tally's scripts run on leased from
their pools between commands (see :class:`Leases` for why), and :data:`replies`
waits for a reply a few microseconds awake before it sleeps (see
:class:`ReplyWait`).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool, SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from .awake import spin, waits_through_hub

#: The URL schemes Tally reads, for messages.
SCHEMES = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
#: How long a worker waits awake for a reply before it sleeps on the socket (see :class:`ReplyWait`):
#: long enough for a loaded same-machine Redis (150 µs caught a little more than 50 in A/B runs).
REPLY_SPIN_SECONDS = 100e-6
#: Waits in a row that end without the reply before waiting awake stops, and for how many commands.
REPLY_MISSES = 8
REPLY_REST = 1024


def no_retries() -> Retry:
    """A retry policy that never resends: redis-py 8 retries 10 times by default."""
    return Retry(NoBackoff(), 0)


class Target:
    """Where Tally's commands go: one primary (a server, or Sentinel's choice), or a Cluster.

    :meth:`client_for` returns a plain ``redis.Redis`` for the primary that
    holds a key.  On a Cluster that is the node's own client, so that a
    script and the ``WAIT`` after it travel on one connection, as ``WAIT``
    requires; after a failure, :meth:`refresh` relearns which node holds what.
    """

    #: True for a Cluster, whose scripts may touch keys of one hash slot only.
    cluster: bool = False

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def client_for(self, key: str) -> redis.Redis:
        """The client of the primary that holds ``key``."""
        return self._client

    def primaries(self) -> list[redis.Redis]:
        """A client for each primary, for scans and settings."""
        return [self._client]

    def refresh(self) -> None:
        """Relearn the layout after a failure; Sentinel's pool asks the sentinels by itself."""

    def close(self) -> None:
        """Close every connection."""
        self._client.close()


class ClusterTarget(Target):
    """A Redis Cluster, its client made on first use.

    redis-py's ``RedisCluster`` connects when it is made.  Made lazily, a
    Cluster that is down when Tally starts makes requests answer 503 until it
    is back, rather than stopping the workers from booting.
    """

    cluster = True

    def __init__(self, nodes: list[ClusterNode], kwargs: dict[str, Any]) -> None:
        self._nodes = nodes
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None

    @property
    def client(self) -> RedisCluster:
        """The cluster client, made on first use."""
        if self._cluster is None:
            with self._lock:
                if self._cluster is None:
                    # Retries off at the cluster level too: its default retries a
                    # timed-out command on the new topology, which may run it twice.
                    self._cluster = RedisCluster(startup_nodes=self._nodes, retry=no_retries(), **self._kwargs)
        return self._cluster

    def client_for(self, key: str) -> redis.Redis:
        cluster = self.client
        return cluster.get_redis_connection(cluster.get_node_from_key(key))  # type: ignore[no-untyped-call]

    def primaries(self) -> list[redis.Redis]:
        cluster = self.client
        return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]  # type: ignore[no-untyped-call]

    def refresh(self) -> None:
        if self._cluster is not None:
            # What redis-py itself does after a node fails; concurrent calls are merged.
            self._cluster.nodes_manager.initialize()

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()


class _Sentinel(Sentinel):
    """redis-py's Sentinel client, which says so when the sentinels refuse our credentials.

    redis-py's ``discover_master`` keeps only the text of each sentinel's error and raises
    MasterNotFoundError, which reads as "no primary is known (a failover?)": no failover ends a
    wrong password.  On that failure path only, each sentinel is asked once more (PING), and a
    refusal is raised as itself, from the MasterNotFoundError.
    """

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError as exc:
            for sentinel in self.sentinels:
                try:
                    sentinel.ping()
                except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as refused:
                    raise refused from exc
                except redis.RedisError:
                    continue
            raise


def _hosts(netloc: str, default_port: int) -> Iterator[tuple[str, int]]:
    for item in netloc.rpartition("@")[2].split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or "]" in port:  # no port, or a bare IPv6 address
            host, port = item.strip(), str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not a host:port")
        yield host, int(port)


@dataclass(frozen=True)
class Topology:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL (or its ``rediss+`` form), read."""

    #: ``sentinel`` or ``cluster``.
    kind: str
    #: The sentinels, or the Cluster's startup nodes.
    nodes: list[tuple[str, int]]
    #: The credentials, TLS and query arguments, as redis-py reads them from one server's URL.
    options: dict[str, Any]
    #: Sentinel's name for the primary, and its database; a Cluster has neither.
    service: str = ""
    db: int = 0

    @property
    def hosts(self) -> str:
        """The nodes as a URL lists them: ``host:port,...``, an IPv6 address in brackets."""
        return ",".join(_address(host, port) for host, port in self.nodes)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def topology(url: str) -> Topology | None:
    """Read a Sentinel or Cluster URL; None for one server's, which redis-py's ``from_url`` reads whole.

    Raise ValueError, naming the fault, for a bad URL.
    """
    scheme, _, _ = url.partition("://")
    base, _, kind = scheme.lower().partition("+")
    if not kind and base in ("redis", "rediss", "unix"):
        return None
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(f"a Redis URL starts with {SCHEMES}")

    parts = urlsplit(url)
    nodes = list(_hosts(parts.netloc, 26379 if kind == "sentinel" else 6379))
    segments = [s for s in parts.path.split("/") if s]
    # redis-py parses the credentials, TLS and query arguments, as for one server.
    userinfo = parts.netloc.rpartition("@")[0]
    # The first node, an IPv6 address bracketed again for redis-py's parser.
    single = f"{base}://{userinfo + '@' if userinfo else ''}{_address(*nodes[0])}?{parts.query}"
    options = {k: v for k, v in parse_url(single).items() if k not in ("host", "port", "db")}  # type: ignore[no-untyped-call]
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True

    if kind == "cluster":
        if segments:
            raise ValueError("a redis+cluster:// URL takes no path: a Cluster has one database")
        return Topology(kind, nodes, options)
    if not 1 <= len(segments) <= 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("a redis+sentinel:// URL ends with /SERVICE or /SERVICE/DB")
    return Topology(kind, nodes, options, segments[0], int(segments[1]) if len(segments) == 2 else 0)


def connect(url: str, timeout: float) -> Target:
    """Return the target that ``url`` names; raise ValueError, naming the fault, for a bad URL."""
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    read = topology(url)
    if read is None:
        return Target(redis.Redis.from_url(url, retry=no_retries(), **common))
    if read.kind == "cluster":
        return ClusterTarget([ClusterNode(host, port) for host, port in read.nodes], {**read.options, **common})  # type: ignore[no-untyped-call]
    sentinel = _Sentinel(
        read.nodes,
        sentinel_kwargs={**read.options, **common, "retry": no_retries()},
        retry=no_retries(),
        **read.options,
        **common,
    )
    return Target(sentinel.master_for(read.service, db=read.db))


class Leases:
    """Connections kept leased from redis-py's pools between commands: a stack of idle ones per pool.

    Written by hand because redis-py's pool costs as much as the rest of a
    command's client-side work.  ``ConnectionPool.get_connection`` and
    ``release`` took 5 µs a command in one process (a deprecation wrapper,
    four observability records, two lock round trips) and 17 µs under gevent;
    the stack and the one check kept from them take 1 µs and 4 µs.  A leased
    connection stays counted as in use by its pool, and comes back here after
    each command that went cleanly.

    The pool's check before lending still applies (``can_read``, or under
    gevent the same check made as a read): nothing may be waiting, and the
    connection must not have been closed by Redis (an idle timeout,
    ``CLIENT KILL``, a restart, or Sentinel demoting the old primary, which
    closes its clients); otherwise it goes back to the pool, disconnected,
    and the pool lends another.  A command that fails ends its connection's
    lease and the idle ones of its pool (see :meth:`drop`).  A forked child
    starts with no leases: the parent's sockets are the parent's.
    """

    def __init__(self) -> None:
        self._idle: weakref.WeakKeyDictionary[ConnectionPool, deque[Connection]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def _taken(self, pool: ConnectionPool) -> Iterator[Connection]:
        """The pool's idle leases, each taken off the stack as it is reached, newest first."""
        idle = self._idle.get(pool)
        while idle:
            try:
                yield idle.pop()
            except IndexError:  # another thread took the last one
                return

    def take(self, pool: ConnectionPool) -> Connection:
        """An idle leased connection that is ready for a command, or a new lease from ``pool``."""
        ready = _reads_nothing if waits_through_hub() else _polls_nothing
        for connection in self._taken(pool):
            if ready(connection):
                return connection
            self.drop(pool, connection)
        return pool.get_connection()

    def give_back(self, pool: ConnectionPool, connection: Connection) -> None:
        """Keep ``connection``, which has just finished a command cleanly, for the next one."""
        idle = self._idle.get(pool)
        if idle is None:
            with self._lock:
                idle = self._idle.setdefault(pool, deque())
        idle.append(connection)

    def drop(self, pool: ConnectionPool, connection: Connection, *, failed: bool = False) -> None:
        """End the lease of a connection that must not serve again as it is.

        After a failed command, the pool's idle leases end too: the failure may
        be a failover, and the pool finds the new primary with the next
        connection it makes, where a kept lease would go on talking to the old
        one (and wait out a timeout, if it hangs).
        """
        connection.disconnect()  # type: ignore[no-untyped-call]
        pool.release(connection)
        if failed:
            for idle in self._taken(pool):
                self.drop(pool, idle)

    def forget(self) -> None:
        """Forget every lease, without touching its socket (after a fork: they are the parent's)."""
        self._idle = weakref.WeakKeyDictionary()


class ReplyWait:
    """Wait for a command's reply awake, for up to :data:`REPLY_SPIN_SECONDS`, before sleeping on the socket.

    A Redis on the same machine answers within tens of microseconds, less than
    a sleeping worker takes to be woken (see :mod:`.awake`).  The worker polls
    with redis-py's own ``can_read(timeout=0)``, which keeps whatever it reads
    for the reply.  Neither the kernel (busy polling is for network cards, not
    loopback) nor redis-py waits this way.

    It adapts, as glibc's adaptive mutexes do: after :data:`REPLY_MISSES`
    waits in a row that ended without the reply (a Redis across a network, or
    one that hangs), it stops for :data:`REPLY_REST` commands, then tries
    again; a remote Redis so costs under 1 µs a command.  Under gevent it
    never polls.
    """

    def __init__(self) -> None:
        #: Waits in a row that ended without the reply; commands left to send before waiting awake again.
        self._misses = 0
        self._rest = 0

    def wait(self, connection: Connection) -> None:
        """Return once ``connection`` has its reply waiting, or when waiting awake has stopped paying."""
        if waits_through_hub():
            return
        if self._rest:
            # Counted without a lock: threads that race here only make the rest a little shorter.
            self._rest -= 1
        elif spin(lambda: bool(connection.can_read(timeout=0)), REPLY_SPIN_SECONDS):
            self._misses = 0
        else:
            self._misses += 1
            if self._misses >= REPLY_MISSES:
                self._misses, self._rest = 0, REPLY_REST

    def forget(self) -> None:
        """Start afresh in a forked child."""
        self._misses, self._rest = 0, 0


def _polls_nothing(connection: Connection) -> bool:
    """The pool's own check before lending: nothing waiting, and not closed by Redis."""
    try:
        return not connection.can_read()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _reads_nothing(connection: Connection) -> bool:
    """The same check, as a read that may not wait: for gevent, whose ``select.poll`` goes through its hub.

    There ``can_read`` took 11 µs and a switch to the hub and back; this read
    fails at once (4 µs).  Nothing to read and the socket open is a timeout; a
    closed socket is a ConnectionError; a reply that nobody waits for means the
    connection is out of step.
    """
    try:
        connection.read_response(timeout=0, disconnect_on_error=False)
    except redis.TimeoutError:
        return True
    except (redis.RedisError, OSError):
        return False
    return False


#: The leases of this process.
leases = Leases()
os.register_at_fork(after_in_child=leases.forget)
#: How this process waits for its replies.
replies = ReplyWait()
os.register_at_fork(after_in_child=replies.forget)
