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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

#: The URL schemes Tally reads, for messages.
SCHEMES = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"


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
            return super().discover_master(service_name)  # type: ignore[no-untyped-call]
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


def connect(url: str, timeout: float) -> Target:
    """Return the target that ``url`` names; raise ValueError, naming the fault, for a bad URL."""
    scheme, _, _ = url.partition("://")
    base, _, topology = scheme.lower().partition("+")
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if not topology and base in ("redis", "rediss", "unix"):
        return Target(redis.Redis.from_url(url, retry=no_retries(), **common))
    if base not in ("redis", "rediss") or topology not in ("sentinel", "cluster"):
        raise ValueError(f"a Redis URL starts with {SCHEMES}")

    parts = urlsplit(url)
    nodes = list(_hosts(parts.netloc, 26379 if topology == "sentinel" else 6379))
    segments = [s for s in parts.path.split("/") if s]
    # redis-py parses the credentials, TLS and query arguments, as for one server.
    userinfo = parts.netloc.rpartition("@")[0]
    first, port = nodes[0]
    first = f"[{first}]" if ":" in first else first  # an IPv6 address, bracketed again for redis-py's parser
    single = f"{base}://{userinfo + '@' if userinfo else ''}{first}:{port}?{parts.query}"
    options = {k: v for k, v in parse_url(single).items() if k not in ("host", "port", "db")}  # type: ignore[no-untyped-call]
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True

    if topology == "cluster":
        if segments:
            raise ValueError("a redis+cluster:// URL takes no path: a Cluster has one database")
        return ClusterTarget([ClusterNode(host, port) for host, port in nodes], {**options, **common})  # type: ignore[no-untyped-call]

    if not 1 <= len(segments) <= 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("a redis+sentinel:// URL ends with /SERVICE or /SERVICE/DB")
    db = int(segments[1]) if len(segments) == 2 else 0
    sentinel = _Sentinel(  # type: ignore[no-untyped-call]
        nodes,
        sentinel_kwargs={**options, **common, "retry": no_retries()},
        retry=no_retries(),
        **options,
        **common,
    )
    return Target(sentinel.master_for(segments[0], db=db))  # type: ignore[no-untyped-call]
