"""Storage failures get a clear 503/507, change nothing, and clear by themselves."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import json_of
from tally import create_app
from tally.store.files import storage_error


@pytest.fixture
def disk_app(small_disk: Path, tmp_path: Path) -> Flask:
    return create_app({"SESSION_DIR": str(small_disk / "sessions"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_is_a_507_that_claims_nothing_and_clears_by_itself(
    disk_app: Flask, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    existing = disk_app.test_client()
    assert existing.get("/inc?by=2").text == "counter is 2"
    filler = fill(small_disk)
    with caplog.at_level(logging.WARNING, logger="tally"):
        for _ in range(20):
            newcomer = disk_app.test_client()
            response = newcomer.get("/inc")
            assert response.status_code == 507
            assert response.headers["Retry-After"]
            assert "disk is full" in response.text and "counter is" not in response.text
            assert "Set-Cookie" not in response.headers
            assert newcomer.get("/counter").text == "counter is 0"
    assert len([r for r in caplog.records if "storage fault" in r.message]) == 1, "one warning per fault"
    # Sessions that already have their block keep counting on a full disk.
    assert existing.get("/inc").text == "counter is 3"
    filler.unlink()
    assert disk_app.test_client().get("/inc").text == "counter is 1"
    assert existing.get("/counter").text == "counter is 3"


def test_a_full_disk_is_a_507_for_new_addresses_too_with_the_per_address_limit_on(
    small_disk: Path, tmp_path: Path
) -> None:
    # The limit keeps its counts on the same disk; writing one there fails first.
    app = create_app(
        {"SESSION_DIR": str(small_disk / "sessions"), "SECRET_KEY": "k", "NEW_SESSIONS_PER_MINUTE": 1000},
        instance_path=str(tmp_path),
    )
    assert app.test_client().get("/inc").status_code == 200
    fill(small_disk)
    for n in range(5):
        response = app.test_client().get("/inc", environ_base={"REMOTE_ADDR": f"192.0.2.{n + 10}"})
        assert response.status_code == 507, response.text
        assert "disk is full" in response.text and "Set-Cookie" not in response.headers


def test_a_write_the_disk_cuts_short_is_a_507_and_the_previous_value_stands(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/inc").text == "counter is 1"
    write = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: write(fd, data[: len(data) // 2], offset))
    response = client.get("/inc")
    monkeypatch.undo()
    assert response.status_code == 507 and "disk is full" in response.text
    assert client.get("/counter").text == "counter is 1"


def test_an_unusable_folder_is_a_503_with_retry_after_5(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # the folder would be inside a file: every write fails
    app = create_app({"SESSION_DIR": str(tmp_path / "file" / "sessions")}, instance_path=str(tmp_path / "instance"))
    client = app.test_client()
    for path in ("/inc", "/global/inc", "/healthz"):
        response = client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert "Set-Cookie" not in response.headers and "counter" not in response.text
    assert client.get("/counter").text == "counter is 0"


def test_a_read_only_filesystem_is_a_503_and_reads_still_work(disk_app: Flask, small_disk: Path) -> None:
    client = disk_app.test_client()
    client.get("/inc?by=4")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        response = client.get("/inc", headers={"Accept": "application/json"})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert "read-only" in json_of(response)["error"]
        assert client.get("/counter").text == "counter is 4"
        assert client.get("/global/inc").status_code == 503
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert client.get("/inc").text == "counter is 5"


@pytest.mark.parametrize(
    ("code", "kind", "status"),
    [(errno.EACCES, "permission", 503), (errno.EPERM, "permission", 503), (errno.EDQUOT, "disk_full", 507),
     (errno.EIO, "io_error", 503)],
)  # fmt: skip
def test_each_os_error_has_a_kind_and_a_status(code: int, kind: str, status: int) -> None:
    # Root ignores file permissions, so EACCES cannot be provoked here for real.
    error = storage_error(OSError(code, os.strerror(code)))
    assert (error.kind, error.status) == (kind, status)
    assert error.message


def test_an_unusable_session_folder_fails_requests_not_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    app = create_app({"SESSION_DIR": str(blocker / "sessions"), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    response = app.test_client().get("/inc")
    assert response.status_code == 503 and "counter is" not in response.text
    blocker.unlink()
    assert app.test_client().get("/inc").text == "counter is 1", "it recovers once the folder can be made"
    assert stat.S_IMODE((blocker / "sessions").stat().st_mode) == 0o700, "made the owner's alone, as at start"
