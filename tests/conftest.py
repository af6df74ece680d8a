"""Fixtures: the app and its test client, and real gunicorn servers on free ports."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from prometheus_client.parser import text_string_to_metric_families
from pytest_redis import factories
from pytest_redis.executor.process import RedisExecutor
from werkzeug.test import TestResponse

from tally import create_app

# The Sentinel and Cluster fixtures (sentinel_setup, redis_cluster) live in their own module.
pytest_plugins = ["topologies"]

ROOT = Path(__file__).resolve().parent.parent
# Tests play thousands of clients from one address; the per-address limit on
# new sessions has tests of its own (test_quota.py), which set it explicitly.
os.environ["TALLY_NEW_SESSIONS_PER_MINUTE"] = "0"
REQUIRE_ALL = os.environ.get("TALLY_REQUIRE_ALL") == "1"

#: The Accept headers real clients send (Chromium's, navigating to a page).
CHROMIUM = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
CURL = "*/*"
REQUESTS = requests.utils.default_headers()["Accept"]


def unavailable(reason: str) -> None:
    """Skip for a missing tool, or fail under TALLY_REQUIRE_ALL=1 (as in CI)."""
    if REQUIRE_ALL:
        pytest.fail(f"{reason}; TALLY_REQUIRE_ALL=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """Return a TCP port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    """An app on a fresh file store."""
    return create_app(
        {"TESTING": True, "SECRET_KEY": "test", "SESSION_DIR": str(tmp_path / "sessions")},
        instance_path=str(tmp_path / "instance"),
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client with its own cookie jar."""
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    """A runner for the app's ``flask`` commands."""
    return app.test_cli_runner()


def json_of(response: TestResponse) -> Any:
    """The JSON body of a test client's answer, which must have one."""
    body = response.get_json()
    assert body is not None, f"not JSON: {response.get_data(as_text=True)!r}"
    return body


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The values of metric ``name`` in Prometheus text, by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def session_files_in(folder: str | Path) -> list[Path]:
    """The session files in a file store's folder (named by a sha256), in name order."""
    return sorted(p for p in Path(folder).iterdir() if len(p.name) == 64)


def counter_of(text: str) -> int:
    """Parse ``counter is N`` or ``global counter is N``."""
    match = re.fullmatch(r"(?:global )?counter is (-?\d+)", text)
    assert match, f"not a counter answer: {text!r}"
    return int(match.group(1))


@dataclass
class Outcome:
    """What a burst of concurrent requests got back."""

    values: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    #: Requests that got no answer (the connection was cut).
    cut_off: int = 0


@dataclass
class Server:
    """A real gunicorn serving ``run:app`` with several workers and threads."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    session_dir: Path
    _local: threading.local = field(default_factory=threading.local)
    _pools: list[requests.Session] = field(default_factory=list)

    def http(self) -> requests.Session:
        """A keep-alive connection pool for the calling thread."""
        if not hasattr(self._local, "http"):
            self._local.http = requests.Session()
            self._pools.append(self._local.http)
        return self._local.http  # type: ignore[no-any-return]

    def get(self, path: str, cookie: str | None = None, **kwargs: object) -> requests.Response:
        """GET ``path``, with ``cookie`` as the session cookie when given (timeout 30 s unless given)."""
        http = self.http()
        cookies = None
        if cookie:
            # That cookie alone: requests would also send the one an earlier answer left in the jar.
            http.cookies.clear()
            cookies = {"session": cookie}
        kwargs.setdefault("timeout", 30)
        return http.get(self.url + path, cookies=cookies, **kwargs)  # type: ignore[arg-type]

    def new_client(self) -> str:
        """Create a session with one increment and return its cookie."""
        with requests.get(self.url + "/inc", timeout=30) as response:
            pass
        assert response.text == "counter is 1"
        cookie = response.cookies.get("session")
        assert cookie
        return cookie

    def burst(self, path: str, n: int, cookie: str | None = None, threads: int = 32) -> Outcome:
        """Send ``n`` concurrent GETs; collect each answer's number."""
        outcome = Outcome()
        lock = threading.Lock()

        def one(_: int) -> None:
            try:
                response = self.get(path, cookie)
            except requests.ConnectionError:
                with lock:
                    outcome.cut_off += 1
                return
            with lock:
                outcome.statuses.append(response.status_code)
                if response.status_code == 200:
                    outcome.values.append(counter_of(response.text))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
        return outcome

    def workers(self) -> list[int]:
        """The pids of gunicorn's worker processes."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def ready(self) -> bool:
        """Whether every worker says it has loaded the app."""
        ready = {int(pid) for pid in re.findall(r"Worker ready \(pid: (\d+)\)", self.log.read_text())}
        return set(self.workers()) <= ready

    def stop(self) -> None:
        """Stop gunicorn and wait for it."""
        for pool in self._pools:
            pool.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


ServerFactory = Callable[..., Server]


def burst_across(
    servers: list[Server], path: str, each: int, cookie: str | None = None, threads: int = 16
) -> list[int]:
    """Burst on several servers at the same time; return every number answered."""
    with ThreadPoolExecutor(len(servers)) as pool:
        outcomes = list(pool.map(lambda server: server.burst(path, each, cookie, threads), servers))
    return [value for outcome in outcomes for value in outcome.values]


#: gunicorn's worker classes that the service supports.
WORKER_CLASSES = ("sync", "gthread", "gevent")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start gunicorn servers: ``serve(workers=4, threads=4, worker_class="gthread", **TALLY_settings)``.

    ``app`` is gunicorn's app argument: ``run:app`` unless a test serves its own module from tests/.

    ``threads`` counts only for ``gthread``.  A ``sync`` worker gets ``--threads 1``, as
    gunicorn.conf.py asks for threads and gunicorn quietly turns ``sync`` with more than
    one thread into ``gthread``; a ``gevent`` worker takes up to 200 connections at once.
    """
    started: list[Server] = []

    def start(
        workers: int = 4, threads: int = 4, worker_class: str = "gthread", app: str = "run:app", **settings: str
    ) -> Server:
        if worker_class not in WORKER_CLASSES:
            raise ValueError(f"unknown worker class {worker_class!r}")
        port = free_port()
        env = {
            **os.environ,
            "TALLY_INSTANCE_PATH": str(tmp_path / "instance"),
            "TALLY_SECRET_KEY": "test",
            "TALLY_SESSION_DIR": str(tmp_path / "sessions"),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{port}"),
            **{f"TALLY_{k.upper()}": v for k, v in settings.items()},
        }
        log = tmp_path / f"gunicorn-{port}.log"
        (tmp_path / f"metrics-{port}").mkdir()
        command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
        command += ["--workers", str(workers), "--worker-class", worker_class]
        command += ["--threads", str(threads if worker_class == "gthread" else 1)]
        if worker_class == "gevent":
            command += ["--worker-connections", "200"]
        if app != "run:app":  # a test's own app module (quiet_spell_app:app), imported from tests/
            command += ["--pythonpath", str(ROOT / "tests")]
        command += ["--bind", f"127.0.0.1:{port}", "--timeout", "60", app]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", proc, log, Path(env["TALLY_SESSION_DIR"]))
        started.append(server)
        deadline = time.monotonic() + 30
        # Every worker has loaded the app (gunicorn.conf.py logs it), not only the first:
        # a worker still importing would take no request, and leave fewer than asked for.
        while len(server.workers()) < workers or not server.ready() or not _answers(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{log.read_text()}")
            time.sleep(0.1)
        # What gunicorn really runs, which is not always what was asked for (sync with threads).
        assert f"Using worker: {worker_class}\n" in log.read_text(), log.read_text()
        return server

    yield start
    for server in started:
        server.stop()


def _answers(url: str) -> bool:
    try:
        with requests.get(url + "/global", timeout=2) as response:
            return response.status_code == 200
    except (requests.ConnectionError, requests.Timeout):  # no worker up yet, or still importing the app
        return False


# -- Redis: real servers on free ports, never the machine's 6379 ------------

REDIS_SERVER = shutil.which("redis-server")
# port=None picks a free port; pytest-redis's annotation leaves None out.
shared_redis = factories.redis_proc(executable=REDIS_SERVER or "/usr/bin/redis-server", port=None)  # type: ignore[arg-type]


def need_redis() -> str:
    """Return the redis-server binary, or skip (fail under TALLY_REQUIRE_ALL)."""
    if not REDIS_SERVER:
        unavailable("redis-server is not installed: apt-get install -y redis-server")
    return str(REDIS_SERVER)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """A URL on the suite's own Redis; each test has its own key prefix instead of a flush."""
    need_redis()
    proc = request.getfixturevalue("shared_redis")
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    # Hashed: a parametrized name's [brackets] would be a pattern to KEYS.
    return "test:" + hashlib.sha256(f"{request.node.nodeid}:{os.getpid()}".encode()).hexdigest()[:16] + ":"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisExecutor]:
    """A Redis of this test's own, to stop, kill and restart; it keeps an AOF."""
    executor = RedisExecutor(
        need_redis(), databases=1, redis_timeout=30, loglevel="warning", host="127.0.0.1", port=free_port(),
        appendonly="yes", datadir=tmp_path,
    )  # fmt: skip
    executor.start()
    yield executor
    if executor.running():
        os.kill(executor.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        executor.stop()


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``mount`` (made if missing) for the block; root only."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs."""
    with tmpfs(tmp_path / "small", "size=256k,mode=0700") as mount:
        yield mount
