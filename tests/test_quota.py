"""Bounded storage: a flood of new sessions from one address, and a cap on the whole store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from flask import Flask
from pytest_redis.executor.process import RedisExecutor

from conftest import Server, ServerFactory, session_files_in
from tally import create_app
from tally.store.files import RecordFileCache


def _fresh(server: Server, **headers: str) -> requests.Response:
    """A request with no cookie: each one asks for a new session."""
    return requests.get(server.url + "/inc", headers=headers, timeout=30)


@pytest.mark.parametrize("store", ["files", "redis"])
def test_one_address_may_make_only_so_many_sessions_a_minute_across_instances(
    serve: ServerFactory, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    settings = {"new_sessions_per_minute": "20"}
    if store == "redis":
        own_redis: RedisExecutor = request.getfixturevalue("own_redis")
        settings["redis_url"] = f"redis://127.0.0.1:{own_redis.port}/0"
    servers = [serve(workers=2, threads=2, **settings), serve(workers=2, threads=2, **settings)]
    regular = servers[0].new_client()  # a client with a cookie before the flood
    answers = [_fresh(servers[n % 2]) for n in range(29)]
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 19 and statuses.count(429) == 10, "20 in all, counted across both instances"
    for refused in (a for a in answers if a.status_code == 429):
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "new sessions" in refused.text and "Set-Cookie" not in refused.headers
    if store == "files":
        assert len(session_files_in(servers[0].session_dir)) == 20, "a refused request stores nothing"
    assert servers[1].get("/inc", regular).text == "counter is 2", "existing sessions keep counting"


def test_behind_a_proxy_each_real_client_address_has_its_own_quota(serve: ServerFactory) -> None:
    server = serve(workers=2, threads=2, new_sessions_per_minute="5", proxy_count="1")
    first = [_fresh(server, **{"X-Forwarded-For": "203.0.113.1"}).status_code for _ in range(7)]
    assert first == [200] * 5 + [429] * 2
    assert _fresh(server, **{"X-Forwarded-For": "203.0.113.2"}).status_code == 200, "another client"


def test_an_ipv6_client_is_counted_by_its_64_not_by_each_address(serve: ServerFactory) -> None:
    # One client usually holds a whole /64 and may take any address in it.
    server = serve(workers=2, threads=2, new_sessions_per_minute="4", proxy_count="1")
    same = [_fresh(server, **{"X-Forwarded-For": f"2001:db8:1:2::{n:x}"}).status_code for n in range(1, 7)]
    assert same == [200] * 4 + [429] * 2, "six addresses of one /64 share one quota"
    assert _fresh(server, **{"X-Forwarded-For": "2001:db8:1:3::1"}).status_code == 200, "another /64"
    assert _fresh(server, **{"X-Forwarded-For": "::ffff:203.0.113.7"}).status_code == 200, "IPv4, mapped"


def _three_addresses_counted(tmp_path: Path) -> Flask:
    """An app with a quota on files, after a new session from each of three addresses."""
    app = create_app({"SECRET_KEY": "k", "NEW_SESSIONS_PER_MINUTE": 5}, instance_path=str(tmp_path))
    for n in range(3):
        assert app.test_client().get("/inc", environ_base={"REMOTE_ADDR": f"192.0.2.{n}"}).status_code == 200
    return app


def test_prune_removes_the_per_address_counts_whose_minute_has_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _three_addresses_counted(tmp_path)
    counts = tmp_path / "sessions" / "quotas"
    assert len(session_files_in(counts)) == 3, "a count per address"
    runner = app.test_cli_runner()
    result = runner.invoke(args=["sessions", "prune"])
    assert "removed 0 expired per-address counts of new sessions, kept 3" in result.output
    later = time.time() + 120  # every window has passed; the sessions live for 31 days
    monkeypatch.setattr(time, "time", lambda: later)
    result = runner.invoke(args=["sessions", "prune"])
    assert "removed 0 expired sessions, kept 3" in result.output
    assert "removed 3 expired per-address counts of new sessions, kept 0" in result.output
    assert session_files_in(counts) == []


def test_a_count_removed_meanwhile_is_neither_removed_nor_kept_by_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _three_addresses_counted(tmp_path)
    first = str(session_files_in(tmp_path / "sessions" / "quotas")[0])
    real_prune_file = RecordFileCache.prune_file

    def another_sweep_took_it(self: RecordFileCache, path: str) -> int | None:
        if path == first:
            os.unlink(path)  # another prune swept it after this one listed it
        return real_prune_file(self, path)

    monkeypatch.setattr(RecordFileCache, "prune_file", another_sweep_took_it)
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert "removed 2 expired per-address counts of new sessions, kept 0" in result.output, result.output


def test_the_store_cap_refuses_new_sessions_with_507_and_keeps_the_old_counting(tmp_path: Path) -> None:
    app = create_app({"SECRET_KEY": "k", "MAX_SESSIONS": 5}, instance_path=str(tmp_path))
    clients = [app.test_client() for _ in range(5)]
    for client in clients:
        assert client.get("/inc").text == "counter is 1"
    refused = app.test_client().get("/inc")
    assert refused.status_code == 507 and "maximum of 5 sessions" in refused.text
    assert refused.headers["Retry-After"] and "Set-Cookie" not in refused.headers
    assert clients[0].get("/inc").text == "counter is 2"
    assert len(session_files_in(Path(app.config["SESSION_DIR"]))) == 5


@pytest.mark.parametrize("store", ["files", "redis"])
def test_the_store_cap_counts_the_sessions_stored_before_the_app_started(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    # A restart, or a second instance on the same store: the sessions already there count.
    settings: dict[str, object] = {"SECRET_KEY": "k", "MAX_SESSIONS": 5, "SESSION_DIR": str(tmp_path / "s")}
    if store == "redis":
        settings["REDIS_URL"] = request.getfixturevalue("redis_url")
        settings["REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    before = create_app(settings, instance_path=str(tmp_path / "a"))
    for _ in range(3):
        assert before.test_client().get("/inc").text == "counter is 1"
    assert before.test_client().get("/global/inc").status_code == 200  # not a session: not counted
    after = create_app(settings, instance_path=str(tmp_path / "b"))
    assert [after.test_client().get("/inc").status_code for _ in range(3)] == [200, 200, 507]


def test_with_the_limit_off_nothing_is_refused(tmp_path: Path) -> None:
    app = create_app({"SECRET_KEY": "k", "NEW_SESSIONS_PER_MINUTE": 0}, instance_path=str(tmp_path))
    assert {app.test_client().get("/inc").status_code for _ in range(400)} == {200}


def test_the_default_limit_is_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALLY_NEW_SESSIONS_PER_MINUTE")  # the suite turns it off for other tests
    app = create_app({"SECRET_KEY": "k"}, instance_path=str(tmp_path))
    statuses = [app.test_client().get("/inc").status_code for _ in range(301)]
    assert statuses == [200] * 300 + [429]


def test_the_store_cap_holds_under_gunicorn(serve: ServerFactory) -> None:
    server = serve(workers=1, threads=2, max_sessions="4")
    cookies = [server.new_client() for _ in range(4)]
    refused = _fresh(server)
    assert refused.status_code == 507 and "maximum of 4 sessions" in refused.text
    assert refused.headers["Retry-After"] and "Set-Cookie" not in refused.headers
    assert server.get("/inc", cookies[0]).text == "counter is 2"
    assert len(session_files_in(server.session_dir)) == 4
