"""Operations: /healthz, Prometheus metrics summed over workers, logs."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pytest_redis.executor.process import RedisExecutor

from conftest import ServerFactory, free_port, json_of, samples, session_files_in
from tally import create_app, faults, ops
from tally.store import files


@pytest.fixture(autouse=True)
def fresh_health_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each /healthz here checks the store anew: these tests change it between calls."""
    monkeypatch.setattr(ops, "HEALTH_CHECK_SECONDS", 0.0)


def test_healthz_reports_a_working_store(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "store": "files"}


def test_healthz_reports_a_read_only_store(small_disk: Path, tmp_path: Path) -> None:
    app = create_app({"SESSION_DIR": str(small_disk / "s"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        response = client.get("/healthz")
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert json_of(response)["kind"] == "read_only" and "read-only" in json_of(response)["reason"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert client.get("/healthz").status_code == 200


def test_healthz_reports_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    app = create_app({"SESSION_DIR": str(small_disk / "s"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    with (small_disk / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    response = client.get("/healthz")
    assert response.status_code == 503 and json_of(response)["kind"] == "disk_full"


def test_healthz_probes_never_read_as_corrupt_and_an_unreadable_disk_is_a_503(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(client.application.config["SESSION_DIR"])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # each one writes the probe over the last
            assert client.get("/healthz").status_code == 200
    assert "corrupt" not in caplog.text and not (folder / files.QUARANTINE_DIR).exists()

    def unreadable(path: str) -> os.statvfs_result:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "statvfs", unreadable)
    response = client.get("/healthz")
    assert response.status_code == 503 and json_of(response)["kind"] == "io_error"


def test_healthz_reports_an_unreachable_redis(tmp_path: Path) -> None:
    app = create_app(
        {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_TIMEOUT": 0.5, "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert json_of(response)["store"] == "redis" and json_of(response)["kind"] == "unavailable"


def total(server, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    text = server.get("/metrics").text
    return sum(value for key, value in samples(text, name).items() if all(item in key for item in labels.items()))


def test_metrics_count_every_request_whichever_worker_answers(serve: ServerFactory) -> None:
    server = serve(workers=4, threads=4)
    before = total(server, "tally_requests_total", route="/inc")
    created = total(server, "tally_sessions_created_total")
    cookie = server.new_client()
    outcome = server.burst("/inc", 300, cookie, threads=32)
    assert outcome.statuses == [200] * 300
    assert len({pid for pid in server.workers()}) == 4
    assert total(server, "tally_requests_total", route="/inc") == before + 301
    assert total(server, "tally_requests_total", route="/inc", status="200") == before + 301
    assert total(server, "tally_sessions_created_total") == created + 1
    assert total(server, "tally_session_contention_total", store="files") > 0, "32 threads on one cookie wait"
    assert total(server, "tally_request_duration_seconds_count", route="/inc") == before + 301
    server.get("/inc?by=x")
    assert total(server, "tally_requests_total", route="/inc", status="400") == 1
    log = server.log.read_text()
    assert re.search(r'127\.0\.0\.1 \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /inc HTTP/1\.1" 200', log), (
        "the access log is on, with the time of each request"
    )


def test_the_latency_histogram_holds_each_request_s_own_time(client: FlaskClient) -> None:
    def latency() -> dict[tuple[tuple[str, str], ...], float]:
        return samples(client.get("/metrics").text, "tally_request_duration_seconds_sum")

    key = (("route", "/inc"),)
    before = latency().get(key, 0.0)
    started = time.perf_counter()
    assert client.get("/inc").status_code == 200
    elapsed = time.perf_counter() - started
    assert 0 < latency()[key] - before <= elapsed


def test_storage_errors_are_counted_by_kind(tmp_path: Path) -> None:
    app = create_app(
        {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_TIMEOUT": 0.5, "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    client = app.test_client()
    before = sum(samples(client.get("/metrics").text, "tally_storage_errors_total").values())
    assert client.get("/global/inc").status_code == 503
    after = samples(client.get("/metrics").text, "tally_storage_errors_total")
    assert after[(("kind", "unavailable"),)] >= 1 and sum(after.values()) == before + 1


def test_corrupt_sessions_set_aside_are_counted(app: Flask, client: FlaskClient) -> None:
    def corrupt() -> float:
        return samples(client.get("/metrics").text, "tally_corrupt_sessions_total").get((("store", "files"),), 0.0)

    before = corrupt()
    assert client.get("/inc").text == "counter is 1"
    [path] = session_files_in(app.config["SESSION_DIR"])
    path.write_bytes(b"not a session")
    assert client.get("/counter").text == "counter is 0"
    assert corrupt() == before + 1


def test_metrics_labels_stay_bounded_whatever_methods_clients_invent(client: FlaskClient) -> None:
    for i in range(20):
        assert client.open("/inc", method=f"X{i}").status_code == 405
    methods = {dict(key).get("method") for key in samples(client.get("/metrics").text, "tally_requests_total")}
    assert not any(m and m.startswith("X") for m in methods), "each invented method would be a new series"
    assert "other" in methods


EXPOSITION = "text/plain; version=1.0.0; charset=utf-8"


def test_metrics_have_a_content_type_prometheus_3_can_parse(client: FlaskClient, serve: ServerFactory) -> None:
    assert client.get("/metrics").headers["Content-Type"] == EXPOSITION
    assert serve(workers=2, threads=2).get("/metrics").headers["Content-Type"] == EXPOSITION


@pytest.mark.parametrize(
    ("settings", "peer", "forwarded", "allowed"),
    [
        ({}, "127.0.0.1", None, True),
        ({}, "10.20.30.40", None, True),
        ({}, "192.168.1.9", None, True),
        ({}, "203.0.113.7", None, False),
        ({}, "2001:db8::1", None, False),
        ({"PROXY_COUNT": 1}, "127.0.0.1", "203.0.113.7", False),  # judged by the real client, not the proxy
        ({"PROXY_COUNT": 1}, "127.0.0.1", "10.0.0.8", True),
        ({"METRICS_ALLOW": ["203.0.113.0/24"]}, "203.0.113.7", None, True),
        ({"METRICS_ALLOW": ["203.0.113.0/24"]}, "127.0.0.1", None, False),
    ],
)
def test_metrics_are_served_only_to_the_allowed_networks(
    tmp_path: Path, settings: dict[str, object], peer: str, forwarded: str | None, allowed: bool
) -> None:
    app = create_app({"SECRET_KEY": "k", **settings}, instance_path=str(tmp_path))
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    response = app.test_client().get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": peer})
    if allowed:
        assert response.status_code == 200 and "tally_requests_total" in response.text
    else:
        assert response.status_code == 403 and "TALLY_METRICS_ALLOW" in response.text
        assert "tally_" not in response.text


def test_healthz_checks_the_store_at_most_once_a_moment(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "HEALTH_CHECK_SECONDS", 0.5)
    checks = []
    store = client.application.session_interface.store  # type: ignore[attr-defined]
    monkeypatch.setattr(store, "check", lambda: checks.append(time.monotonic()))
    for _ in range(50):
        assert client.get("/healthz").status_code == 200
    assert len(checks) == 1, "a load balancer polling often costs one store write"
    time.sleep(0.6)
    assert client.get("/healthz").status_code == 200
    assert len(checks) == 2, "and the check runs again a moment later"


def test_a_storage_fault_is_logged_when_it_starts_and_when_it_clears(
    tmp_path: Path, own_redis: RedisExecutor, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "QUIET_SECONDS", 0.3)
    app = create_app(
        {"REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0", "REDIS_TIMEOUT": 0.5, "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    client = app.test_client()
    assert client.get("/inc").status_code == 200
    own_redis.kill(sig=signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="tally"):
        for _ in range(5):
            assert client.get("/inc").status_code == 503
        own_redis.start()
        assert client.get("/inc").status_code == 200, "within the quiet spell: not yet cleared"
        time.sleep(0.4)
        assert client.get("/inc").status_code == 200
        assert client.get("/inc").status_code == 200
    lines = [r.getMessage() for r in caplog.records if "storage fault" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("storage fault (unavailable):") and "until it clears" in lines[0]
    assert lines[1].startswith("storage fault (unavailable) cleared: 5 operations failed")


def test_under_gunicorn_a_storage_fault_is_logged_when_it_starts_and_when_it_clears(
    serve: ServerFactory, own_redis: RedisExecutor
) -> None:
    # A real fault on a real worker, read from gunicorn's log: Redis stopped, then resumed.
    # quiet_spell_app shortens the minute of quiet after which a fault clears to 2 s.
    server = serve(
        workers=1, threads=4, app="quiet_spell_app:app",
        redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_timeout="0.5",
    )  # fmt: skip
    cookie = server.new_client()

    def fault_lines() -> list[str]:
        return [line for line in server.log.read_text().splitlines() if "storage fault" in line]

    pid = own_redis.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            assert server.get("/inc", cookie).status_code == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    assert server.get("/inc", cookie).status_code == 200
    [started] = fault_lines()  # a success within the quiet spell clears nothing
    assert "[WARNING] tally.faults: storage fault (unavailable): " in started and "until it clears" in started
    time.sleep(2.5)
    assert server.get("/inc", cookie).text == "counter is 3"
    assert fault_lines()[0] == started
    [cleared] = fault_lines()[1:]
    assert re.search(r"tally.faults: storage fault \(unavailable\) cleared: 3 operations failed over \d+ s", cleared)


def test_metrics_networks_hold_under_gunicorn_behind_a_proxy(serve: ServerFactory) -> None:
    proxied = serve(workers=2, threads=2, proxy_count="1")
    assert proxied.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403
    assert proxied.get("/metrics", headers={"X-Forwarded-For": "10.0.0.8"}).status_code == 200
    public_only = serve(workers=2, threads=2, metrics_allow="203.0.113.0/24")
    refused = public_only.get("/metrics")
    assert refused.status_code == 403 and "tally_" not in refused.text


def test_healthz_under_gunicorn_writes_the_store_at_most_once_a_second(serve: ServerFactory) -> None:
    server = serve(workers=1, threads=4)
    probe = server.session_dir / "healthz"

    def writes() -> int:
        slot = files.RecordFileCache.read_slot(str(probe))
        return slot.seq if slot else 0

    assert server.get("/healthz").status_code == 200
    before, began = writes(), time.monotonic()
    for _ in range(40):
        assert server.get("/healthz").status_code == 200
    elapsed = time.monotonic() - began
    assert writes() - before <= int(elapsed) + 1, f"{writes() - before} writes in {elapsed:.1f} s"
