"""Operations: /healthz, Prometheus metrics summed over workers, logs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerFactory, free_port
from tally import create_app


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
        assert response.json["kind"] == "read_only" and "read-only" in response.json["reason"]
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
    assert response.status_code == 503 and response.json["kind"] == "disk_full"


def test_healthz_reports_an_unreachable_redis(tmp_path: Path) -> None:
    app = create_app(
        {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_TIMEOUT": 0.5, "SECRET_KEY": "k"},
        instance_path=str(tmp_path),
    )
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.json["store"] == "redis" and response.json["kind"] == "unavailable"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


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
    assert '"GET /inc HTTP/1.1" 200' in log, "the access log is on"


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


def test_metrics_labels_stay_bounded_whatever_methods_clients_invent(client: FlaskClient) -> None:
    for i in range(20):
        assert client.open("/inc", method=f"X{i}").status_code == 405
    methods = {dict(key).get("method") for key in samples(client.get("/metrics").text, "tally_requests_total")}
    assert not any(m and m.startswith("X") for m in methods), "each invented method would be a new series"
    assert "other" in methods
