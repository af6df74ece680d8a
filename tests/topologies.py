"""Real Redis high-availability topologies for the tests: Sentinel and Cluster, on loopback.

Every process is a real ``redis-server`` started from a config file in its own folder, on free
127.0.0.1 ports, so tests can kill, pause and restart nodes as real failures would. Every wait is
bounded in time and in count, and the fixtures at the bottom always stop what they started.

Each node, set-up and cluster may also require a password and speak TLS only (``password=``,
``tls=``): then every link is secured, clients', replication, Sentinel's and the cluster bus alike,
and ``url`` is the ``rediss://`` URL with the password and the CA that Tally needs. The
certificates come from ``trustme``: a CA of the set-up's own, and a server certificate for
127.0.0.1 and localhost, written into the set-up's folder.
"""

from __future__ import annotations

import enum
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
#: Sentinel's down-after-milliseconds. Not 1000: Sentinel pings every min(down-after, 1 s) and
#: sends its first PING to a newly switched-to primary only a ping period after the switch, so
#: at 1000 ms the Sentinels that did not lead a failover briefly see the new primary as down,
#: and two of them at once start a second failover (seen in 2 of 10 runs). Redis's own Sentinel
#: tests use 2000 ms too.
DOWN_AFTER_MS = 2000
#: Cluster's node timeout: a node silent for this long is suspected failing.
NODE_TIMEOUT_MS = 1000
#: The password of the secure fixtures. It holds characters that a URL must percent-encode (and
#: a literal ``%2F``, which a second decoding would turn into ``/``), as generated passwords do.
PASSWORD = "s3cret/p@ss:w%2Frd+"

T = TypeVar("T")


class TopologyError(RuntimeError):
    """A topology did not reach the state a test needs, in time."""


class PortInUse(TopologyError):
    """A server could not listen on the port chosen for it: someone took it meanwhile."""


def redis_server() -> str | None:
    """The ``redis-server`` binary, or None when it is not installed."""
    return shutil.which("redis-server")


def redis_cli() -> str | None:
    """The ``redis-cli`` binary, or None when it is not installed."""
    return shutil.which("redis-cli")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something other than None or False; raise TopologyError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    # Bounded in count as well as in time, whatever the clock does.
    for _ in range(int(max(timeout, 0) / interval) + 2):
        try:
            result = check()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as error:
            # Nodes refuse, time out or answer LOADING / CLUSTERDOWN while they come up: not yet.
            last_error, result = error, None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"; last error: {last_error!r}" if last_error else ""
    raise TopologyError(f"{what}: not within {timeout:g} s{detail}")


def _quote(value: Path | str) -> str:
    # Redis config values may be double-quoted; this keeps folders with spaces working.
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class TLSFiles:
    """A CA's certificate, and a certificate it issued for 127.0.0.1 and localhost with its key (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, folder: Path) -> TLSFiles:
        """Make a new CA and server certificate with ``trustme`` and write them into ``folder``."""
        import trustme  # here, not at the top: only the secure fixtures need it

        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()  # ECDSA keys, made in milliseconds
        # Also a client certificate (trustme's leaves are for both): nodes present it on the links
        # they open (replication, Sentinel, cluster bus), though tls-auth-clients no asks none.
        leaf = ca.issue_cert(HOST, "localhost")
        files = cls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
        ca.cert_pem.write_to_path(str(files.ca_file))
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(str(files.cert_file), append=i > 0)
        leaf.private_key_pem.write_to_path(str(files.key_file))
        return files

    def config(self) -> list[str]:
        """The config lines for a node's certificate, its CA, and TLS on the replication and Sentinel links.

        ``port 0`` and ``tls-port`` come on top (see ``RedisNode``), and ``tls-cluster yes`` for
        cluster nodes. Clients need no certificate of their own: ``tls-auth-clients no``.
        """
        return [
            f"tls-cert-file {_quote(self.cert_file)}",
            f"tls-key-file {_quote(self.key_file)}",
            f"tls-ca-cert-file {_quote(self.ca_file)}",
            "tls-auth-clients no",
            "tls-replication yes",
        ]

    def client_options(self) -> dict[str, Any]:
        """redis-py's options for a client that trusts this CA (and checks the host name)."""
        return {"ssl": True, "ssl_ca_certs": str(self.ca_file), "ssl_cert_reqs": "required"}


class _Own(enum.Enum):
    OWN = "own"


#: "As the node or set-up itself is", for ``url_with``.
OWN: Final = _Own.OWN


def make_url(
    topology: str,
    addresses: Sequence[str],
    path: str = "",
    *,
    password: str | None = None,
    tls: TLSFiles | None = None,
    ca: bool = True,
    query: str = "",
) -> str:
    """A Tally Redis URL: ``redis`` or ``rediss``, then ``topology`` ("", "+sentinel", "+cluster").

    The password is percent-encoded; with ``tls`` and ``ca``, ``ssl_ca_certs`` names its CA; ``query``
    (``name=value&...``) comes after that.
    """
    scheme = ("rediss" if tls else "redis") + topology
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    args = [f"ssl_ca_certs={quote(str(tls.ca_file))}"] if tls and ca else []
    args += [query] if query else []
    return f"{scheme}://{auth}{','.join(addresses)}{path}" + ("?" + "&".join(args) if args else "")


Settings = Sequence[str] | Callable[[], Sequence[str]]


class RedisNode:
    """One ``redis-server`` process (a data node, or a Sentinel) with its config, data and log in ``folder``.

    ``settings`` are extra config lines, or a function giving them when the config is first
    written (at the first start), so that they can name ports of nodes started before this one.

    With ``password``, clients must authenticate (``requirepass``), and a data node gives it to its
    primary (``masterauth``; all the nodes of a set-up share it), a Sentinel to the other Sentinels
    (``sentinel sentinel-pass``). With ``tls``, it listens with TLS only: ``port`` is its
    ``tls-port``, and its replication, cluster-bus and Sentinel links are TLS too.
    """

    def __init__(
        self,
        folder: Path,
        *,
        settings: Settings = (),
        sentinel: bool = False,
        cluster: bool = False,
        port: int = 0,
        password: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.folder = folder
        self.sentinel = sentinel
        self.cluster = cluster
        self.password = password
        self.tls = tls
        self._settings = settings
        # A port given by the caller may be named in other nodes' configs: it never changes. One
        # chosen here may be taken by another process before the server binds it: the first
        # start then picks another.
        self._port_given = bool(port)
        self.port = port or free_port()
        #: The cluster bus port; set explicitly, as the default port + 10000 can exceed 65535.
        self.bus_port = free_port() if cluster else 0
        self.config_file = folder / ("sentinel.conf" if sentinel else "redis.conf")
        self.log_file = folder / ("sentinel.log" if sentinel else "redis.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._config_written = False
        self._ever_ready = False

    def __repr__(self) -> str:
        kind = "sentinel" if self.sentinel else "redis"
        state = ("paused" if self.paused else "running") if self.running else "stopped"
        return f"<{kind} {HOST}:{self.port} {state}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; secured, ``rediss://:PASSWORD@127.0.0.1:PORT/0?ssl_ca_certs=CA``."""
        return self.url_with()

    def url_with(
        self, *, password: str | _Own | None = OWN, tls: bool | _Own = OWN, ca: bool = True, query: str = ""
    ) -> str:
        """This node's URL with another password (None: none), with TLS or not, with or without the CA."""
        return make_url(
            "",
            [self.address],
            "/0",
            password=self.password if password is OWN else password,
            tls=self.tls if tls is OWN or tls else None,
            ca=ca,
            query=query,
        )

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive (perhaps paused)."""
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        lines = [
            # With TLS only, no plain port: ``port`` is the tls-port.
            f"port {0 if self.tls else self.port}",
            f"bind {HOST}",
            f"dir {_quote(self.folder)}",
            f"logfile {_quote(self.log_file)}",
        ]
        if self.tls:
            lines += [f"tls-port {self.port}", *self.tls.config()]
            if self.cluster:
                lines.append("tls-cluster yes")
        if self.password is not None:
            lines.append(f"requirepass {_quote(self.password)}")
            # A Sentinel gives sentinel-pass to the other Sentinels. Without it, Redis 7.0 falls back on
            # requirepass (checked: they still ping each other fine); said explicitly all the same.
            lines.append(
                f"sentinel sentinel-pass {_quote(self.password)}"
                if self.sentinel
                else f"masterauth {_quote(self.password)}"
            )
        if not self.sentinel:
            lines += [
                "appendonly yes",
                'save ""',
                # Through a file, not a socket: a diskless sync waits 5 s for more replicas, and
                # then the master streams nothing to the replica (WAIT counts it out) until its
                # first REPLCONF ACK, up to 1 s later.
                "repl-diskless-sync no",
            ]
        if self.cluster:
            lines += ["cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-port {self.bus_port}"]
        extra = self._settings() if callable(self._settings) else self._settings
        self.config_file.write_text("\n".join([*lines, *extra]) + "\n")
        self._config_written = True

    def spawn(self) -> None:
        """Start the process without waiting for it to answer (see ``start``)."""
        if self.running:
            raise TopologyError(f"{self!r} is already running")
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written once only: Sentinel and REPLICAOF ... CONFIG REWRITE change the file, and a
        # restart must keep what they wrote, as a real restart would.
        if not self._config_written:
            self._write_config()
        command = [redis_server() or "redis-server", str(self.config_file)]
        if self.sentinel:
            command.append("--sentinel")
        # Errors before the logfile is open (a bad config) go to stderr: keep them too.
        with (self.folder / "stderr.log").open("ab") as out:
            self.proc = subprocess.Popen(command, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT)
        self.paused = False

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the process answers PING; raise with the log's tail if it does not."""
        deadline = time.monotonic() + timeout
        for _attempt in range(3):
            if self._wait_ping(deadline):
                self._ever_ready = True
                return
            if not self.running and not self._ever_ready and "already in use" in self.log_tail(3):
                if self._port_given:
                    raise PortInUse(f"{self!r}: port taken:\n{self.log_tail(3)}")
                self.port = free_port()
                self.bus_port = free_port() if self.cluster else 0
                self._write_config()
                self.spawn()
                continue
            break
        self.kill()
        raise TopologyError(f"{self!r} did not answer PING within {timeout:g} s:\n{self.log_tail()}")

    def _wait_ping(self, deadline: float) -> bool:
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            for _ in range(1000):
                if not self.running or time.monotonic() > deadline:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not listening yet, or still loading its AOF
                time.sleep(0.02)
        return False

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it answers PING."""
        self.spawn()
        self.wait_ready(timeout)

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same config, port and data (stopping it first if it still runs)."""
        self.stop()
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the process and reap it: a crash, with nothing flushed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # works on a stopped process too
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the process: it keeps its sockets but answers nothing."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def terminate(self) -> None:
        """Ask the process to shut down (SIGCONT first, or a paused one would never act on it)."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully (SIGTERM, repeated if need be), then SIGKILL if still running after ``timeout``."""
        stop_all([self], timeout)

    def client(self, **overrides: Any) -> redis.Redis:
        """A client for this node: short timeouts and no retries, so a failure shows at once.

        A secured node's client has its password and trusts its CA (override ``password`` or
        ``ssl`` to do otherwise).
        """
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            # redis-py 8 retries 10 times with backoff by default, which would hide failures.
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
            "password": self.password,
            **(self.tls.client_options() if self.tls else {}),
        }
        options.update(overrides)
        return redis.Redis(**options)

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section`` as redis-py parses it."""
        with self.client() as client:
            return dict(client.info(section))

    def role(self) -> str:
        """``master``, ``slave`` or ``sentinel``, as ``ROLE`` answers."""
        with self.client() as client:
            return str(client.execute_command("ROLE")[0])

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (and of its stderr)."""
        text = ""
        for path in (self.folder / "stderr.log", self.log_file):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def stop_all(nodes: Sequence[RedisNode], timeout: float = 10.0) -> None:
    """Stop all nodes at once: SIGCONT and SIGTERM each, wait, then SIGKILL the stragglers."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.terminate()
    for attempt in range(int(timeout / 0.1) + 1):
        alive = [node for node in nodes if node.running]
        if not alive or time.monotonic() >= deadline:
            break
        if attempt % 3 == 2:
            # Redis drops a SIGTERM it cannot act on at that moment ("Writing initial AOF, can't
            # exit" just after a replica's full sync): ask again rather than wait for nothing.
            for node in alive:
                node.terminate()
        time.sleep(0.1)
    for node in nodes:
        node.kill()  # reaps the exited ones too, so no zombie and no ResourceWarning


def replication_online(node: RedisNode) -> list[int]:
    """The ports of the replicas ``node`` streams to now (INFO replication, state=online)."""
    replication = node.info("replication")
    if replication["role"] != "master":
        return []
    slaves = [replication.get(f"slave{i}", {}) for i in range(int(replication.get("connected_slaves", 0)))]
    return [int(slave["port"]) for slave in slaves if slave.get("state") == "online"]


def lag_then_kill_primary(
    primary: RedisNode, replicas: Sequence[RedisNode], lag_seconds: float = 0.5, *, detection_ms: int = DOWN_AFTER_MS
) -> float:
    """Make ``replicas`` fall behind ``primary`` for ``lag_seconds``, then SIGKILL it; return when it died.

    On loopback a replica is microseconds behind, so a bare kill -9 almost never loses a write.
    This is the slow network instead: the replicas are stopped (SIGSTOP), their replication links
    are cut on the primary (stopped, they cannot reconnect), the primary goes on taking writes the
    replicas never see, and dies. The replicas are resumed after, holding what they had received
    before the cut (what was already in their socket buffers included); Sentinel or Cluster then
    promotes one of them. WAIT cannot count a stopped replica, so no write WAIT acknowledged is in
    the lost part.

    ``lag_seconds`` must stay well under the failure detection time ``detection_ms`` (Sentinel's
    down-after-milliseconds, Cluster's node timeout), or the stopped replicas are judged down too.
    Sentinel still promotes such a replica because it skips only those silent for 5 s, with INFO
    older than 5 s, or with a link down for over ten times down-after-milliseconds; Cluster does
    because of ``cluster-replica-validity-factor 0``.
    """
    if lag_seconds * 1000 > detection_ms * 0.6:
        raise ValueError(f"lag_seconds={lag_seconds} is too close to the failure detection time ({detection_ms} ms)")
    if not replicas:
        raise ValueError("no replicas to make lag")
    for replica in replicas:
        replica.pause()
    try:
        with primary.client() as client:
            cut = int(client.client_kill_filter(_type="replica"))
        if cut < len(replicas):
            raise TopologyError(f"cut {cut} replication links on {primary!r}, expected {len(replicas)}")
        time.sleep(lag_seconds)
        primary.kill()
        return time.monotonic()
    finally:
        for replica in replicas:
            replica.resume()


# -- Sentinel -----------------------------------------------------------------


def _flags(state: dict[str, Any]) -> set[str]:
    # redis-py hands Sentinel's flags over as the raw "slave,s_down,disconnected" string.
    return set(str(state["flags"]).split(","))


class SentinelSetup:
    """One primary, two replicas and three Sentinels (quorum 2) watching them as ``service``.

    With ``password``, the data nodes and the Sentinels all require it, and the Sentinels give it to
    the data nodes (``sentinel auth-pass``) and to each other: one URL's credentials serve both, as
    Tally's ``redis+sentinel://`` URL has them. With ``tls``, data nodes and Sentinels listen with TLS
    only and talk TLS to each other.
    """

    def __init__(
        self,
        folder: Path,
        service: str = "tally",
        down_after_ms: int = DOWN_AFTER_MS,
        failover_timeout_ms: int = 5000,
        *,
        password: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.folder = folder
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.tls = tls
        primary = RedisNode(folder / "data-0", password=password, tls=tls)
        replicas = [
            # Written when they start, after the primary: its port is final by then.
            RedisNode(
                folder / f"data-{i}",
                settings=lambda: [f"replicaof {HOST} {primary.port}"],
                password=password,
                tls=tls,
            )
            for i in (1, 2)
        ]
        self.nodes = [primary, *replicas]
        #: The primary as last seen (``current_primary`` and ``wait_for_failover`` update it).
        self.primary = primary
        #: Made in ``start``, when the data nodes' ports are final.
        self.sentinels: list[RedisNode] = []
        self._all_sentinels: list[RedisNode] = []

    @property
    def replicas(self) -> list[RedisNode]:
        """The data nodes other than the last known primary (a killed one included)."""
        return [node for node in self.nodes if node is not self.primary]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/SERVICE``.

        Secured: ``rediss+sentinel://:PASSWORD@.../SERVICE?ssl_ca_certs=CA``.
        """
        return self.url_with()

    def url_with(
        self, *, password: str | _Own | None = OWN, tls: bool | _Own = OWN, ca: bool = True, query: str = ""
    ) -> str:
        """The URL with another password (None: none), with TLS or not, with or without the CA."""
        return make_url(
            "+sentinel",
            [s.address for s in self.sentinels],
            f"/{self.service}",
            password=self.password if password is OWN else password,
            tls=self.tls if tls is OWN or tls else None,
            ca=ca,
            query=query,
        )

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels as (host, port) pairs, as ``redis.sentinel.Sentinel`` takes them."""
        return [(HOST, s.port) for s in self.sentinels]

    def _make_sentinels(self, attempt: int) -> list[RedisNode]:
        ids = [uuid.uuid4().hex + uuid.uuid4().hex[:8] for _ in range(3)]
        ports = [free_port() for _ in range(3)]
        sentinels = []
        for i, (myid, port) in enumerate(zip(ids, ports, strict=True)):
            name = self.service
            settings = [
                f"sentinel myid {myid}",
                f"sentinel monitor {name} {HOST} {self.primary.port} 2",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            if self.password is not None:
                settings.append(f"sentinel auth-pass {name} {_quote(self.password)}")
            # Told up front about the replicas and each other, the Sentinels need not wait for the
            # primary's INFO (every 10 s) and each other's hello messages (every 2 s) to find them.
            settings += [f"sentinel known-replica {name} {HOST} {node.port}" for node in self.replicas]
            settings += [
                f"sentinel known-sentinel {name} {HOST} {other_port} {other_id}"
                for other_id, other_port in zip(ids, ports, strict=True)
                if other_port != port
            ]
            folder = self.folder / (f"sentinel-{i}" if not attempt else f"sentinel-{i}-retry{attempt}")
            sentinels.append(
                RedisNode(folder, port=port, sentinel=True, settings=settings, password=self.password, tls=self.tls)
            )
        return sentinels

    def start(self, timeout: float = 20.0) -> None:
        """Start every process; return once replicas are linked and each Sentinel knows all the others."""
        deadline = time.monotonic() + timeout
        self.primary.start(timeout)
        for node in self.replicas:
            node.spawn()
        for node in self.replicas:
            node.wait_ready(deadline - time.monotonic())
        self.wait_for_replicas(2, deadline - time.monotonic())
        for attempt in range(3):
            # The Sentinels name each other's ports: if one is taken, all three get new ones.
            self.sentinels = self._make_sentinels(attempt)
            self._all_sentinels += self.sentinels
            for sentinel in self.sentinels:
                sentinel.spawn()
            try:
                for sentinel in self.sentinels:
                    sentinel.wait_ready(deadline - time.monotonic())
            except PortInUse:
                stop_all(self.sentinels)
                continue
            break
        else:
            raise TopologyError("no free ports for the Sentinels after 3 attempts")
        for sentinel in self.sentinels:
            wait_for(
                lambda sentinel=sentinel: self._sentinel_ready(sentinel),  # type: ignore[misc]
                deadline - time.monotonic(),
                f"{sentinel!r} to see {self.primary!r} up, 2 replicas and 2 Sentinels, all reachable",
            )

    def _sentinel_ready(self, sentinel: RedisNode) -> bool:
        with sentinel.client() as client:
            master = client.sentinel_master(self.service)
            replicas = client.sentinel_slaves(self.service)
            others = client.sentinel_sentinels(self.service)
        # Healthy ones only: a "disconnected" or "s_down" peer could not vote, be promoted or be told.
        healthy = [r for r in replicas if _flags(r) == {"slave"} and r.get("master-link-status") == "ok"]
        linked = [s for s in others if _flags(s) == {"sentinel"}]
        up = _flags(master) == {"master"} and int(master["port"]) == self.primary.port
        return up and len(healthy) == 2 and len(linked) == 2

    def stop(self) -> None:
        """Stop every process, paused or not (Sentinels first, so they start no failover meanwhile)."""
        stop_all(self._all_sentinels)
        stop_all(self.nodes)

    def node_at(self, port: int) -> RedisNode:
        """The data node listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise TopologyError(f"no data node on port {port}")

    def _masters(self) -> list[dict[str, Any]]:
        """``SENTINEL MASTER service`` from each Sentinel that answers."""
        states = []
        for sentinel in self.sentinels:
            if not sentinel.running or sentinel.paused:
                continue
            try:
                with sentinel.client(socket_timeout=0.5) as client:
                    states.append(dict(client.sentinel_master(self.service)))
            except (redis.ConnectionError, redis.TimeoutError):
                continue
        return states

    def current_primary(self) -> RedisNode:
        """The node most Sentinels call primary now; remembered as ``primary``."""
        ports = [int(state["port"]) for state in self._masters()]
        if not ports:
            raise TopologyError("no Sentinel answered")
        self.primary = self.node_at(max(set(ports), key=ports.count))
        return self.primary

    def wait_for_failover(self, old_primary_port: int, timeout: float = 30.0) -> RedisNode:
        """Wait until the Sentinels agree on a new primary, are done failing over, and it answers ROLE as master."""

        def promoted() -> RedisNode | None:
            states = self._masters()
            ports = {int(state["port"]) for state in states}
            # A majority must answer; all that answer must agree and be done (no failover_in_progress,
            # s_down or o_down): until then a client may still be sent to the old primary.
            if len(states) <= len(self.sentinels) // 2 or len(ports) != 1 or old_primary_port in ports:
                return None
            if any(_flags(state) != {"master"} for state in states):
                return None
            node = self.node_at(ports.pop())
            return node if node.role() == "master" else None

        self.primary = wait_for(promoted, timeout, f"a finished failover away from port {old_primary_port}")
        return self.primary

    def wait_for_replicas(self, count: int = 1, timeout: float = 30.0) -> RedisNode:
        """Wait until the last known primary streams to ``count`` replicas (so WAIT can count them); return it.

        After a failover Sentinel re-points the other replica as part of it. A restarted old primary
        comes back as a primary and is turned into a replica only when Sentinel next checks its
        role: allow 10-15 s for that.
        """
        return wait_for(
            lambda: self.primary if len(replication_online(self.primary)) >= count else None,
            timeout,
            f"{count} replica(s) online on {self.primary!r}",
        )

    def lag_then_kill_primary(self, lag_seconds: float = 0.5) -> float:
        """``lag_then_kill_primary`` on the current primary and all its running replicas."""
        primary = self.current_primary()
        replicas = [node for node in self.nodes if node is not primary and node.running]
        return lag_then_kill_primary(primary, replicas, lag_seconds, detection_ms=self.down_after_ms)


# -- Cluster ------------------------------------------------------------------


def _port_of(address: str) -> int:
    # CLUSTER NODES addresses read "ip:port@busport[,hostname]".
    return int(address.split("@")[0].rsplit(":", 1)[1])


class ClusterSetup:
    """Six cluster nodes: three primaries with one replica each, made by ``redis-cli --cluster create``.

    With ``password``, every node requires it and gives it to its primary; with ``tls``, every node
    listens with TLS only, and the cluster bus and replication are TLS too (``tls-cluster yes``).
    """

    def __init__(
        self,
        folder: Path,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        *,
        password: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.folder = folder
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.tls = tls
        settings = [
            f"cluster-node-timeout {node_timeout_ms}",
            # 0: a replica takes over however long its link has been down, so a lagging one still does.
            "cluster-replica-validity-factor 0",
        ]
        self.nodes = [
            RedisNode(folder / f"node-{i}", cluster=True, settings=settings, password=password, tls=tls)
            for i in range(6)
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,...`` with all six nodes.

        Secured: ``rediss+cluster://:PASSWORD@127.0.0.1:P1,...?ssl_ca_certs=CA``.
        """
        return self.url_with()

    def url_with(
        self, *, password: str | _Own | None = OWN, tls: bool | _Own = OWN, ca: bool = True, query: str = ""
    ) -> str:
        """The URL with another password (None: none), with TLS or not, with or without the CA."""
        return make_url(
            "+cluster",
            [node.address for node in self.nodes],
            password=self.password if password is OWN else password,
            tls=self.tls if tls is OWN or tls else None,
            ca=ca,
            query=query,
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every node as a (host, port) pair."""
        return [(HOST, node.port) for node in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        """Start the six nodes, create the cluster, and wait until it is ok and every replica is linked."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(deadline - time.monotonic())
        command = [redis_cli() or "redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
        command += ["--cluster-replicas", "1", "--cluster-yes"]
        if self.tls:
            command += ["--tls", "--cacert", str(self.tls.ca_file)]
        if self.password is not None:
            command += ["-a", self.password, "--no-auth-warning"]
        # redis-cli waits for the nodes to agree, checking once a second: about 1 s of the start-up.
        created = subprocess.run(
            command, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()), check=False
        )
        if created.returncode != 0 or "[OK] All 16384 slots covered" not in created.stdout:
            raise TopologyError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_healthy(3, deadline - time.monotonic())

    def stop(self) -> None:
        """Stop every node, paused or not."""
        stop_all(self.nodes)

    def node_at(self, port: int) -> RedisNode:
        """The node listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise TopologyError(f"no cluster node on port {port}")

    def _live_node(self) -> RedisNode:
        for node in self.nodes:
            if node.running and not node.paused:
                return node
        raise TopologyError("no cluster node is running")

    def _nodes_view(self, node: RedisNode) -> dict[str, dict[str, Any]]:
        with node.client(socket_timeout=1.0) as client:
            return dict(client.execute_command("CLUSTER NODES"))

    def _slot_owners(self, node: RedisNode) -> dict[tuple[int, int], int]:
        """Node ``node``'s view: slot range -> port of the primary serving it (failed ones left out)."""
        owners: dict[tuple[int, int], int] = {}
        for address, view in self._nodes_view(node).items():
            if "master" in view["flags"] and "fail" not in view["flags"]:
                for slot_range in view["slots"]:
                    owners[(int(slot_range[0]), int(slot_range[-1]))] = _port_of(address)
        return owners

    def wait_healthy(self, replicas: int = 3, timeout: float = 30.0) -> None:
        """Wait until every running node says cluster_state:ok, all agree on who serves which slots, and
        ``replicas`` replicas in all are streamed to by their primaries."""

        def healthy() -> bool:
            views = []
            for node in self.nodes:
                if not node.running or node.paused:
                    continue
                with node.client(socket_timeout=1.0) as client:
                    if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                        return False
                views.append(self._slot_owners(node))
            if any(view != views[0] for view in views) or sum(e - s + 1 for s, e in views[0]) != 16384:
                return False
            return sum(len(replication_online(self.node_at(port))) for port in set(views[0].values())) >= replicas

        wait_for(healthy, timeout, f"cluster ok, agreed on slots, with {replicas} replica(s) online", interval=0.1)

    def primaries(self) -> list[RedisNode]:
        """The nodes serving slots now, in one running node's view."""
        return [self.node_at(port) for port in sorted(set(self._slot_owners(self._live_node()).values()))]

    def primary_for_key(self, key: str) -> RedisNode:
        """The node serving ``key``'s slot now (CLUSTER KEYSLOT, then CLUSTER NODES)."""
        node = self._live_node()
        with node.client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
        for (start, end), port in self._slot_owners(node).items():
            if start <= slot <= end:
                return self.node_at(port)
        raise TopologyError(f"no primary serves slot {slot}")

    def replica_of(self, primary: RedisNode) -> RedisNode:
        """The running node that replicates ``primary`` now."""
        with primary.client() as client:
            primary_id = str(client.execute_command("CLUSTER MYID"))
        for address, view in self._nodes_view(primary).items():
            node = self.node_at(_port_of(address))
            if "slave" in view["flags"] and view["master_id"] == primary_id and node.running:
                return node
        raise TopologyError(f"{primary!r} has no replica")

    def wait_for_failover(self, old_primary: RedisNode, key: str, timeout: float = 30.0) -> RedisNode:
        """Wait until another node serves ``key``'s slot, answers ROLE as master, and the cluster is ok; return it."""

        def promoted() -> RedisNode | None:
            try:
                node = self.primary_for_key(key)
                if node is old_primary or node.role() != "master":
                    return None
                self.wait_healthy(replicas=0, timeout=0)
            except TopologyError:
                return None
            return node

        return wait_for(promoted, timeout, f"a failover away from {old_primary!r} for key {key!r}", interval=0.1)

    def wait_for_replica(self, primary: RedisNode, timeout: float = 30.0) -> RedisNode:
        """Wait until ``primary`` streams to a replica (e.g. a restarted old primary), so WAIT counts it; return it."""

        def attached() -> RedisNode | None:
            ports = replication_online(primary)
            return self.node_at(ports[0]) if ports else None

        return wait_for(attached, timeout, f"a replica online on {primary!r}")

    def lag_then_kill_primary(self, primary: RedisNode, lag_seconds: float = 0.5) -> float:
        """``lag_then_kill_primary`` on ``primary`` and its replica."""
        replicas = [self.replica_of(primary)]
        return lag_then_kill_primary(primary, replicas, lag_seconds, detection_ms=self.node_timeout_ms)


# -- Fixtures -----------------------------------------------------------------


def _need(binary: str | None, name: str) -> None:
    if binary is None:
        # Imported here, not at the top: conftest is the tests' module, and this one's user.
        from conftest import unavailable

        unavailable(f"{name} is not installed: apt-get install -y redis-server (it brings redis-cli)")


def _need_trustme() -> None:
    try:
        import trustme  # noqa: F401
    except ImportError:
        from conftest import unavailable

        unavailable("trustme is not installed: pip install 'trustme>=1.1'")


class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


def _running(thing: S) -> Iterator[S]:
    """Start ``thing`` for a fixture, and stop it afterwards whatever happened (a failed start too)."""
    try:
        thing.start()
        yield thing
    finally:
        thing.stop()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A started Sentinel set-up of this test's own; stopped afterwards whatever happened."""
    _need(redis_server(), "redis-server")
    setup = SentinelSetup(tmp_path / "sentinel")
    yield from _running(setup)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    """A started six-node Redis Cluster of this test's own; stopped afterwards whatever happened."""
    _need(redis_server(), "redis-server")
    _need(redis_cli(), "redis-cli")
    setup = ClusterSetup(tmp_path / "cluster")
    yield from _running(setup)


@pytest.fixture
def secure_redis(tmp_path: Path) -> Iterator[RedisNode]:
    """A started ``redis-server`` of this test's own, TLS only and requiring ``PASSWORD``; stopped afterwards."""
    _need(redis_server(), "redis-server")
    _need_trustme()
    folder = tmp_path / "secure-redis"
    node = RedisNode(folder / "data", password=PASSWORD, tls=TLSFiles.create(folder / "tls"))
    yield from _running(node)


@pytest.fixture
def secure_sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """``sentinel_setup`` with TLS only and ``PASSWORD`` on every data node and Sentinel."""
    _need(redis_server(), "redis-server")
    _need_trustme()
    folder = tmp_path / "secure-sentinel"
    setup = SentinelSetup(folder, password=PASSWORD, tls=TLSFiles.create(folder / "tls"))
    yield from _running(setup)


@pytest.fixture
def secure_redis_cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    """``redis_cluster`` with TLS only (the cluster bus included) and ``PASSWORD`` on every node."""
    _need(redis_server(), "redis-server")
    _need(redis_cli(), "redis-cli")
    _need_trustme()
    folder = tmp_path / "secure-cluster"
    setup = ClusterSetup(folder, password=PASSWORD, tls=TLSFiles.create(folder / "tls"))
    yield from _running(setup)
