"""The Redis store: several instances share counters with no lost update."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import redis
import redis.connection
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from pytest_redis.executor.process import RedisExecutor
from redis import exceptions as rx
from redis.sentinel import MasterNotFoundError

from conftest import (
    WORKER_CLASSES,
    Server,
    ServerFactory,
    burst_across,
    counter_of,
    free_port,
    json_of,
    need_redis,
    samples,
)
from tally import create_app
from tally.store import StorageError, redis_connect
from tally.store import redis as redis_store
from tally.store.redis import MAX_ATTEMPTS, RedisStore, _translate
from topologies import SentinelSetup

T = TypeVar("T")


@pytest.fixture
def redis_app(tmp_path: Path, redis_url: str, redis_prefix: str) -> Flask:
    return create_app(
        {"REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix, "SECRET_KEY": "k", "PERMANENT_SESSION_LIFETIME": 2},
        instance_path=str(tmp_path),
    )


def test_the_contract_holds_on_redis(redis_app: Flask) -> None:
    alice, bob = redis_app.test_client(), redis_app.test_client()
    assert alice.get("/inc?by=5").text == "counter is 5"
    assert alice.get("/dec").text == "counter is 4"
    assert bob.get("/inc").text == "counter is 1"
    assert alice.get("/counter", headers={"Accept": "application/json"}).json == {"counter": 4}
    assert alice.post("/reset").text == "counter was reset"
    assert alice.get("/counter").text == "counter is 0"
    assert bob.get("/global/inc").text == "global counter is 1"
    assert alice.get("/global").text == "global counter is 1"
    assert not list(Path(redis_app.config["SESSION_DIR"]).glob("*")), "nothing went to files"


def test_sessions_live_in_redis_with_the_session_lifetime_as_ttl(
    redis_app: Flask, redis_url: str, redis_prefix: str
) -> None:
    client = redis_app.test_client()
    client.get("/inc")
    direct = redis.Redis.from_url(redis_url)
    [key] = direct.keys(redis_prefix + "session:*")
    assert 1000 < direct.pttl(key) <= 2000
    time.sleep(0.6)
    before = direct.hgetall(key), direct.pttl(key)
    assert before[0][b"counter"] == b"1"
    assert client.get("/counter").text == "counter is 1"
    assert direct.hgetall(key) == before[0] and direct.pttl(key) <= before[1], "a read neither writes nor refreshes"
    client.get("/inc")
    assert direct.pttl(key) > before[1], "a write refreshes the TTL"
    time.sleep(0.6)
    refreshed = direct.pttl(key)
    assert client.post("/reset").text == "counter was reset"
    assert refreshed < direct.pttl(key) <= 2000, "a reset (a compare-and-set, not an increment) sets it too"
    time.sleep(2.1)
    assert not direct.exists(key)
    assert client.get("/counter").text == "counter is 0"
    direct.close()


def test_a_redis_on_a_unix_socket_holds_the_sessions_and_the_quota(
    tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    need_redis()
    socket_path = request.getfixturevalue("shared_redis").unixsocket
    settings = {"REDIS_URL": f"unix://{socket_path}?db=0", "REDIS_PREFIX": redis_prefix, "SECRET_KEY": "k"}
    app = create_app({**settings, "NEW_SESSIONS_PER_MINUTE": 2}, instance_path=str(tmp_path))
    client = app.test_client()
    assert [client.get("/inc").text for _ in range(2)] == ["counter is 1", "counter is 2"]
    assert app.test_client().get("/inc").text == "counter is 1", "a second new session"
    assert app.test_client().get("/inc").status_code == 429, "a third in the minute: the quota, counted in Redis"
    direct = redis.Redis(unix_socket_path=socket_path)
    assert len(direct.keys(redis_prefix + "session:*")) == 2
    assert direct.keys(redis_prefix + "quota*"), "the address's count of new sessions is there too"
    direct.close()


def test_a_sentinel_url_with_a_database_holds_the_sessions_and_the_quota_there(
    tmp_path: Path, sentinel_setup: SentinelSetup
) -> None:
    """``/SERVICE/DB``: limits, given such a URL, would look for a primary named SERVICEDB."""
    url = sentinel_setup.url + "/3"
    app = create_app({"REDIS_URL": url, "SECRET_KEY": "k", "NEW_SESSIONS_PER_MINUTE": 1}, instance_path=str(tmp_path))
    assert app.test_client().get("/inc").text == "counter is 1"
    assert app.test_client().get("/inc").status_code == 429, "a second new session in the minute"
    with sentinel_setup.current_primary().client(db=3) as direct:
        assert direct.keys("tally:session:*") and direct.keys("tally:quota*"), "both in database 3"
    with sentinel_setup.current_primary().client(db=0) as direct:
        assert not direct.keys("tally:*")


def test_over_the_quota_on_sentinel_the_429_needs_no_replica(tmp_path: Path, sentinel_setup: SentinelSetup) -> None:
    """The quota's window is read from the primary, as it is counted there: a hung replica leaves the 429 as it was."""
    settings = {"REDIS_URL": sentinel_setup.url, "SECRET_KEY": "k", "NEW_SESSIONS_PER_MINUTE": 1, "REDIS_TIMEOUT": 0.5}
    app = create_app(settings, instance_path=str(tmp_path))
    assert app.test_client().get("/inc").text == "counter is 1"
    for replica in sentinel_setup.replicas:
        replica.pause()
    try:
        response = app.test_client().get("/inc")
    finally:
        for replica in sentinel_setup.replicas:
            replica.resume()
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) <= 60


@pytest.mark.parametrize(
    ("damage", "deleted"),
    [
        (lambda r, key: r.set(key, b"\x80\x04\x95garbage that pickle would love"), True),
        (lambda r, key: r.hset(key, "counter", b"\xff\xfe not json"), True),
        # What Flask-Session's own Redis backend would unpickle: never read as 7.
        (lambda r, key: r.hset(key, "counter", pickle.dumps(7)), True),
        # Valid JSON but not an integer: read as 0, and the next increment repairs it.
        (lambda r, key: r.hset(key, "counter", b'"seven"'), False),
    ],
    ids=["not-a-hash", "not-json", "pickled", "not-an-integer"],
)
def test_corrupt_data_in_redis_never_gives_a_5xx(
    redis_app: Flask,
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[redis.Redis, bytes | str], object],
    deleted: bool,
) -> None:
    client = redis_app.test_client()
    client.get("/inc?by=3")
    direct = redis.Redis.from_url(redis_url)
    [key] = direct.keys(redis_prefix + "session:*")
    damage(direct, key)
    with caplog.at_level(logging.WARNING):
        assert client.get("/counter").text == "counter is 0"
    assert ("corrupt session" in caplog.text) is deleted
    assert (not direct.exists(key)) is deleted
    assert client.get_cookie("session").value not in caplog.text  # type: ignore[union-attr]
    assert client.get("/inc").text == "counter is 1"
    assert client.get("/inc").text == "counter is 2"
    direct.close()


def test_the_full_64_bit_range_is_exact_on_redis(redis_app: Flask) -> None:
    client = redis_app.test_client()
    top = 2**63 - 1
    assert client.get(f"/inc?by={top - 1}").text == f"counter is {top - 1}"
    assert client.get("/inc").text == f"counter is {top}"
    assert client.get("/inc").status_code == 400
    assert client.get("/counter").text == f"counter is {top}"
    assert client.get(f"/dec?by={top}").text == "counter is 0"


def test_two_instances_share_one_cookie_without_losing_updates(
    serve: ServerFactory, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    first = serve(workers=2, threads=4, session_dir=str(tmp_path / "a"), **settings)
    second = serve(workers=2, threads=4, session_dir=str(tmp_path / "b"), **settings)
    cookie = first.new_client()
    assert sorted(burst_across([first, second], "/inc", 200, cookie, threads=24)) == list(range(2, 402))
    assert second.get("/counter", cookie).text == "counter is 401"
    start = counter_of(first.get("/global").text)
    numbers = burst_across([first, second], "/global/inc", 50, threads=50)
    assert sorted(numbers) == list(range(start + 1, start + 101))


def _load(
    server: Server,
    cookie: str,
    stop: threading.Event,
    acked: list[int],
    failures: list[tuple[int, float, str]],
    unknown: list[str],
) -> None:
    while not stop.is_set():
        began = time.monotonic()
        response = server.get("/inc", cookie)
        if response.status_code == 200:
            acked.append(counter_of(response.text))
        else:
            failures.append((response.status_code, time.monotonic() - began, response.headers.get("Retry-After", "")))
            assert "counter is" not in response.text
            if "may or may not" in response.text:
                unknown.append(response.text)


def test_a_hung_redis_gets_503_in_bounded_time_and_counts_resume_exactly(
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    server = serve(workers=2, threads=4, redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_timeout="1")
    cookie = server.new_client()
    stop = threading.Event()
    acked: list[int] = []
    failures: list[tuple[int, float, str]] = []
    unknown: list[str] = []
    threads = [threading.Thread(target=_load, args=(server, cookie, stop, acked, failures, unknown)) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(own_redis.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    time.sleep(3.5)  # longer than the bound below: the answers come while Redis is still stopped
    os.kill(own_redis.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert failures, "requests must fail while Redis is stopped"
    assert {status for status, _, _ in failures} == {503}
    assert max(seconds for _, seconds, _ in failures) < 2.5, "bounded by the 1 s timeout"
    assert all(retry_after for _, _, retry_after in failures)
    assert len(set(acked)) == len(acked)
    # Every acknowledged increment counts and every refused one does not.  A
    # request whose script ran just before Redis stopped, with its reply still
    # unsent, cannot know its outcome: it says so, and it alone may count.
    extra = counter_of(server.get("/counter", cookie).text) - 1 - len(acked)
    assert 0 <= extra <= min(len(unknown), 8), "only requests in flight when Redis stopped"


def test_a_killed_and_restarted_redis_loses_no_acknowledged_count(
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    server = serve(workers=2, threads=4, redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_timeout="1")
    cookie = server.new_client()
    assert server.burst("/inc", 50, cookie).statuses == [200] * 50
    own_redis.kill(sig=signal.SIGKILL)
    down = server.get("/inc", cookie)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert server.get("/counter", cookie).status_code == 503
    own_redis.start()
    assert server.get("/inc", cookie).text == "counter is 52"


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_connections_redis_closed_while_idle_are_replaced_without_an_error(
    serve: ServerFactory, own_redis: RedisExecutor, worker_class: str
) -> None:
    # What a Redis with an idle "timeout", a failover or CLIENT KILL does to
    # the connections a server keeps between requests (checked one way under
    # gevent, another under threads).
    server = serve(workers=2, threads=4, worker_class=worker_class, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    cookie = server.new_client()
    assert server.burst("/inc", 100, cookie, threads=16).statuses == [200] * 100
    admin = redis.Redis(port=own_redis.port)
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 2
    assert server.burst("/inc", 100, cookie, threads=16).statuses == [200] * 100
    assert server.get("/counter", cookie).text == "counter is 201"


def test_an_unreachable_redis_is_a_storage_error_not_a_hang() -> None:
    store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.5)
    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.increment_global()
    assert caught.value.status == 503 and time.monotonic() - began < 1


def _closed_port() -> int:
    from conftest import free_port

    return free_port()


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_a_timeout_that_would_never_run_out_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        RedisStore("redis://127.0.0.1:1/0", timeout=timeout)


def test_stats_counts_redis_sessions(redis_app: Flask) -> None:
    for by in (1, 2, 3):
        redis_app.test_client().get(f"/inc?by={by}")
    output = redis_app.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "store: redis" in output and "sessions: 3\n" in output
    assert "oldest: written 0s ago" in output or "oldest: written 1s ago" in output
    pruned = redis_app.test_cli_runner().invoke(args=["sessions", "prune"]).output
    assert "removed 0 expired sessions, kept 3," in pruned, "prune and stats agree"


# -- key layout, upgrade, replicas, settings ---------------------------------


def _cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def test_no_key_names_a_session_id(redis_app: Flask, redis_url: str, redis_prefix: str) -> None:
    client = redis_app.test_client()
    client.get("/inc")
    cookie = _cookie(client)
    direct = redis.Redis.from_url(redis_url)
    keys = [k.decode() for k in direct.scan_iter(match=redis_prefix + "*")]
    assert keys and not [k for k in keys if cookie in k]
    digest = hashlib.sha256(f"session:{cookie}".encode()).hexdigest()
    assert redis_prefix + "session:" + digest in keys, "named by the same hash as the session's file"
    direct.close()


def _store_the_old_way(direct: redis.Redis, redis_prefix: str, counter: int) -> str:
    """A session as versions before the hashed layout stored it: the raw id in the key."""
    sid = secrets.token_urlsafe(32)
    key = f"{redis_prefix}session:session:{sid}"
    direct.hset(key, mapping={"counter": str(counter), "_v": "3"})
    direct.pexpire(key, 60_000)
    return sid


@pytest.mark.parametrize("first", ["/inc", "/counter", "/reset"])
def test_sessions_of_the_old_layout_keep_their_counts(
    redis_app: Flask, redis_url: str, redis_prefix: str, first: str
) -> None:
    direct = redis.Redis.from_url(redis_url)
    sid = _store_the_old_way(direct, redis_prefix, 41)
    client = redis_app.test_client()
    client.set_cookie("session", sid)
    expected = {"/inc": "counter is 42", "/counter": "counter is 41", "/reset": "counter was reset"}[first]
    response = client.open(first, method="POST" if first == "/reset" else "GET")
    assert response.text == expected
    assert _cookie(client) == sid, "the client keeps its id"
    assert not direct.exists(f"{redis_prefix}session:session:{sid}"), "the raw id is gone from the key space"
    [key] = direct.keys(redis_prefix + "session:*")
    assert 0 < direct.pttl(key) <= 60_000 or first != "/counter", "a read moves the session with its TTL"
    value = {"/inc": 43, "/counter": 42, "/reset": 1}[first]
    assert client.get("/inc").text == f"counter is {value}"
    direct.close()


def test_flask_sessions_migrate_moves_every_old_session(redis_app: Flask, redis_url: str, redis_prefix: str) -> None:
    direct = redis.Redis.from_url(redis_url)
    sids = [_store_the_old_way(direct, redis_prefix, n) for n in range(25)]
    redis_app.test_client().get("/inc")  # one of the current layout, left alone
    result = redis_app.test_cli_runner().invoke(args=["sessions", "migrate"])
    assert result.exit_code == 0 and "moved 25 sessions" in result.output
    assert not list(direct.scan_iter(match=redis_prefix + "session:session:*"))
    assert len(list(direct.scan_iter(match=redis_prefix + "session:*"))) == 26
    for n, sid in enumerate(sids):
        client = redis_app.test_client()
        client.set_cookie("session", sid)
        assert client.get("/counter").text == f"counter is {n}"
    assert "moved 0 sessions" in redis_app.test_cli_runner().invoke(args=["sessions", "migrate"]).output
    direct.close()


def _app_on(tmp_path: Path, url: str, **settings: object) -> Flask:
    return create_app({"REDIS_URL": url, "SECRET_KEY": "k", **settings}, instance_path=str(tmp_path / "i"))


def _failures(client: FlaskClient, kind: str) -> float:
    """How many storage operations failed with ``kind``, by ``tally_storage_errors_total``."""
    return samples(client.get("/metrics").text, "tally_storage_errors_total").get((("kind", kind),), 0.0)


def test_with_replicas_required_and_none_following_writes_answer_503_not_200(
    tmp_path: Path, own_redis: RedisExecutor
) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    warm = _app_on(tmp_path, url).test_client()
    assert warm.get("/inc?by=5").text == "counter is 5"
    app = _app_on(tmp_path, url, REDIS_REPLICAS=1, REDIS_TIMEOUT=0.6)
    client = app.test_client()
    client.set_cookie("session", _cookie(warm))
    failed = _failures(client, "not_replicated")
    began = time.monotonic()
    for path in ("/inc", "/dec", "/global/inc", "/reset"):
        response = client.open(path, method="POST")
        assert response.status_code == 503, path
        assert "may or may not have been applied" in response.text and response.headers["Retry-After"]
        assert "Set-Cookie" not in response.headers
    assert time.monotonic() - began < 4 * 0.6 + 1, "each waits at most its share of the timeout"
    assert _failures(client, "not_replicated") == failed + 4
    assert client.get("/counter").status_code == 200, "reads need no replica"


def test_with_a_replica_following_writes_are_acknowledged(tmp_path: Path, own_redis: RedisExecutor) -> None:
    replica = RedisExecutor(
        need_redis(), databases=1, redis_timeout=30, loglevel="warning", host="127.0.0.1", port=free_port(),
        datadir=tmp_path / "replica",
    )  # fmt: skip
    (tmp_path / "replica").mkdir()
    replica.start()
    try:
        # A disk-based sync starts at once; a diskless one waits 5 s for more replicas.
        redis.Redis(port=own_redis.port).config_set("repl-diskless-sync", "no")
        follower = redis.Redis(port=replica.port)
        follower.replicaof("127.0.0.1", own_redis.port)
        deadline = time.monotonic() + 10
        while follower.info("replication")["master_link_status"] != "up":
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.05)
        client = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0", REDIS_REPLICAS=1).test_client()
        for n in range(1, 21):
            assert client.get("/inc").text == f"counter is {n}"
        assert client.get("/global/inc").text == "global counter is 1"
        [key] = follower.keys("tally:session:*")
        assert follower.hget(key, "counter") == b"20", "every acknowledged write is on the replica already"
        follower.close()
    finally:
        replica.stop()


def test_an_evicting_redis_is_reported_at_start_and_by_healthz(
    tmp_path: Path, own_redis: RedisExecutor, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a machine up for seconds only, too: time.monotonic() counts from its boot.
    booted = time.monotonic() - 5
    monkeypatch.setattr(redis_store, "time", SimpleNamespace(monotonic=lambda: time.monotonic() - booted))
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING, logger="tally"):
        app = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0")
    assert "maxmemory-policy is allkeys-lru" in caplog.text
    health = app.test_client().get("/healthz")
    assert health.status_code == 200 and "allkeys-lru" in json_of(health)["warnings"][0]
    admin.config_set("maxmemory-policy", "noeviction")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tally"):
        app = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0")
    assert "maxmemory-policy" not in caplog.text
    assert "warnings" not in json_of(app.test_client().get("/healthz"))
    admin.close()


def test_a_password_in_the_url_is_used(tmp_path: Path, own_redis: RedisExecutor) -> None:
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("requirepass", "s3cret")
    try:
        good = _app_on(tmp_path, f"redis://:s3cret@127.0.0.1:{own_redis.port}/0").test_client()
        assert good.get("/inc").text == "counter is 1"
        bad = _app_on(tmp_path, f"redis://:wrong@127.0.0.1:{own_redis.port}/0").test_client()
        response = bad.get("/inc")
        assert response.status_code == 503 and "credentials" in response.text
    finally:
        redis.Redis(port=own_redis.port, password="s3cret").config_set("requirepass", "")
        admin.close()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:6379", "starts with"),
        ("redis+mongo://h:1/x", "starts with"),
        ("redis+sentinel://127.0.0.1:26379", "/SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/svc/db", "/SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/svc/0/more", "/SERVICE"),
        ("redis+sentinel://127.0.0.1:x/svc", "host:port"),
        ("redis+cluster://127.0.0.1:7000/0", "no path"),
    ],
)
def test_a_malformed_redis_url_is_refused_naming_the_fault(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        RedisStore(url)


def test_sentinel_and_cluster_urls_are_read_like_the_limits_library() -> None:
    from tally.store.redis_connect import ClusterTarget, connect

    sentinel = connect("redis+sentinel://u:p%40ss@127.0.0.1:26379,[::1]:26380/mymaster/3", 1.0)
    assert not sentinel.cluster
    kwargs = sentinel.client_for("k").connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "u", "p@ss")
    cluster = connect("rediss+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001?ssl_cert_reqs=none", 1.0)
    assert isinstance(cluster, ClusterTarget) and cluster.cluster
    # Without /DB, database 0; the service is the one the URL names.
    primary: Any = connect("redis+sentinel://127.0.0.1:26379/mymaster", 1.0).client_for("k").connection_pool
    assert (primary.service_name, primary.connection_kwargs["db"]) == ("mymaster", 0)


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_a_rediss_url_speaks_tls_to_every_node_and_a_redis_url_to_none(scheme: str) -> None:
    from redis.connection import SSLConnection
    from redis.sentinel import SentinelManagedConnection

    from tally.store.redis_connect import ClusterTarget, connect

    # Made without connecting (a Cluster connects on first use): the clients are inspected.
    tls = scheme == "rediss"
    primary: Any = connect(f"{scheme}+sentinel://127.0.0.1:26379/mymaster", 1.0).client_for("k").connection_pool
    assert issubclass(primary.connection_class, SentinelManagedConnection), "it follows the primary the sentinels name"
    sentinels = [s.connection_pool.connection_class for s in primary.sentinel_manager.sentinels]
    assert [issubclass(c, SSLConnection) for c in (primary.connection_class, *sentinels)] == [tls, tls]
    cluster = connect(f"{scheme}+cluster://127.0.0.1:7000", 1.0)
    assert isinstance(cluster, ClusterTarget)
    assert cluster._kwargs.get("ssl", False) is tls and "connection_class" not in cluster._kwargs


def test_the_redis_timeout_and_replicas_settings_reach_the_store(tmp_path: Path) -> None:
    # Made without a Redis that answers: the store connects on first use.
    app = _app_on(tmp_path, f"redis://127.0.0.1:{free_port()}/0", REDIS_TIMEOUT=0.3, REDIS_REPLICAS=1)
    store = app.session_interface.store  # type: ignore[attr-defined]
    # TALLY_REDIS_TIMEOUT bounds each wait for an answer, and each wait to connect.
    kwargs = store.target.client_for("k").connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
    # TALLY_REDIS_REPLICAS: what a write waits for (test_with_replicas_required_... shows the 503).
    assert store.replicas == 1


# -- guarantees a seeded fault must not slip past ------------------------------


def test_concurrent_changes_of_other_keys_and_increments_are_all_kept(redis_url: str, redis_prefix: str) -> None:
    # The compare-and-set on the version: every change other than an increment
    # (a reset, a merge of keys a view set) is a read-modify-write that must
    # not overwrite a concurrent one.  Real threads against a real Redis.
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.add("session:k", "counter", 1, 60)

    def bump_other(_: int) -> None:
        store.update("session:k", lambda record: record | {"x": record.get("x", 0) + 1}, 60)

    def increment(_: int) -> None:
        store.add("session:k", "counter", 1, 60)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: (bump_other if n % 2 else increment)(n), range(400)))
    assert store.load("session:k") == {"counter": 201, "x": 200}


@pytest.mark.parametrize(
    ("method", "path", "answer"),
    # An increment (one script) and a reset (a compare-and-set) each check on their own path.
    [("GET", "/inc", "counter is 1"), ("POST", "/reset", "counter was reset")],
)
def test_an_id_redis_does_not_hold_is_never_adopted(
    redis_app: Flask, redis_url: str, redis_prefix: str, method: str, path: str, answer: str
) -> None:
    chosen = secrets.token_urlsafe(32)
    client = redis_app.test_client()
    client.set_cookie("session", chosen)
    response = client.open(path, method=method)
    assert response.text == answer
    given = _cookie(client)
    assert given != chosen, "the client gets a fresh id of ours"
    direct = redis.Redis.from_url(redis_url)
    assert not direct.exists(redis_prefix + "session:" + hashlib.sha256(f"session:{chosen}".encode()).hexdigest())
    assert direct.exists(redis_prefix + "session:" + hashlib.sha256(f"session:{given}".encode()).hexdigest())
    direct.close()


def _stalled(own_redis: RedisExecutor) -> int:
    pid = own_redis.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    return pid


def _during_a_stall(own_redis: RedisExecutor, request: Callable[[], T]) -> tuple[T, float]:
    """Run ``request`` while Redis is stopped; return its result and how long it took.

    In a thread, so that a request that would wait forever fails the test
    (Redis is resumed after 5 s) instead of hanging it.
    """
    done: list[tuple[T, float]] = []
    pid = _stalled(own_redis)
    try:
        began = time.monotonic()
        thread = threading.Thread(target=lambda: done.append((request(), time.monotonic() - began)))
        thread.start()
        thread.join(5)
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join(10)
    return done[0]


def test_a_write_that_a_stalled_redis_runs_after_its_deadline_does_nothing(
    tmp_path: Path, own_redis: RedisExecutor
) -> None:
    # Timeout 1 s: the client waits up to 1 s, but a write may apply only within
    # half of it.  Redis wakes at 0.7 s, while the client still waits: the
    # script must see that it is late, and the answer must say so.
    client = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0", REDIS_TIMEOUT=1.0).test_client()
    assert client.get("/inc").text == "counter is 1"
    answers: list[tuple[int, str]] = []
    pid = _stalled(own_redis)
    try:
        sender = threading.Thread(target=lambda: answers.append((client.get("/inc").status_code, "")))
        sender.start()
        time.sleep(0.7)
    finally:
        os.kill(pid, signal.SIGCONT)
    sender.join(5)
    assert answers[0][0] == 503
    assert client.get("/counter").text == "counter is 1", "the late write did nothing"


def test_a_timed_out_write_is_sent_once_and_answered_within_the_timeout(
    tmp_path: Path, own_redis: RedisExecutor
) -> None:
    # With redis-py's retries on, a timed-out write would be sent again on a new
    # connection, and the 503 would come after twice the timeout or more.
    client = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0", REDIS_TIMEOUT=1.0).test_client()
    assert client.get("/inc").text == "counter is 1"
    admin = redis.Redis(port=own_redis.port)
    before = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    failed = _failures(client, "unavailable")
    response, took = _during_a_stall(own_redis, lambda: client.get("/inc"))
    assert response.status_code == 503
    assert "may or may not have been applied" in response.text, "its outcome is unknown, and the answer says so"
    assert _failures(client, "unavailable") == failed + 1
    after = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert after - before == 1, "no second copy reached Redis"
    assert took < 1.6, f"answered after {took:.2f} s on a 1 s timeout"
    admin.close()


@pytest.mark.parametrize("path", ["/counter", "/global", "/healthz", "/inc", "/global/inc"])
def test_reads_and_writes_on_a_hung_redis_answer_503_within_the_timeout(
    tmp_path: Path, own_redis: RedisExecutor, path: str
) -> None:
    app = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0", REDIS_TIMEOUT=1.0)
    client = app.test_client()
    assert client.get("/inc").text == "counter is 1"
    response, took = _during_a_stall(own_redis, lambda: client.get(path))
    assert response.status_code == 503 and response.headers["Retry-After"]
    # Within one timeout (and some slack for a busy machine), not two: a retry would double it.
    assert took < 1.6, f"{path} waited {took:.2f} s on a 1 s timeout"


def test_stats_judge_ages_by_each_write_not_by_the_callers_lifetime(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    # cron runs `flask sessions stats` without the service's environment: its
    # lifetime is the default 31 days, the service's was 100 s.
    service = _app_on(tmp_path, redis_url, REDIS_PREFIX=redis_prefix, PERMANENT_SESSION_LIFETIME=100)
    service.test_client().get("/inc")
    cron = _app_on(tmp_path, redis_url, REDIS_PREFIX=redis_prefix)
    output = cron.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "sessions: 1\n" in output
    assert "oldest: written 0s ago" in output or "oldest: written 1s ago" in output, output


def test_a_change_that_always_meets_a_concurrent_write_gives_up_with_a_503_and_writes_nothing(
    redis_url: str, redis_prefix: str
) -> None:
    # The compare-and-set on the version, seen from the losing side: every
    # attempt is beaten by another writer, so none may land, and the retries end.
    store, other = RedisStore(redis_url, prefix=redis_prefix), RedisStore(redis_url, prefix=redis_prefix)
    store.add("session:k", "counter", 1, 60)
    attempts = 0

    def beaten(record: dict[str, object]) -> dict[str, object]:
        nonlocal attempts
        attempts += 1
        other.add("session:k", "counter", 1, 60)  # another instance's increment lands first
        return record | {"theme": "dark"}

    with pytest.raises(StorageError) as refused:
        store.update("session:k", beaten, 60)
    assert (refused.value.kind, refused.value.status) == ("contention", 503)
    assert refused.value.message == "too many concurrent updates of one session"
    assert attempts == MAX_ATTEMPTS
    assert store.load("session:k") == {"counter": 1 + MAX_ATTEMPTS}, "every increment kept, no theme written"


def test_stats_count_each_live_session_its_memory_and_the_oldest_write(
    tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three sessions of today's layout, written 100, 300 and 200 s ago by Redis's clock (the
    # time each write records), and two of an earlier layout, which record no time: one with
    # 4000 s left of a 5000 s lifetime (written 1000 s ago), one with no TTL (of no known age).
    app = _app_on(tmp_path, redis_url, REDIS_PREFIX=redis_prefix, PERMANENT_SESSION_LIFETIME=5000)
    for _ in range(3):
        assert app.test_client().get("/inc").text == "counter is 1"
    assert app.test_client().get("/global/inc").status_code == 200  # a key of ours, not a session
    direct = redis.Redis.from_url(redis_url)
    current = direct.keys(redis_prefix + "session:*")
    now = direct.time()[0]
    for key, age in zip(current, (100, 300, 200), strict=True):
        direct.hset(key, "_w", now - age)
    old = redis_prefix + "session:session:" + _store_the_old_way(direct, redis_prefix, 1)
    direct.pexpire(old, 4_000_000)
    ageless = redis_prefix + "session:session:" + _store_the_old_way(direct, redis_prefix, 1)
    direct.persist(ageless)
    # SCAN's order is Redis's choice: the awkward ones come first here, the oldest not last,
    # and a session that expires between SCAN and its reading is among them.
    store = app.session_interface.store  # type: ignore[attr-defined]
    scan = store._session_keys
    first = [(redis_prefix + "session:gone").encode(), ageless.encode(), old.encode()]

    def awkward_first(client: redis.Redis) -> Iterator[bytes]:
        return iter(first + [key for key in scan(client) if key not in first])

    monkeypatch.setattr(store, "_session_keys", awkward_first)

    def stats() -> tuple[str, int]:
        output = app.test_cli_runner().invoke(args=["sessions", "stats"]).output
        size = sum(int(direct.memory_usage(key) or 0) for key in [*current, old, ageless])
        assert "sessions: 5\n" in output and f"bytes: {size} (" in output, output
        oldest = re.search(r"oldest: written (\d+)s ago", output)
        assert oldest, output
        return output, int(oldest.group(1))

    output, oldest = stats()
    assert 1000 <= oldest <= 1002, output
    direct.hset(current[0], "_w", now - 2000)  # now one of today's layout is the oldest
    output, oldest = stats()
    assert 2000 <= oldest <= 2002, output
    assert "kept 5," in app.test_cli_runner().invoke(args=["sessions", "prune"]).output, "prune and stats agree"
    direct.close()


def test_a_write_past_its_deadline_does_nothing_and_says_it_came_too_late(
    redis_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline itself, without a stall: every script is sent with one already past,
    # as a stalled Redis would find it on waking.
    client = redis_app.test_client()
    assert client.get("/inc").text == "counter is 1"
    store = redis_app.session_interface.store  # type: ignore[attr-defined]
    monkeypatch.setattr(store, "_deadline", lambda client: 0)
    for path in ("/inc", "/reset", "/global/inc"):
        response = client.post(path)
        assert response.status_code == 503 and response.text == "Redis answered too late", path
    with pytest.raises(StorageError) as late:
        store.increment_global()
    assert (late.value.kind, late.value.status) == ("unavailable", 503)
    monkeypatch.undo()
    assert client.get("/counter").text == "counter is 1"
    assert client.get("/global").text == "global counter is 0"


def test_a_redis_that_refuses_writes_for_want_of_replicas_is_a_503_and_healthz_says_so(
    tmp_path: Path, own_redis: RedisExecutor
) -> None:
    client = _app_on(tmp_path, f"redis://127.0.0.1:{own_redis.port}/0").test_client()
    assert client.get("/inc").text == "counter is 1"
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("min-replicas-to-write", 1)  # and none follows it
    response = client.get("/inc", headers={"Accept": "application/json"})
    assert response.status_code == 503 and "too few replicas" in json_of(response)["error"]
    health = client.get("/healthz")
    assert health.status_code == 503 and json_of(health)["kind"] == "not_replicated", "the probe writes"
    admin.config_set("min-replicas-to-write", 0)
    assert client.get("/inc").text == "counter is 2", "the refused write counted nothing"
    admin.close()


def test_reads_and_maintenance_on_an_unreachable_redis_are_a_storage_error_at_once(tmp_path: Path) -> None:
    # Refused at once, and not tried again: redis-py's retries are off for every command.
    store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.5)
    for operation in (store.read_global, store.migrate, store.count, lambda: store.stats(60), store.check):
        began = time.monotonic()
        with pytest.raises(StorageError) as caught:
            operation()
        assert (caught.value.kind, caught.value.status) == ("unavailable", 503)
        assert time.monotonic() - began < 0.5


def test_migrate_leaves_a_key_it_cannot_read_as_a_session_alone(
    redis_app: Flask, redis_url: str, redis_prefix: str
) -> None:
    direct = redis.Redis.from_url(redis_url)
    sid = _store_the_old_way(direct, redis_prefix, 7)
    foreign = redis_prefix.encode() + b"session:\xff\xfe not text"
    direct.hset(foreign, "counter", "3")
    result = redis_app.test_cli_runner().invoke(args=["sessions", "migrate"])
    assert result.exit_code == 0 and "moved 1 sessions" in result.output, result.output
    assert direct.hget(foreign, "counter") == b"3"
    client = redis_app.test_client()
    client.set_cookie("session", sid)
    assert client.get("/counter").text == "counter is 7"
    direct.close()


def _from(exc: Exception, cause: Exception) -> Exception:
    exc.__cause__ = cause
    return exc


def _looping(exc: Exception) -> Exception:
    """An error that is its own cause: a chain that never ends."""
    return _from(exc, exc)


@pytest.mark.parametrize(
    ("failure", "kind", "says"),
    [
        (rx.ResponseError("TALLY_LATE"), "unavailable", "Redis answered too late"),
        (
            rx.ResponseError("NOREPLICAS Not enough good replicas to write."),
            "not_replicated",
            "Redis refused the write: too few replicas follow it",
        ),
        *[
            # As redis-py's parser makes them: "MOVED 3999 127.0.0.1:7000" is MovedError("3999 127.0.0.1:7000").
            (changing, "unavailable", "the Redis Cluster is changing; try again shortly")
            for changing in (
                rx.MovedError("3999 127.0.0.1:7000"),
                rx.AskError("3999 127.0.0.1:7000"),
                rx.TryAgainError("Multiple keys request during rehashing of slot"),
                rx.ClusterDownError("Hash slot not served"),
            )
        ],
        (rx.OutOfMemoryError("OOM command not allowed"), "redis_oom", "Redis is out of memory"),
        (
            rx.ReadOnlyError("READONLY You can't write against a read only replica."),
            "read_only",
            "Redis is read-only (a replica?)",
        ),
        *[
            (refusal, "permission", "Redis refused our credentials")
            for refusal in (
                rx.AuthenticationError("invalid password"),
                rx.AuthorizationError("no"),
                rx.NoPermissionError("no"),
                # What a Cluster client raises when no startup node lets it in.
                _from(rx.RedisClusterException("no node could be reached"), rx.AuthenticationError("invalid password")),
            )
        ],
        (MasterNotFoundError("No master found for 'tally'"), "unavailable", "no Redis primary is known (a failover?)"),
        (rx.TimeoutError("Timeout reading from socket"), "unavailable", "Redis did not answer in time"),
        *[
            (lost, "unavailable", "Redis is unreachable")
            for lost in (
                rx.ConnectionError("Connection refused"),
                rx.ClusterError("no node"),
                rx.RedisClusterException("down"),
                _looping(rx.ConnectionError("reset by peer")),
            )
        ],
        (
            rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
            "redis_error",
            "Redis failed: WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
    ],
)
def test_each_redis_failure_has_a_kind_a_status_and_a_message(failure: Exception, kind: str, says: str) -> None:
    # The kind labels /healthz and the metrics; the message is the 503's body.
    error = _translate(failure)
    assert isinstance(error, StorageError)
    assert (error.kind, error.status, error.message) == (kind, 503, says)


def test_writes_made_while_the_clock_is_measured_again_all_apply(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write's deadline is in Redis's clock, whose offset one request measures
    # again every few seconds (every 10 ms here) while the others go on with the
    # offset they have: no write may be judged late meanwhile.
    monkeypatch.setattr(redis_store, "CLOCK_CHECK_SECONDS", 0.01)
    store = RedisStore(redis_url, prefix=redis_prefix)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: store.add("session:k", "counter", 1, 60), range(400)))
    assert store.load("session:k") == {"counter": 400}


def test_sentinel_and_cluster_hosts_are_read_with_their_port_or_the_default() -> None:
    from tally.store.redis_connect import ClusterTarget, connect

    target = connect("redis+sentinel://sentinel-a:26380, sentinel-b ,[::2],[::1]:26381/mymaster", 1.0)
    sentinels = target.client_for("k").connection_pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
    hosts = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"]) for s in sentinels
    ]
    assert hosts == [("sentinel-a", 26380), ("sentinel-b", 26379), ("::2", 26379), ("::1", 26381)]
    # Every connection times out, and never sends a command twice: one server's, a
    # Sentinel primary's, and the sentinels' own.
    single = connect("redis://127.0.0.1:6379/0", 1.0).client_for("k").connection_pool.connection_kwargs
    primary = target.client_for("k").connection_pool.connection_kwargs
    for kwargs in (single, primary, sentinels[0].connection_pool.connection_kwargs):
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.0
        assert kwargs["retry"].get_retries() == 0
    cluster = connect("redis+cluster://node-a:7000,node-b", 1.0)
    assert isinstance(cluster, ClusterTarget)
    assert [(node.host, node.port) for node in cluster._nodes] == [("node-a", 7000), ("node-b", 6379)]
    assert cluster._kwargs["socket_timeout"] == cluster._kwargs["socket_connect_timeout"] == 1.0
    assert not connect("unix:///run/redis/redis.sock", 1.0).cluster


@pytest.mark.parametrize("url", ["redis+sentinel://[::1]:26379/mymaster", "redis+cluster://[::1]:7000"])
def test_an_ipv6_address_may_come_first_in_a_sentinel_or_cluster_url(url: str) -> None:
    from tally.store.redis_connect import connect

    # Made without connecting (a Cluster connects on first use): only the URL is read here.
    assert connect(url, 1.0).cluster == url.startswith("redis+cluster")


def test_a_counter_the_slow_path_repairs_keeps_the_session_lifetime(
    redis_app: Flask, redis_url: str, redis_prefix: str
) -> None:
    # HINCRBY refuses a field that is not an integer; the read-modify-write that
    # repairs it writes the session with its lifetime like any other write (2 s here).
    client = redis_app.test_client()
    assert client.get("/inc").text == "counter is 1"
    direct = redis.Redis.from_url(redis_url)
    [key] = direct.keys(redis_prefix + "session:*")
    assert 1000 < direct.pttl(key) <= 2000, "as HINCRBY's path does"
    direct.hset(key, "counter", '"seven"')
    assert client.get("/inc").text == "counter is 1"
    assert 1000 < direct.pttl(key) <= 2000
    direct.close()


def test_the_deadline_is_half_the_timeout_ahead_in_redis_clock_however_long_the_machine_is_up(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline is kept in our monotonic clock plus a measured offset: after
    # 116 days up, it must still be half the timeout ahead of Redis's own clock.
    real = time.monotonic
    monkeypatch.setattr(redis_store, "time", SimpleNamespace(monotonic=lambda: real() + 10_000_000))
    store = RedisStore(redis_url, timeout=1.0)
    client = store.target.client_for("k")
    seconds, micros = client.time()
    ahead = store._deadline(client) - (seconds * 1_000_000 + micros)
    assert 400_000 < ahead <= 510_000, f"{ahead} µs ahead on a 1 s timeout"


#: Run in a process of its own, so that pytest's process (and coverage's data in it) never forks.
_FORKED = """
import os, sys
from tally.store.redis import RedisStore

store = RedisStore(sys.argv[1], prefix=sys.argv[2])
for key in ("parent", "child"):
    store.update(key, lambda record: {"counter": 0}, 600)
assert store.add("parent", "counter", 1, 600) == 1
ready, go = os.pipe()
child = os.fork()
if child == 0:
    try:
        os.write(go, b"!")  # both count at once from here
        mine = [store.add("child", "counter", 1, 600) for _ in range(500)]
        os._exit(0 if mine == list(range(1, 501)) else 1)
    except BaseException:
        os._exit(2)
assert os.read(ready, 1) == b"!"
mine = [store.add("parent", "counter", 1, 600) for _ in range(500)]
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), mine == list(range(2, 502)), store.load("parent"), store.load("child"))
"""


def test_a_forked_process_counts_on_connections_of_its_own(redis_url: str, redis_prefix: str) -> None:
    # A server that forks its workers after the store has run a command (gunicorn's
    # --preload) must not share the parent's kept connection with its children:
    # one would read the other's replies, the counts of another session.
    run = subprocess.run(
        [sys.executable, "-c", _FORKED, redis_url, redis_prefix], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    # The child's exit code (0: it saw its own counts), whether the parent saw its own, what is stored.
    assert run.stdout.strip().split(maxsplit=2) == ["0", "True", "{'counter': 501} {'counter': 500}"]


def test_a_redis_user_refused_a_command_we_send_gets_a_503_saying_so(own_redis: RedisExecutor) -> None:
    # A Redis ACL that leaves out a command Tally sends (here TIME, which the
    # write deadline needs) is a refusal of our credentials, not a crash.
    admin = redis.Redis(port=own_redis.port)
    admin.acl_setuser("tally", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-time"])
    store = RedisStore(f"redis://tally:pw@127.0.0.1:{own_redis.port}/0")
    with pytest.raises(StorageError) as caught:
        store.add("s", "counter", 1, 60)
    assert (caught.value.kind, caught.value.status) == ("permission", 503)


# What Tally sends: text (its keys, field names and JSON values) and 64-bit integers.
_ARGUMENTS = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"])),  # lone surrogates are not text that UTF-8 can carry
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@given(args=st.lists(_ARGUMENTS, max_size=8))
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(args: list[str | int]) -> None:
    connection = redis.connection.Connection()  # type: ignore[no-untyped-call]  # packing needs no server
    commands = (("EVALSHA", "f" * 40, 1, "tally:session:x", *args), ("WAIT", 1, 666))
    assert b"".join(redis_store._packed(connection, commands)) == b"".join(connection.pack_commands(commands))  # type: ignore[no-untyped-call]


def test_without_hiredis_redis_py_packs_and_the_store_counts_as_before(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_pack_command", None)
    store = RedisStore(redis_url, prefix=redis_prefix)
    assert [store.add("session:a", "counter", 1, 60) for _ in range(3)] == [1, 2, 3]
    assert store.increment_global() == 1


def _counting_polls(connection: redis.connection.Connection, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ``connection``'s ``can_read`` calls: the polls of a wait for its reply."""
    polls = [0]
    can_read = connection.can_read

    def counted(timeout: float = 0) -> bool:
        polls[0] += 1
        return bool(can_read(timeout))

    monkeypatch.setattr(connection, "can_read", counted)
    return polls


def test_a_redis_whose_replies_come_late_stops_being_waited_for_awake(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting awake pays only for a Redis that answers within microseconds; one across a network costs ~nothing."""
    monkeypatch.setattr(redis_connect, "REPLY_REST", 3)
    client = redis.Redis.from_url(redis_url)
    connection = client.connection_pool.get_connection()
    polls = _counting_polls(connection, monkeypatch)
    wait = redis_connect.ReplyWait()

    def polled(command: tuple[Any, ...], settle: float = 0) -> int:
        before = polls[0]
        connection.send_command(*command)  # type: ignore[no-untyped-call]
        time.sleep(settle)
        wait.wait(connection)
        connection.read_response()
        return polls[0] - before

    late = ("WAIT", 1, 50)  # no replica: the reply comes when its 50 ms are up, far beyond the 100 µs awake
    in_time = ("PING",)
    assert all(polled(late) >= 1 for _ in range(redis_connect.REPLY_MISSES - 1)), "each is polled for"
    assert polled(in_time, settle=0.02) == 1, "a reply already there is read at the first poll"
    # That reply came in time, so the count of late ones starts again.
    assert all(polled(late) >= 1 for _ in range(redis_connect.REPLY_MISSES)), "late again, as many in a row"
    assert [polled(late) for _ in range(3)] == [0, 0, 0], "then REPLY_REST commands sleep on the socket at once"
    assert all(polled(late) >= 1 for _ in range(redis_connect.REPLY_MISSES)), "and then tries as often again"
    assert polled(late) == 0, "before it rests once more"
    client.connection_pool.release(connection)
    client.close()


@pytest.mark.parametrize("gevent", [True, False], ids=["gevent", "threads"])
def test_under_gevent_a_reply_is_never_waited_for_awake(redis_url: str, gevent: bool) -> None:
    """Under gevent the worker goes back to its hub at once, where other greenlets wait to run."""
    script = f"""
if {gevent}:
    from gevent import monkey
    monkey.patch_all()
import redis
from tally.store.redis_connect import replies
connection = redis.Redis.from_url({redis_url!r}).connection_pool.get_connection()
polls = 0
can_read = connection.can_read
def counted(timeout=0):
    global polls
    polls += 1
    return can_read(timeout)
connection.can_read = counted
for _ in range(3):
    connection.send_command("PING")
    replies.wait(connection)
    assert connection.read_response() in (b"PONG", "PONG")
print(polls)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    polls = int(run.stdout)
    assert polls == 0 if gevent else polls >= 3


# -- Under gevent, one worker's concurrent commands travel as one pipeline --------

_GEVENT_STORE = """
from gevent import monkey
monkey.patch_all()
import json, os, signal, sys, time
import gevent, redis
from tally.store import StorageError
from tally.store.redis import RedisStore
url = sys.argv[1]
admin = redis.Redis.from_url(url)
store = RedisStore(url, timeout={timeout}, prefix="gevent:")
started = time.monotonic()
def attempt(call, i):
    # In a greenlet of its own: call(i), or its error's text, and when it returned.
    try:
        result = call(i)
    except StorageError as exc:
        result = f"{{exc.status}} {{exc.kind}}: {{exc}}"
    return [result, time.monotonic() - started]
def spawn(call, n):
    return [gevent.spawn(attempt, call, i) for i in range(n)]
def outcomes(greenlets):
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    return [greenlet.value for greenlet in greenlets]
"""


def _run_gevent_store(script: str, server: RedisExecutor, timeout: float) -> Any:
    """Run ``script`` after :data:`_GEVENT_STORE`, on ``server``; what it printed, as JSON."""
    program = _GEVENT_STORE.format(timeout=timeout) + script
    url = f"redis://127.0.0.1:{server.port}/0"
    run = subprocess.run([sys.executable, "-c", program, url], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(run.stdout)


def test_under_gevent_concurrent_commands_share_one_connection_each_with_its_own_replies(
    own_redis: RedisExecutor,
) -> None:
    """Twenty greenlets, five increments each, of four sessions: as if each had a connection of its own."""
    seen = _run_gevent_store(
        """
store.add("warm", "counter", 1, 60)  # connected, its scripts loaded, and Redis's clock read
before = admin.info("stats")["total_connections_received"]
def increments(i):
    return [store.add(f"s{i % 4}", "counter", 1, 60) for _ in range(5)]
results = outcomes(spawn(increments, 20))
connections = admin.info("stats")["total_connections_received"] - before
print(json.dumps({"results": results, "connections": connections, "s0": store.load("s0")}))
""",
        own_redis,
        timeout=5,
    )
    by_session: dict[int, list[int]] = {s: [] for s in range(4)}
    for i, (counts, _) in enumerate(seen["results"]):
        assert counts == sorted(counts), f"greenlet {i}'s own increments came back in order: {counts}"
        by_session[i % 4] += counts
    for session, counts in by_session.items():
        assert sorted(counts) == list(range(1, 26)), f"session {session}: each increment got its own count"
    assert seen["s0"] == {"counter": 25}
    assert seen["connections"] == 0, "the connection the worker already had carried all its concurrent commands"


def test_under_gevent_concurrent_commands_for_two_redis_servers_each_go_to_their_own(
    own_redis: RedisExecutor, redis_url: str, redis_prefix: str
) -> None:
    """One worker's commands for two Redis (a Cluster's primaries, or two stores) go in separate pipelines."""
    seen = _run_gevent_store(
        f"other = RedisStore({redis_url!r}, timeout=5, prefix={redis_prefix!r})\n"
        + """
store.add("warm", "counter", 1, 60)  # each connected, its script loaded, and its clock read
other.add("warm", "counter", 1, 60)
def increments(i):
    return [(store if i % 2 else other).add("s", "counter", 1, 60) for _ in range(5)]
results = outcomes(spawn(increments, 20))
print(json.dumps({"results": results, "here": store.load("s"), "there": other.load("s")}))
""",
        own_redis,
        timeout=5,
    )
    counts = [count for i, (counts, _) in enumerate(seen["results"]) if i % 2 for count in counts]
    assert sorted(counts) == list(range(1, 51)), "each increment of this server's session got its own count"
    assert (seen["here"], seen["there"]) == ({"counter": 50}, {"counter": 50}), "each on its own server"


def test_under_gevent_commands_queued_behind_a_hung_redis_fail_at_once_unsent(own_redis: RedisExecutor) -> None:
    """Only what was sent may have been applied; the rest is refused within the one timeout, not one each."""
    seen = _run_gevent_store(
        """
store.add("s", "counter", 1, 60)  # connected, and Redis's clock read
pid = int(admin.info("server")["process_id"])
os.kill(pid, signal.SIGSTOP)
try:
    started = time.monotonic()
    sent = spawn(lambda i: store.add("s", "counter", 1, 60), 5)
    gevent.sleep(0.2)  # the first five's batch is under way: the next five queue behind it
    queued = spawn(lambda i: store.add("s", "counter", 1, 60), 5)
    results = {"sent": outcomes(sent), "queued": outcomes(queued)}
finally:
    os.kill(pid, signal.SIGCONT)
time.sleep(0.2)
print(json.dumps({**results, "counter": store.load("s")["counter"]}))
""",
        own_redis,
        timeout=1.0,
    )
    sent = [answer for answer, _ in seen["sent"]]
    queued = [answer for answer, _ in seen["queued"]]
    assert all("may or may not have been applied" in answer for answer in sent), sent
    assert queued == ["503 unavailable: Redis did not answer in time"] * 5, (
        "refused, unsent, when the batch ahead timed out"
    )
    slowest = max(seconds for _, seconds in seen["sent"] + seen["queued"])
    assert slowest < 1.5, f"every answer within the 1 s timeout, not one timeout after another: {slowest:.2f} s"
    assert seen["counter"] == 1, "what was sent arrived late, and its deadline made it a no-op"


def test_under_gevent_commands_queued_behind_a_cut_connection_go_on_down_a_new_one(own_redis: RedisExecutor) -> None:
    """A connection cut under a batch (a failover, CLIENT KILL) fails that batch alone."""
    seen = _run_gevent_store(
        """
store.add("s", "counter", 1, 60)  # connected, and Redis's clock read
admin.client_pause(5000, all=False)  # writes wait, scripts among them
sent = spawn(lambda i: store.add("s", "counter", 1, 60), 3)
gevent.sleep(0.2)  # their batch waits in Redis: the next three queue behind it
queued = spawn(lambda i: store.add("s", "counter", 1, 60), 3)
gevent.sleep(0.2)
me = admin.client_id()
for client in admin.client_list():
    if int(client["id"]) != me:
        admin.client_kill_filter(_id=client["id"])  # Redis drops the paused commands with their connection
admin.client_unpause()
print(json.dumps({"sent": outcomes(sent), "queued": outcomes(queued), "counter": store.load("s")["counter"]}))
""",
        own_redis,
        timeout=5,
    )
    sent = [answer for answer, _ in seen["sent"]]
    assert all("may or may not have been applied" in answer for answer in sent), sent
    assert sorted(answer for answer, _ in seen["queued"]) == [2, 3, 4], "the queued went on, each counted once"
    assert seen["counter"] == 4


def test_under_gevent_concurrent_writes_wait_for_replicas_together(own_redis: RedisExecutor) -> None:
    """With no replica following, six concurrent writes each get the replicas' 503 within a third of the timeout.

    Were each write's WAIT sent after it, the second write would wait for the
    first's WAIT to run out, the third for two: the later ones would be too late.
    """
    seen = _run_gevent_store(
        """
store.add("s", "counter", 1, 60)  # connected, and the script loaded
waiting = RedisStore(url, timeout=0.9, prefix="gevent:", replicas=1)
outcomes(spawn(lambda i: waiting.add("s", "counter", 1, 60), 1))  # Redis's clock read
admin.config_resetstat()
started = time.monotonic()
results = outcomes(spawn(lambda i: waiting.add("s", "counter", 1, 60), 6))
print(json.dumps({"results": results, "waits": admin.info("commandstats")["cmdstat_wait"]["calls"]}))
""",
        own_redis,
        timeout=0.9,
    )
    answers = [answer for answer, _ in seen["results"]]
    unconfirmed = (
        "503 not_replicated: fewer than 1 Redis replicas confirmed the write; "
        "this change may or may not have been applied"
    )
    assert answers == [unconfirmed] * 6, answers
    slowest = max(seconds for _, seconds in seen["results"])
    assert slowest < 0.6, f"answered once a third of the 0.9 s timeout ran out, not later: {slowest:.2f} s"
    assert seen["waits"] < 6, "the writes that went to Redis together waited together"
