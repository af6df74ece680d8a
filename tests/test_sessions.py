"""Per-client sessions: isolation, cookies, reads that never write, nothing evicted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import CHROMIUM
from tally import create_app


def session_files(app: Flask) -> list[Path]:
    return sorted(p for p in Path(app.config["SESSION_DIR"]).iterdir() if len(p.name) == 64)


def test_two_clients_have_their_own_counters(app: Flask) -> None:
    alice, bob = app.test_client(), app.test_client()
    alice.get("/inc?by=10")
    bob.get("/dec?by=3")
    alice.get("/inc")
    assert alice.get("/counter").text == "counter is 11"
    assert bob.get("/counter").text == "counter is -3"
    bob.get("/")
    assert alice.get("/counter").text == "counter is 11"


def test_the_cookie_is_httponly_lax_and_expires(client: FlaskClient) -> None:
    client.get("/inc")
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert cookie.http_only and cookie.same_site == "Lax" and not cookie.secure
    assert cookie.expires is not None
    assert len(cookie.value) == 43


def test_secure_cookie_is_configurable(tmp_path: Path) -> None:
    app = create_app({"SESSION_COOKIE_SECURE": True, "SESSION_DIR": str(tmp_path)}, instance_path=str(tmp_path))
    client = app.test_client()
    response = client.get("/inc", base_url="https://localhost")
    assert "Secure" in response.headers["Set-Cookie"]


def test_a_read_leaves_the_stored_session_untouched(app: Flask, client: FlaskClient) -> None:
    client.get("/inc?by=4")
    [path] = session_files(app)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    os.utime(path, ns=(1, 1))  # any write would move the mtime
    for _ in range(3):
        assert client.get("/counter").text == "counter is 4"
        assert client.get("/", headers={"Accept": CHROMIUM}).status_code == 200
        assert client.get("/global").status_code == 200
    assert path.read_bytes() == before[0]
    assert path.stat().st_mtime_ns == 1
    assert "Set-Cookie" not in client.get("/counter").headers


def test_reading_the_global_counter_leaves_its_file_untouched(app: Flask, client: FlaskClient) -> None:
    client.get("/global/inc")
    path = Path(app.config["SESSION_DIR"]) / "global"
    before = path.read_bytes()
    os.utime(path, ns=(1, 1))  # any write would move the mtime
    for _ in range(3):
        assert client.get("/global").text == "global counter is 1"
        assert client.get("/", headers={"Accept": CHROMIUM}).status_code == 200  # the page shows it too
    assert path.read_bytes() == before and path.stat().st_mtime_ns == 1


def test_a_read_with_no_session_stores_nothing(app: Flask, client: FlaskClient) -> None:
    assert client.get("/counter").text == "counter is 0"
    assert client.get("/global").text == "global counter is 0"
    assert session_files(app) == []
    assert client.get_cookie("session") is None


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/"), ("POST", "/reset")])
def test_a_reset_creates_the_session_it_reports(app: Flask, client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    assert response.text == "counter was reset" and "Set-Cookie" in response.headers
    assert len(session_files(app)) == 1
    assert client.get("/inc").text == "counter is 1", "the next increment counts in the same session"
    assert len(session_files(app)) == 1


def test_thousands_of_sessions_are_all_kept(app: Flask) -> None:
    clients = [app.test_client() for _ in range(3000)]
    for n, c in enumerate(clients):
        c.get(f"/inc?by={n}")
    assert len(session_files(app)) == 3000
    for n, c in enumerate(clients):
        assert c.get("/counter").text == f"counter is {n}"


def test_an_unknown_or_garbage_cookie_starts_a_fresh_session(app: Flask, client: FlaskClient) -> None:
    for value in ("A" * 43, "../../etc/passwd", "x" * 4000, "é"):
        client.set_cookie("session", value)
        response = client.get("/inc")
        assert response.text == "counter is 1"
        assert client.get_cookie("session").value != value  # type: ignore[union-attr]
        client.delete_cookie("session")


def test_session_files_are_private_and_hold_no_pickle(app: Flask, client: FlaskClient) -> None:
    client.get("/inc?by=3")
    folder = Path(app.config["SESSION_DIR"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [path] = session_files(app)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert b'"counter":3' in raw
    assert b"\x80\x04" not in raw and b"\x80\x05" not in raw  # pickle protocol headers


def test_the_store_folder_is_created_when_missing(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "er" / "sessions"
    app = create_app({"SESSION_DIR": str(folder), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    assert app.test_client().get("/inc").text == "counter is 1"
    assert folder.is_dir()
