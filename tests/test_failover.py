"""Redis Sentinel and Cluster: real failovers under same-cookie load from two Tally instances.

The primary dies by kill -9 after its replicas have fallen behind, as over a
slow network (see ``topologies.lag_then_kill_primary``): on loopback a bare
kill almost never catches a write that the replicas lack, so a test built that
way would pass with or without ``WAIT``.  With ``TALLY_REDIS_REPLICAS=1`` no
acknowledged increment may be lost; with 0 the same test must lose some, or it
proves nothing.  Each run writes its figures to ``test-output/failover.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from conftest import ROOT, WORKER_CLASSES, Server, ServerFactory, counter_of
from tally.store import redis as redis_store
from tally.store.base import StorageError
from tally.store.redis import CLOCK_CHECK_SECONDS, RedisStore
from topologies import ClusterSetup, SentinelSetup

#: Seconds that the first 200 may come after the topology reports the failover done.
RESUME_SECONDS = 5.0


@dataclass
class Load:
    """Same-cookie increments from several threads on several servers, recorded one by one."""

    servers: list[Server]
    cookie: str
    threads_each: int = 6
    answers: list[tuple[float, int, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, server: Server) -> None:
        for _ in range(50_000):  # bounded; stop() ends it far sooner
            if self._stop.is_set():
                return
            try:
                response = server.get("/inc", self.cookie)
            except requests.RequestException:
                self.answers.append((time.monotonic(), 0, "", ""))
                continue
            self.answers.append(
                (time.monotonic(), response.status_code, response.text, response.headers.get("Retry-After", ""))
            )

    def start(self) -> Load:
        """Start the threads."""
        for server in self.servers:
            for _ in range(self.threads_each):
                thread = threading.Thread(target=self._run, args=(server,))
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the threads and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def acknowledged(self) -> list[int]:
        """The counter values answered 200."""
        return [counter_of(text) for _, status, text, _ in self.answers if status == 200]

    def first_success_after(self, moment: float) -> float | None:
        """When the first 200 after ``moment`` came."""
        return min((at for at, status, _, _ in self.answers if status == 200 and at > moment), default=None)


def _servers(serve: ServerFactory, tmp_path: Path, url: str, replicas: int) -> list[Server]:
    # WAIT gets a third of the timeout: short beside the half-second lag, so that the lag
    # always holds writes that a Tally without WAIT would acknowledge.
    settings = {"redis_url": url, "redis_timeout": "0.5", "redis_replicas": str(replicas)}
    return [serve(workers=2, threads=4, session_dir=str(tmp_path / name), **settings) for name in ("a", "b")]


def _session_key(cookie: str) -> str:
    return "tally:session:" + hashlib.sha256(f"session:{cookie}".encode()).hexdigest()


def _wait_for_success(server: Server, cookie: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while server.get("/counter", cookie).status_code != 200:
        assert time.monotonic() < deadline, "service did not resume"
        time.sleep(0.1)


def _failover(
    serve: ServerFactory,
    tmp_path: Path,
    url: str,
    replicas: int,
    kill: Callable[[str], float],
    recover: Callable[[], float],
    topology: str,
) -> dict[str, object]:
    """Load two instances, let ``kill`` fail the session's primary over, and check what survived."""
    servers = _servers(serve, tmp_path, url, replicas)
    cookie = servers[0].new_client()
    load = Load(servers, cookie).start()
    try:
        time.sleep(1.0)
        killed_at = kill(_session_key(cookie))
        recovered_at = recover()
        resumed_at = None
        deadline = time.monotonic() + 30
        while resumed_at is None and time.monotonic() < deadline:
            time.sleep(0.2)
            resumed_at = load.first_success_after(recovered_at)
        time.sleep(0.5)
    finally:
        load.stop()
    _wait_for_success(servers[1], cookie, 10)
    final = counter_of(servers[1].get("/counter", cookie).text)

    statuses = {status for _, status, _, _ in load.answers}
    acked = load.acknowledged()
    maybe = [text for _, status, text, _ in load.answers if status == 503 and "may or may not" in text]
    # Every 200 is an increment that happened; the counter must show each of them.
    lost = max(0, 1 + len(acked) - final)
    figures = {
        "topology": topology,
        "replicas": replicas,
        "acknowledged": len(acked),
        "lost": lost,
        "repeated_values": len(acked) - len(set(acked)),
        "answered_503": sum(1 for _, status, _, _ in load.answers if status == 503),
        "failover_seconds": round(recovered_at - killed_at, 2),
        "first_200_after_failover_seconds": None if resumed_at is None else round(resumed_at - recovered_at, 2),
        # Service is back for good after the last 503 (answers on their way when the primary died still come as 200s).
        "503s_until_seconds_after_kill": round(
            max(at for at, status, _, _ in load.answers if status != 200) - killed_at, 2
        ),
    }
    (ROOT / "test-output").mkdir(exist_ok=True)
    with (ROOT / "test-output" / "failover.jsonl").open("a") as out:
        out.write(json.dumps(figures) + "\n")

    assert statuses <= {200, 503}, f"only 200 and 503, never a 5xx but 503 nor a cut connection: {statuses}"
    assert all(retry for _, status, _, retry in load.answers if status == 503), "every 503 says when to retry"
    assert 503 in statuses, "the failover must be felt"
    assert resumed_at is not None and resumed_at - recovered_at < RESUME_SECONDS, figures
    assert final <= 1 + len(acked) + len(maybe), "only answers that said so may have counted unseen"
    if replicas:
        assert lost == 0 and len(set(acked)) == len(acked), figures
    else:
        assert lost > 0, f"without WAIT the lagging replica must lose acknowledged counts: {figures}"
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 0], ids=["replicas1", "replicas0"])
def test_a_sentinel_failover_loses_no_acknowledged_count_with_replicas_1(
    serve: ServerFactory, tmp_path: Path, sentinel_setup: SentinelSetup, replicas: int
) -> None:
    old: list[int] = []

    def kill(_: str) -> float:
        old.append(sentinel_setup.current_primary().port)
        return sentinel_setup.lag_then_kill_primary(0.5)

    def recover() -> float:
        sentinel_setup.wait_for_failover(old[0])
        return time.monotonic()

    _failover(serve, tmp_path, sentinel_setup.url, replicas, kill, recover, "sentinel")


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 0], ids=["replicas1", "replicas0"])
def test_a_cluster_failover_loses_no_acknowledged_count_with_replicas_1(
    serve: ServerFactory, tmp_path: Path, redis_cluster: ClusterSetup, replicas: int
) -> None:
    killed: list[tuple[object, str]] = []

    def kill(key: str) -> float:
        primary = redis_cluster.primary_for_key(key)
        killed.append((primary, key))
        return redis_cluster.lag_then_kill_primary(primary, 0.5)

    def recover() -> float:
        old, key = killed[0]
        new = redis_cluster.wait_for_failover(old, key)  # type: ignore[arg-type]
        done = time.monotonic()
        if replicas:
            # One replica per primary: the new primary has none until the old node rejoins.
            old.restart()  # type: ignore[attr-defined]
            redis_cluster.wait_for_replica(new)
            done = time.monotonic()
        return done

    _failover(serve, tmp_path, redis_cluster.url, replicas, kill, recover, "cluster")


@pytest.mark.slow
@pytest.mark.parametrize("clock_check_seconds", [0, CLOCK_CHECK_SECONDS], ids=["clock-each-write", "clock-as-set"])
def test_after_a_failover_to_a_hung_primary_one_write_fails_and_the_rest_reach_the_new_one(
    sentinel_setup: SentinelSetup, monkeypatch: pytest.MonkeyPatch, clock_check_seconds: float
) -> None:
    # A process keeps its connections between requests.  When the primary
    # hangs (SIGSTOP: its sockets stay open) and Sentinel promotes a replica,
    # the first write meets the hung primary and times out; every later one
    # must go to the new primary, not wait out the timeout on another kept
    # connection to the old one.  Whether that first write also asks Redis the
    # time (every few seconds) must not matter: with 0, every write asks.
    monkeypatch.setattr(redis_store, "CLOCK_CHECK_SECONDS", clock_check_seconds)
    store = RedisStore(sentinel_setup.url, timeout=0.5)
    store.update("s", lambda record: {"counter": 0}, 600)
    with ThreadPoolExecutor(8) as writers:  # several connections in use at once, then kept
        assert set(writers.map(lambda _: store.add("s", "counter", 1, 600), range(200))) == set(range(1, 201))
    old = sentinel_setup.current_primary()
    old.pause()
    sentinel_setup.wait_for_failover(old.port)
    outcomes: list[int | str | None] = []
    for _ in range(10):
        try:
            outcomes.append(store.add("s", "counter", 1, 600))
        except StorageError as exc:
            outcomes.append(exc.kind)
    assert outcomes[0] == "unavailable" and outcomes[1:] == list(range(201, 210)), outcomes
    old.resume()
    assert store.load("s") == {"counter": 209}


def test_the_global_counter_is_exact_on_a_cluster(serve: ServerFactory, redis_cluster: ClusterSetup) -> None:
    first = serve(workers=2, threads=4, redis_url=redis_cluster.url)
    second = serve(workers=2, threads=4, redis_url=redis_cluster.url)
    start = counter_of(first.get("/global").text)
    outcomes = [first.burst("/global/inc", 50, threads=50), second.burst("/global/inc", 50, threads=50)]
    numbers = sorted(v for outcome in outcomes for v in outcome.values)
    assert numbers == list(range(start + 1, start + 101)), "100 clients, 100 distinct numbers, no gap"


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_sessions_spread_over_the_cluster_and_count_exactly(
    serve: ServerFactory, redis_cluster: ClusterSetup, worker_class: str
) -> None:
    """One cookie's burst, then all the cookies' at once: under gevent, one pipeline per primary."""
    server = serve(worker_class=worker_class, workers=2, threads=4, redis_url=redis_cluster.url)
    cookies = [server.new_client() for _ in range(12)]
    holders = {redis_cluster.primary_for_key(_session_key(c)).port for c in cookies}
    assert len(holders) >= 2, "sessions lie on several primaries"
    assert sorted(server.burst("/inc", 200, cookies[0], threads=24).values) == list(range(2, 202))
    for cookie in cookies[1:]:
        assert server.get("/counter", cookie).text == "counter is 1"

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: server.get("/inc", cookies[i % 12]), range(240)))
    assert [answer.status_code for answer in answers] == [200] * 240
    for first in range(12):
        counts = sorted(counter_of(answer.text) for answer in answers[first::12])
        start = 202 if first == 0 else 2  # the first cookie had its burst
        assert counts == list(range(start, start + 20)), f"cookie {first}: each increment its own count"
