"""Settings mean what they say.

Booleans in words; a bad value refused at start in one line; no secret key
written; prune and stats by each session's own expiry.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest
from flask import Flask

from conftest import ROOT, ServerFactory, free_port, session_files_in, tmpfs
from tally import create_app
from tally.config import ConfigError, check_settings

TRUE_WORDS = ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", " true "]
FALSE_WORDS = ["false", "False", "FALSE", "no", "No", "off", "OFF", "0"]


def _app(tmp_path: Path, **settings: object) -> Flask:
    return create_app({"SESSION_DIR": str(tmp_path / "sessions"), **settings}, instance_path=str(tmp_path / "instance"))


def _secure_cookie(app: Flask) -> bool:
    response = app.test_client().get("/inc", base_url="https://localhost")
    assert response.status_code == 200
    return "Secure" in response.headers["Set-Cookie"]


def _fsyncs(app: Flask, monkeypatch: pytest.MonkeyPatch) -> int:
    calls: list[int] = []
    fsync = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    assert app.test_client().get("/inc").status_code == 200
    monkeypatch.undo()
    return len(calls)


# -- booleans ---------------------------------------------------------------


@pytest.mark.parametrize("word", TRUE_WORDS + FALSE_WORDS)
def test_boolean_words_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    expected = word in TRUE_WORDS
    monkeypatch.setenv("TALLY_SESSION_COOKIE_SECURE", word)
    monkeypatch.setenv("TALLY_SESSION_FSYNC", word)
    app = _app(tmp_path)
    assert app.config["SESSION_COOKIE_SECURE"] is expected
    assert _secure_cookie(app) is expected
    assert (_fsyncs(app, monkeypatch) > 0) is expected


@pytest.mark.parametrize("value", ["'no'", "'Off'", "False", "0", "'yes'", "'ON'", "True", "1"])
def test_boolean_words_in_instance_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    expected = value.strip("'").lower() in ("yes", "on", "true", "1")
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text(f"SESSION_COOKIE_SECURE = {value}\nSESSION_FSYNC = {value}\n")
    app = _app(tmp_path)
    assert _secure_cookie(app) is expected
    assert (_fsyncs(app, monkeypatch) > 0) is expected


# -- layers and parsed values ---------------------------------------------------


def test_configuration_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text("PERMANENT_SESSION_LIFETIME = 100\nSESSION_DIR = 'from-file'\n")
    app = create_app(instance_path=str(instance))
    assert app.permanent_session_lifetime.total_seconds() == 100
    assert app.config["SESSION_DIR"] == str(instance / "from-file")
    monkeypatch.setenv("TALLY_PERMANENT_SESSION_LIFETIME", "60")
    monkeypatch.setenv("TALLY_SESSION_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("TALLY_SECRET_KEY", "123")  # text, though it would parse as JSON
    monkeypatch.setenv("TALLY_REDIS_PREFIX", "1")
    app = create_app(instance_path=str(instance))
    assert app.permanent_session_lifetime.total_seconds() == 60
    assert app.config["SESSION_DIR"] == str(tmp_path / "from-env")
    assert app.secret_key == "123"
    assert app.config["REDIS_PREFIX"] == "1"
    app = create_app({"PERMANENT_SESSION_LIFETIME": 5}, instance_path=str(instance))
    assert app.permanent_session_lifetime.total_seconds() == 5


def test_defaults_of_the_quota_and_metrics_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALLY_NEW_SESSIONS_PER_MINUTE")  # conftest turns the limit off for the suite
    app = _app(tmp_path)
    assert app.config["NEW_SESSIONS_PER_MINUTE"] == 300  # what test_quota.py and the README rely on
    assert app.config["MAX_SESSIONS"] == 0
    assert app.config["RATELIMIT_STORAGE_URI"] is None
    assert app.config["METRICS_ALLOW"] == tuple(
        ip_network(net)
        for net in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
    )


@pytest.mark.parametrize(
    "text", ["10.0.0.0/8, 2001:db8::/32", '["10.0.0.0/8", "2001:db8::/32"]', " 10.0.0.0/8 ,2001:db8::/32,"]
)
def test_metrics_allow_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("TALLY_METRICS_ALLOW", text)
    assert _app(tmp_path).config["METRICS_ALLOW"] == (ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))


def test_numbers_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in [
        ("REDIS_TIMEOUT", "0.5"), ("REDIS_REPLICAS", "2"), ("PROXY_COUNT", "1"), ("MAX_CONTENT_LENGTH", "4096"),
        ("NEW_SESSIONS_PER_MINUTE", "30"), ("MAX_SESSIONS", "1000"), ("RATELIMIT_STORAGE_URI", "memory://"),
    ]:  # fmt: skip
        monkeypatch.setenv(f"TALLY_{name}", text)
    config = _app(tmp_path).config
    assert (config["REDIS_TIMEOUT"], config["REDIS_REPLICAS"], config["PROXY_COUNT"]) == (0.5, 2, 1)
    assert (config["MAX_CONTENT_LENGTH"], config["NEW_SESSIONS_PER_MINUTE"], config["MAX_SESSIONS"]) == (4096, 30, 1000)
    assert config["RATELIMIT_STORAGE_URI"] == "memory://"


# -- bad values are refused at start, one line each ---------------------------------

BAD = [
    ("PERMANENT_SESSION_LIFETIME", "-5", "a positive whole number of seconds, not '-5'"),
    ("PERMANENT_SESSION_LIFETIME", "0", "a positive whole number of seconds, not '0'"),
    ("PERMANENT_SESSION_LIFETIME", "1.5", "a positive whole number of seconds, not '1.5'"),
    ("REDIS_TIMEOUT", "abc", "a number of seconds above 0, not 'abc'"),
    ("REDIS_TIMEOUT", "0", "a number of seconds above 0, not '0'"),
    ("REDIS_TIMEOUT", "nan", "a number of seconds above 0, not 'nan'"),
    ("REDIS_REPLICAS", "-1", "a whole number, 0 or more, not '-1'"),
    ("REDIS_REPLICAS", "one", "a whole number, 0 or more, not 'one'"),
    ("PROXY_COUNT", "-1", "a whole number, 0 or more, not '-1'"),
    ("MAX_CONTENT_LENGTH", "0", "a positive whole number of bytes, not '0'"),
    ("NEW_SESSIONS_PER_MINUTE", "-3", "a whole number, 0 or more (0: no limit), not '-3'"),
    ("MAX_SESSIONS", "lots", "a whole number, 0 or more (0: no cap), not 'lots'"),
    ("SESSION_FSYNC", "maybe", "true or false (also yes/no, on/off, 1/0), not 'maybe'"),
    ("SESSION_COOKIE_SECURE", "", "true or false (also yes/no, on/off, 1/0), not ''"),
    ("SESSION_COOKIE_SAMESITE", "sometimes", "Lax, Strict or None, not 'sometimes'"),
    ("METRICS_ALLOW", "10.0.0.1/8", "10.0.0.1/8 has host bits set"),
    ("METRICS_ALLOW", "10.0.0.0/8,localhost", "'localhost' does not appear to be an IPv4 or IPv6 network"),
    ("METRICS_ALLOW", '["10.0.0.0/8"', "not a JSON list"),
    ("RATELIMIT_STORAGE_URI", "localhost:6379", "a storage URI such as memory://"),
    ("REDIS_URL", "http://localhost", "a Redis URL starts with redis://"),
    ("REDIS_URL", "redis://:s3cret@localhost:port/0", "Port could not be cast to integer value as 'port'"),
    ("REDIS_URL", "redis+sentinel://:s3cret@h1:26379", "a redis+sentinel:// URL ends with /SERVICE or /SERVICE/DB"),
]


@pytest.mark.parametrize(("name", "text", "says"), BAD)
def test_a_bad_value_stops_the_app_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    monkeypatch.setenv(f"TALLY_{name}", text)
    with pytest.raises(ConfigError) as refused:
        _app(tmp_path)
    assert refused.value.code == 4  # gunicorn's "App failed to load": it stops rather than respawn
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tally: TALLY_{name} must be ")
    assert says in line
    assert "s3cret" not in line


def test_every_bad_setting_gets_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text("PROXY_COUNT = -1\nSESSION_FSYNC = 'sometimes'\nSECRET_KEY = 42\n")
    with pytest.raises(ConfigError) as refused:
        create_app({"MAX_SESSIONS": -1}, instance_path=str(instance))
    lines = capsys.readouterr().err.splitlines()
    assert lines == refused.value.problems
    config = instance / "config.py"
    assert lines == [
        f"tally: SECRET_KEY in {config} must be a string",  # a key is never shown
        f"tally: SESSION_FSYNC in {config} must be true or false (also yes/no, on/off, 1/0), not 'sometimes'",
        f"tally: PROXY_COUNT in {config} must be a whole number, 0 or more, not -1",
        "tally: MAX_SESSIONS (given to create_app) must be a whole number, 0 or more (0: no cap), not -1",
    ]


def test_a_broken_instance_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text("SESSION_FSYNC = (\n")
    with pytest.raises(ConfigError):
        check_settings(str(instance))
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tally: {instance / 'config.py'} cannot be loaded: SyntaxError")
    (instance / "config.py").write_text("SESSION_FSYNC = 'yes'\n")
    check_settings(str(instance))


def test_a_likely_typo_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TALLY_SESION_FSYNC", "yes")
    monkeypatch.setenv("TALLY_SOMETHING_ELSE", "1")
    _app(tmp_path)
    assert caplog.messages == [
        "TALLY_SESION_FSYNC is not a Tally setting and is ignored; did you mean TALLY_SESSION_FSYNC?"
    ]


def _run(command: list[str], tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "TALLY_INSTANCE_PATH": str(tmp_path / "instance"),
        "TALLY_SESSION_DIR": str(tmp_path / "sessions"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **{f"TALLY_{k}": v for k, v in settings.items()},
    }
    (tmp_path / "metrics").mkdir(exist_ok=True)
    began = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - began


LINE = "tally: TALLY_PERMANENT_SESSION_LIFETIME must be a positive whole number of seconds, not '-5'"


def test_the_flask_command_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    done, _ = _run(
        [sys.executable, "-m", "flask", "--app", "run", "sessions", "stats"], tmp_path, PERMANENT_SESSION_LIFETIME="-5"
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr == LINE + "\n"


def test_gunicorn_stops_on_a_bad_setting_with_one_line(tmp_path: Path) -> None:
    # gunicorn.conf.py's own worker count (two per core), as an operator runs it.
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{free_port()}", "run:app"]
    done, seconds = _run(command, tmp_path, PERMANENT_SESSION_LIFETIME="-5")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert seconds < 15, output
    assert output.count(LINE) == 1, output
    assert "Traceback" not in output, output


# -- the secret key, and a read-only instance folder ----------------------------------


def test_no_secret_is_generated_or_needed(tmp_path: Path) -> None:
    app = _app(tmp_path)
    client = app.test_client()
    assert client.get("/inc").text == "counter is 1"
    assert client.get("/counter").text == "counter is 1"
    assert app.secret_key is None
    assert not (tmp_path / "instance" / "secret_key").exists()


@pytest.fixture
def read_only_instance(tmp_path: Path) -> Iterator[Path]:
    """An instance folder on a read-only mount (root is not stopped by mode bits), holding a config.py."""
    with tmpfs(tmp_path / "instance", "size=64k,mode=0755") as folder:
        (folder / "config.py").write_text("PERMANENT_SESSION_LIFETIME = 3600\n")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(OSError) as refused:
            (folder / "secret_key").write_text("x")
        assert refused.value.errno == errno.EROFS
        yield folder


def test_the_app_starts_and_serves_on_a_read_only_instance_folder(read_only_instance: Path, tmp_path: Path) -> None:
    app = create_app({"SESSION_DIR": str(tmp_path / "sessions")}, instance_path=str(read_only_instance))
    assert app.permanent_session_lifetime == timedelta(hours=1)  # its config.py was read
    client = app.test_client()
    assert client.get("/inc?by=2").text == "counter is 2"
    assert client.get("/counter").text == "counter is 2"


def test_gunicorn_serves_on_a_read_only_instance_folder(read_only_instance: Path, serve: ServerFactory) -> None:
    # serve() puts the instance at tmp_path/instance and the sessions beside it; no secret key is given.
    server = serve(workers=2, secret_key="")
    cookie = server.new_client()
    assert server.get("/inc", cookie).text == "counter is 2"


# -- prune and stats judge each session by the lifetime it was written with -------------


def test_prune_and_stats_go_by_each_sessions_own_expiry(tmp_path: Path) -> None:
    folder = tmp_path / "sessions"
    service = create_app({"PERMANENT_SESSION_LIFETIME": 2, "SESSION_DIR": str(folder)}, instance_path=str(tmp_path))
    # cron's `flask sessions prune` without the service's environment: the default lifetime.
    cron = create_app({"SESSION_DIR": str(folder)}, instance_path=str(tmp_path))
    assert cron.permanent_session_lifetime == timedelta(days=31)

    for _ in range(4):
        assert service.test_client().get("/inc").status_code == 200  # expire in 2 s
    long_lived = [cron.test_client() for _ in range(2)]
    for client in long_lived:
        assert client.get("/inc?by=5").text == "counter is 5"
    time.sleep(3)
    recent = service.test_client()
    assert recent.get("/inc?by=7").text == "counter is 7"  # lives 2 s more

    stats = cron.test_cli_runner().invoke(args=["sessions", "stats"]).output
    assert "sessions: 3\n" in stats and "bytes: 12288 " in stats
    oldest = re.search(r"oldest: written (\d+)s ago", stats)
    assert oldest and 3 <= int(oldest.group(1)) <= 6, stats

    result = cron.test_cli_runner().invoke(args=["sessions", "prune"])
    assert result.exit_code == 0
    assert "removed 4 expired sessions, kept 3, freed 16.0 KiB (16384 bytes)" in result.output
    assert len(session_files_in(folder)) == 3
    assert recent.get("/counter").text == "counter is 7"
    for client in long_lived:
        assert client.get("/counter").text == "counter is 5"
