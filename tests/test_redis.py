"""The Redis store: several instances share counters with no lost update."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from pytest_redis.executor.process import RedisExecutor

from conftest import ServerFactory, burst_across, counter_of
from tally import create_app
from tally.store import StorageError
from tally.store.redis import RedisStore


@pytest.fixture
def redis_app(tmp_path: Path, redis_url: str, redis_prefix: str):  # type: ignore[no-untyped-def]
    return create_app(
        {"REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix, "SECRET_KEY": "k", "PERMANENT_SESSION_LIFETIME": 2},
        instance_path=str(tmp_path),
    )


def test_the_contract_holds_on_redis(redis_app) -> None:  # type: ignore[no-untyped-def]
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


def test_sessions_live_in_redis_with_the_session_lifetime_as_ttl(redis_app, redis_url: str, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
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
    time.sleep(2.1)
    assert not direct.exists(key)
    assert client.get("/counter").text == "counter is 0"
    direct.close()


@pytest.mark.parametrize(
    ("damage", "deleted"),
    [
        (lambda r, key: r.set(key, b"\x80\x04\x95garbage that pickle would love"), True),
        (lambda r, key: r.hset(key, "counter", b"\xff\xfe not json"), True),
        # Valid JSON but not an integer: read as 0, and the next increment repairs it.
        (lambda r, key: r.hset(key, "counter", b'"seven"'), False),
    ],
    ids=["not-a-hash", "not-json", "not-an-integer"],
)
def test_corrupt_data_in_redis_never_gives_a_5xx(  # type: ignore[no-untyped-def]
    redis_app, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture, damage, deleted: bool
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


def test_the_full_64_bit_range_is_exact_on_redis(redis_app) -> None:  # type: ignore[no-untyped-def]
    client = redis_app.test_client()
    top = 2**63 - 1
    assert client.get(f"/inc?by={top - 1}").text == f"counter is {top - 1}"
    assert client.get("/inc").text == f"counter is {top}"
    assert client.get("/inc").status_code == 400
    assert client.get("/counter").text == f"counter is {top}"
    assert client.get(f"/dec?by={top}").text == "counter is 0"


def test_two_instances_share_one_cookie_without_losing_updates(  # type: ignore[no-untyped-def]
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


def _load(server, cookie: str, stop: threading.Event, acked: list[int], failures: list, unknown: list[str]) -> None:  # type: ignore[no-untyped-def]
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


def test_a_hung_redis_gets_503_in_bounded_time_and_counts_resume_exactly(  # type: ignore[no-untyped-def]
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    server = serve(workers=2, threads=4, redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_timeout="1")
    cookie = server.new_client()
    stop, acked, failures, unknown = threading.Event(), [], [], []
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


def test_a_killed_and_restarted_redis_loses_no_acknowledged_count(  # type: ignore[no-untyped-def]
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    server = serve(workers=2, threads=4, redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_timeout="1")
    cookie = server.new_client()
    assert server.burst("/inc", 50, cookie).statuses == [200] * 50
    own_redis.kill(signal.SIGKILL)
    down = server.get("/inc", cookie)
    assert down.status_code == 503 and down.headers["Retry-After"]
    assert server.get("/counter", cookie).status_code == 503
    own_redis.start()
    assert server.get("/inc", cookie).text == "counter is 52"


def test_connections_redis_closed_while_idle_are_replaced_without_an_error(  # type: ignore[no-untyped-def]
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    # What a Redis with an idle "timeout", a failover or CLIENT KILL does to
    # the connections a server keeps between requests.
    server = serve(workers=2, threads=4, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
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


def test_stats_counts_redis_sessions(redis_app) -> None:  # type: ignore[no-untyped-def]
    for by in (1, 2, 3):
        redis_app.test_client().get(f"/inc?by={by}")
    output = redis_app.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "store: redis" in output and "sessions: 3\n" in output
    assert "oldest: written 0s ago" in output or "oldest: written 1s ago" in output
    assert "removed 0 expired" in redis_app.test_cli_runner().invoke(args=["sessions", "prune"]).output
