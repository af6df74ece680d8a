"""The guarantees hold under each of gunicorn's worker classes: sync, gthread and gevent.

Each test runs a real gunicorn (the ``serve`` fixture) with the worker class under test:
no lost update with one cookie from many connections, on files and on Redis, and a
stalled Redis answered with a 503 in bounded time without stalling the worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from gunicorn.config import ControlSocket
from gunicorn.ctl.client import ControlClient
from pytest_redis.executor.process import RedisExecutor

from conftest import WORKER_CLASSES, Server, ServerFactory, counter_of
from tally.store.redis import CLOCK_CHECK_SECONDS

each_worker_class = pytest.mark.parametrize("worker_class", WORKER_CLASSES)

#: Several workers, so that the same cookie is raced within and across processes.
SEVERAL = {"workers": 3, "threads": 4}


def race(server: Server, path: str, n: int, cookie: str | None, threads: int) -> list[requests.Response | str]:
    """Send ``n`` GETs from ``threads`` threads at once: each answer, or the error instead.

    After a first error (a hung worker, a cut connection) the requests not yet sent are
    skipped, so a broken server fails the test in seconds, not in ``n`` timeouts.
    """
    failed = threading.Event()

    def one(_: int) -> requests.Response | str:
        if failed.is_set():
            return "skipped"
        try:
            return server.get(path, cookie, timeout=(3, 10))
        except requests.RequestException as exc:
            failed.set()
            return type(exc).__name__

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def assert_all_counted(answers: list[requests.Response | str], first: int) -> None:
    """Every answer is a 200, and the numbers are exactly ``first``, ``first + 1``, ..."""
    failures = Counter(a if isinstance(a, str) else a.status_code for a in answers)
    del failures[200]
    assert not failures, f"of {len(answers)} requests, these did not answer 200: {dict(failures)}"
    values = sorted(counter_of(a.text) for a in answers if isinstance(a, requests.Response))
    assert values == list(range(first, first + len(answers))), "each increment saw its own, distinct value"


def assert_same_cookie_race_counts_everything(server: Server, n: int = 300, threads: int = 32) -> None:
    cookie = server.new_client()
    assert_all_counted(race(server, "/inc", n, cookie, threads), 2)
    assert server.get("/counter", cookie).text == f"counter is {n + 1}"


def assert_global_numbers_are_unique(server: Server, n: int = 100) -> None:
    start = counter_of(server.get("/global").text)
    assert_all_counted(race(server, "/global/inc", n, None, n), start + 1)  # n clients: no cookie
    assert server.get("/global").text == f"global counter is {start + n}"


@each_worker_class
def test_one_cookie_from_many_connections_loses_nothing_on_files(serve: ServerFactory, worker_class: str) -> None:
    server = serve(worker_class=worker_class, **SEVERAL)
    assert_same_cookie_race_counts_everything(server)
    assert_global_numbers_are_unique(server)


@each_worker_class
def test_one_cookie_from_many_connections_loses_nothing_on_redis(
    serve: ServerFactory, worker_class: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    unused = tmp_path / "unused-session-dir"
    settings = {"redis_url": redis_url, "redis_prefix": redis_prefix, "session_dir": str(unused)}
    server = serve(worker_class=worker_class, **SEVERAL, **settings)
    assert_same_cookie_race_counts_everything(server)
    assert_global_numbers_are_unique(server)
    assert not unused.exists() or not any(unused.iterdir()), "nothing went to files"


# -- A stalled Redis: bounded 503s, and the worker keeps serving ------------

#: Per worker class, a server with room for IN_FLIGHT[...] requests at once and one spare.
#: A sync worker runs one request at a time by design, so a burst against one sync worker
#: queues in the listen backlog however good the store is: it gets one worker per request.
STALL_SERVER = {
    "sync": {"workers": 4},
    "gthread": {"workers": 1, "threads": 17},
    "gevent": {"workers": 1},
}
IN_FLIGHT = {"sync": 3, "gthread": 16, "gevent": 16}
REDIS_TIMEOUT = 1.0
#: What a request may take with Redis stopped: the timeout plus slack.
BOUND = 2.5
#: What a request for a static file may take while the others wait on Redis.
STATIC_BOUND = 0.5


class Timed:
    """One request's answer (or error) and when it started and ended."""

    def __init__(self) -> None:
        self.status = 0
        self.retry_after = ""
        self.error = ""
        self.started = self.ended = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def fetch(self, url: str, cookie: str | None = None) -> None:
        self.started = time.monotonic()
        try:
            # A connection of its own, and a client timeout well past BOUND: a worker that
            # hangs shows as a slow answer (or an error), not as a hung test.
            with requests.get(url, cookies={"session": cookie} if cookie else None, timeout=(3, 10)) as response:
                self.status = response.status_code
                self.retry_after = response.headers.get("Retry-After", "")
        except requests.RequestException as exc:
            self.error = type(exc).__name__
        self.ended = time.monotonic()

    def __repr__(self) -> str:
        return f"<{self.status or self.error} in {self.seconds:.2f}s>"


def stalled_burst(server: Server, cookie: str, n: int) -> tuple[list[Timed], Timed]:
    """Send ``n`` increments at once and, while they wait on Redis, ask for a static file."""
    incs = [Timed() for _ in range(n)]
    static = Timed()
    go = threading.Barrier(n + 1)

    def one(timed: Timed) -> None:
        go.wait(5)
        timed.fetch(server.url + "/inc", cookie)

    threads = [threading.Thread(target=one, args=(timed,)) for timed in incs]
    for t in threads:
        t.start()
    go.wait(5)
    time.sleep(0.3)  # the increments are in the worker now, waiting on Redis
    static.fetch(server.url + "/static/style.css")
    for t in threads:
        t.join(15)
    return incs, static


def assert_stall_handled(incs: list[Timed], static: Timed) -> None:
    incs = sorted(incs, key=lambda timed: timed.seconds)
    # A worker blocked by its wait on Redis answers the static file only when that wait ends.
    assert static.status == 200 and static.seconds < STATIC_BOUND, f"the worker stalled: static file {static} {incs}"
    # Serialized on one connection or lock, the last would wait len(incs) timeouts.
    assert incs[-1].seconds < BOUND, f"each answer within the {REDIS_TIMEOUT:g} s timeout plus slack: {incs}"
    assert all(timed.status == 503 and timed.retry_after for timed in incs), f"each a 503 with Retry-After: {incs}"


@each_worker_class
def test_a_stalled_redis_gets_bounded_503s_and_the_worker_keeps_serving(
    serve: ServerFactory, own_redis: RedisExecutor, worker_class: str
) -> None:
    n = IN_FLIGHT[worker_class]
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    server = serve(
        worker_class=worker_class, redis_url=url, redis_timeout=str(REDIS_TIMEOUT), **STALL_SERVER[worker_class]
    )
    cookie = server.new_client()
    # A running service: the worker has its Redis connections open.
    assert_all_counted(race(server, "/inc", 2 * n, cookie, threads=n), 2)
    counted = 1 + 2 * n
    last_answer = time.monotonic()
    redis_pid = own_redis.process.pid  # type: ignore[union-attr]
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        # Just stalled, and again once the stall has lasted longer than the store's periodic
        # work (it re-measures Redis's clock every CLOCK_CHECK_SECONDS), which is then due.
        assert_stall_handled(*stalled_burst(server, cookie, n))
        time.sleep(max(0.0, last_answer + CLOCK_CHECK_SECONDS + 0.5 - time.monotonic()))
        assert_stall_handled(*stalled_burst(server, cookie, n))
    finally:
        os.kill(redis_pid, signal.SIGCONT)

    # Service resumes by itself, and nothing refused was counted: no request was in
    # flight when Redis stopped, so no answer was "may or may not have been applied".
    deadline = time.monotonic() + 10
    while (answer := server.get("/counter", cookie, timeout=5)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answer.text == f"counter is {counted}"
    assert server.get("/inc", cookie, timeout=5).text == f"counter is {counted + 1}"


# -- Two instances on one machine each keep their own control socket --------


def listening_unix_sockets(pid: int) -> set[str]:
    """The paths of the Unix sockets that process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is "listening".
        if len(fields) == 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            paths.add(fields[7])
    return paths


def control_socket(server: Server) -> Path:
    """The control socket that this server's master process listens on."""
    deadline = time.monotonic() + 10  # it starts once the workers are up
    while not (paths := listening_unix_sockets(server.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(paths) == 1, f"one control socket, not {paths}"
    return Path(paths.pop())


def answers_for(path: Path, server: Server) -> bool:
    """Whether the control socket at ``path`` is this server's."""
    with ControlClient(str(path), timeout=5) as client:
        listeners = client.send_command("show listeners")["listeners"]
    return [listener["address"] for listener in listeners] == [server.url]


def state(path: Path) -> tuple[int, int] | None:
    try:
        status = path.lstat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def test_two_instances_on_one_machine_each_keep_their_own_control_socket(serve: ServerFactory) -> None:
    # gunicorn's default is one control socket per user, ~/.gunicorn/gunicorn.ctl: each
    # instance would unlink the other's, and the first to stop would delete the other's.
    default = Path(ControlSocket.default)
    before = state(default)
    first, second = serve(workers=1), serve(workers=1)
    mine, theirs = control_socket(first), control_socket(second)
    assert mine != theirs
    assert default not in (mine, theirs)
    assert answers_for(mine, first) and answers_for(theirs, second)

    first.stop()
    assert not mine.exists(), "the first cleaned up its own"
    assert theirs.is_socket() and answers_for(theirs, second), "and left the second's alone"
    assert control_socket(second) == theirs
    second.stop()
    assert not theirs.exists()
    assert state(default) == before, "gunicorn's shared default path was not touched"
