"""``make bench``: Tally against stock Flask-Session and the no-session ceiling, under each worker class.

Every system runs under gunicorn with the same settings, once per worker class:
``sync`` (one thread per worker), ``gthread`` (``--threads``) and ``gevent``
(``--worker-connections``).  Runs alternate between systems, round after
round, so a noisy machine slows all of them alike; the tables show medians, and
ratios taken round by round, which is what holds on a shared 2-core machine.
Within a worker class, each Tally runs right beside the stock recipe it is
compared with, in both modes (a cookie per connection, and one shared cookie)
before the next pair starts, and the class's own no-session ceiling runs in
the same rounds.
Results go to docs/benchmarks.md and docs/benchmarks.png, and the main tables
to README.md's results block.

Two more Tallys (gthread only) measure what waiting for a replica costs: both
on a second Redis that has a replica attached, one with
``TALLY_REDIS_REPLICAS=0`` and one with ``=1`` (each write then waits for
Redis's ``WAIT``).

Each full run appends its medians and ratios, with the date and the git
commit, to a history beside the report (docs/benchmarks-runs.jsonl), and the
report shows every ratio of this run beside its spread over the last three
full runs.

The scale runs (1,000 to 1,000,000 stored sessions, gthread) take minutes of
their own, so they are not in the default: ``--only scale`` runs them alone and
rewrites only their section of docs/benchmarks.md (``--only
files,redis,scale`` adds them to a full run).  ``--only files`` or ``redis``
(comma-separated) measures part of the rest, beside the ceiling; such a run, or
one with ``--out`` elsewhere, leaves README.md and docs/ alone, and a partial
run must be given ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import redis
import redis.utils

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_OUT = ROOT / "docs" / "benchmarks"
#: The parts ``--only`` can pick.  The first three make a full run (the ceiling
#: always runs with them, as every ratio needs it); the scale runs are opt-in.
MAIN_PARTS = ("files", "redis", "replicas")
PARTS = (*MAIN_PARTS, "scale")
WORKER_CLASSES = ("sync", "gthread", "gevent")
#: The worker classes that also run the shared-cookie mode: the two the issue
#: names, which is enough for the lost-count check and keeps a run within budget.
SHARED_CLASSES = ("sync", "gthread")
#: The worker class of the REPLICAS rows and the scale runs, the one earlier runs used.
MAIN_CLASS = "gthread"
CEILING = "Flask, no session"
REPLICAS = "Tally, Redis + replica, REPLICAS={}"
#: Seconds a wrk run costs beyond its duration (16 threads to start; the shared
#: mode's cookie and counter reads), and seconds a system takes to start before
#: its 1 s warm-up: only for the estimate printed at the start.
WRK_OVERHEAD = 0.4
START_SECONDS = 2.0
#: Seconds per session stored before the scale runs (two processes), and per
#: session pruned after them: only for the estimate too.
POPULATE_SECONDS = 3e-4
PRUNE_SECONDS = 2.5e-5
#: How many full runs the spread of a ratio is taken over.
SPREAD_RUNS = 3
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: urllib with no proxy: the systems are on loopback, whatever ``http_proxy`` says.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status_of(url: str) -> int | None:
    """A GET's HTTP status, or None when nothing answers yet.

    The standard library's client, not requests: ``make demo`` starts systems
    with only what ``make run`` installs.  A time-out is "not yet" too: the
    listening socket takes connections as soon as gunicorn's master binds it,
    and on a busy machine a worker can take more than a second to load the app.
    """
    try:
        with DIRECT.open(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def stop_process(proc: subprocess.Popen[bytes] | None, children: list[str] | None = None) -> None:
    """SIGTERM, then SIGKILL for it and the ``children`` it had if it has not stopped within 15 s."""
    if not proc or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for pid in children or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@dataclass
class RedisServer:
    """A redis-server on a free loopback port, saving nothing; a replica of ``primary`` if given."""

    folder: Path
    primary: RedisServer | None = None
    #: Chosen when made, so that the systems' settings can name it before it starts.
    port: int = field(default_factory=free_port)
    version: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.folder)]
        if self.primary:
            command += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                # A replica counts as started once its link to the primary is up.
                if not self.primary or client.info("replication").get("master_link_status") == "up":
                    self.version = client.info("server")["redis_version"]
                    client.close()
                    return
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.1)

    def replication(self) -> dict[str, Any]:
        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            return client.info("replication")
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class System:
    """One app under gunicorn, with one worker class."""

    name: str
    target: str
    env: dict[str, str]
    worker_class: str = "gthread"
    #: What it is measured in: ``many`` (a cookie per connection), ``shared`` (one cookie for all).
    modes: tuple[str, ...] = ("many", "shared")
    #: The stock recipe that the stock column divides by, run beside it in every round.
    versus: str | None = None
    #: Whether it talks to Redis (its workers are then checked for hiredis).
    redis: bool = False
    #: Whether hiredis was loaded in every worker, once started.
    hiredis: bool | None = None
    #: A file of stored sessions' cookies for wrk to pick from (the scale runs).
    cookies: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    #: A metrics folder made by :meth:`start`, deleted by :meth:`stop`.
    metrics: str | None = None
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} [{self.worker_class}]"

    def start(self, workers: int, threads: int, worker_connections: int = 1000) -> None:
        """Serve under gunicorn: ``threads`` per gthread worker, 1 per sync one, ``worker_connections`` per gevent."""
        self.port = free_port()
        # An explicit config: from the project root gunicorn would read Tally's own.
        command = [sys.executable, "-m", "gunicorn", "--config", str(BENCH / "gunicorn_bench.py")]
        command += ["--workers", str(workers), "--worker-class", self.worker_class]
        if self.target.startswith("apps:"):
            command += ["--pythonpath", str(BENCH)]
        if self.worker_class == "gevent":
            command += ["--worker-connections", str(worker_connections)]
        else:
            # gunicorn makes a sync worker with more than one thread a gthread one.
            command += ["--threads", str(1 if self.worker_class == "sync" else threads)]
        command += ["--bind", f"127.0.0.1:{self.port}"]
        # A system may bring its own metrics folder (the demo's is in its work folder, deleted after).
        metrics = self.env.get("PROMETHEUS_MULTIPROC_DIR")
        if not metrics:
            metrics = self.metrics = tempfile.mkdtemp(prefix="bench-metrics-")
        env = {**os.environ, **self.env, "PROMETHEUS_MULTIPROC_DIR": metrics}
        self.proc = subprocess.Popen([*command, self.target], cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            if status_of(self.url + "/counter") == 200:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not start")
            time.sleep(0.1)

    def workers(self) -> list[str]:
        assert self.proc
        try:
            return Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []

    def workers_loaded(self, library: str) -> bool:
        """Whether every worker has mapped a shared library whose path contains ``library``."""
        pids = self.workers()
        return bool(pids) and all(library in Path(f"/proc/{pid}/maps").read_text() for pid in pids)

    def stop(self) -> None:
        """Stop gunicorn, killing it and its workers if it does not stop; delete the metrics folder it made."""
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, self.workers())
        if self.metrics:
            shutil.rmtree(self.metrics, ignore_errors=True)
            self.metrics = None

    def worker_rss(self) -> int:
        """The workers' resident memory, in bytes."""
        total = 0
        for pid in self.workers():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total


def wrk(
    url: str, seconds: float, connections: int, cookie: str | None = None, cookies: str | None = None
) -> dict[str, float]:
    """Run wrk with a connection per thread, so the Lua cookie jar is per connection."""
    env = {**os.environ, "BENCH_PATH": "/inc"}
    if cookie:
        env["BENCH_COOKIE"] = cookie
    if cookies:
        env["BENCH_COOKIES"] = cookies
    command = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{round(seconds)}s", "--latency"]
    command += ["-s", str(BENCH / "session.lua"), url]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    result: dict[str, float] = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def counter(system: System, cookie: str) -> int:
    import requests  # the bench extra's; only the wrk runs need it

    return int(requests.get(system.url + "/counter", cookies={"session": cookie}, timeout=10).text.split()[-1])


def run_once(system: System, mode: str, seconds: float, connections: int) -> dict[str, float]:
    import requests  # the bench extra's; only the wrk runs need it

    if mode == "many":
        return wrk(system.url, seconds, connections)
    cookie = requests.get(system.url + "/inc", timeout=10).cookies.get("session")
    assert cookie, f"{system.name} gave no session cookie"
    before = counter(system, cookie)
    result = wrk(system.url, seconds, connections, cookie)
    time.sleep(0.2)  # let requests cut off at the end land
    counted = counter(system, cookie) - before
    result["lost"] = max(0, result["requests"] - result["failed"] - counted)
    return result


def _populate(args: tuple[str, int, int, int, int]) -> list[str]:
    from tally.store.files import RecordFileCache

    folder, start, stop, ttl_live, every = args
    cache = RecordFileCache(folder)
    last_written = time.time() - 2 * ttl_live
    sampled = []
    for i in range(start, stop):
        # One in 31 sessions expired, and last written long ago: what a daily
        # prune finds with a 31-day lifetime.
        expired = i % 31 == 0
        sid = secrets.token_urlsafe(32)
        path = cache.path_for("session:" + sid)
        record: dict[str, Any] = {"counter": i}

        def stored(_: dict[str, Any], new: dict[str, Any] = record) -> dict[str, Any]:
            return new

        cache.update_path(path, stored, -1 if expired else ttl_live)
        if expired:
            os.utime(path, (last_written, last_written))
        elif i % every == 0:
            sampled.append(sid)
    return sampled


def populate(folder: str, want: int, sample: int) -> list[str]:
    """Write sessions straight into the file store, not over HTTP; return about ``sample`` live ones' ids."""
    step = 20_000
    every = max(1, want // sample)
    chunks = [(folder, a, min(a + step, want), 31 * 86_400, every) for a in range(0, want, step)]
    with Pool(2) as pool:
        return [sid for part in pool.map(_populate, chunks) for sid in part]


def disk_read_kib() -> int:
    """KiB read from disk by the whole machine since boot (``pgpgin`` in /proc/vmstat)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("pgpgin "):
            return int(line.split()[1])
    return 0


def scale_run(system: System, args: argparse.Namespace) -> dict[str, float]:
    """One wrk run on a stored store, with what the machine read from disk meanwhile.

    Only one Tally serves at a time, so the reads are mostly its own: session
    files that were not, or no longer, in the page cache.
    """
    before = disk_read_kib()
    result = wrk(system.url, args.seconds, args.connections, cookies=system.cookies)
    result["disk_mib"] = (disk_read_kib() - before) / 1024
    return result


def rotated(items: list[T], round_: int) -> list[T]:
    """The items, starting one further along each round, so no one always goes first."""
    turn = round_ % len(items)
    return items[turn:] + items[:turn]


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


#: The libraries whose versions each full run records: a drop in a ratio between runs is then
#: explainable by a library that changed, or shown not to be.
LIBRARIES = ("flask", "werkzeug", "flask-session", "cachelib", "gunicorn", "gevent", "redis", "hiredis")
#: PINGs per measure of the loopback round trip.
PINGS = 2000


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the run ran on: Python, the kernel, the libraries' versions, and the loopback round trips measured."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "libraries": {name: installed(name) for name in LIBRARIES},
        "redis_server": args.redis_version,
        "ping_us": args.ping_us,
    }


def ping_us(server: RedisServer) -> float:
    """The median round trip of a redis-py PING to ``server`` over loopback, in µs: the machine's own latency,
    which every Redis row pays once a request and which varies between days on a shared VM."""
    client = redis.Redis(port=server.port, socket_timeout=5)
    try:
        client.ping()
        times = []
        for _ in range(PINGS):
            began = time.perf_counter_ns()
            client.ping()
            times.append(time.perf_counter_ns() - began)
        return round(statistics.median(times) / 1000, 1)
    finally:
        client.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 5 rounds of 4 s over 27 wrk runs a round and 17 systems: about 11 minutes on 2 cores.
    parser.add_argument("--seconds", type=int, default=4, help="seconds of each wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each running every system once (default 5)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="threads per gthread worker (sync workers have 1)")
    parser.add_argument("--worker-connections", type=int, default=1000, help="connections per gevent worker")
    parser.add_argument(
        "--worker-classes",
        default=",".join(WORKER_CLASSES),
        help=f"comma-separated gunicorn worker classes, of {', '.join(WORKER_CLASSES)} (default all)",
    )
    parser.add_argument(
        "--scale",
        default="1000,100000,1000000",
        help="stored sessions for the scale runs, when --only has scale ('' for none)",
    )
    parser.add_argument(
        "--only",
        default=",".join(MAIN_PARTS),
        help=f"comma-separated parts to measure, of {', '.join(PARTS)} (redis includes replicas; default "
        f"{','.join(MAIN_PARTS)}); the no-session ceiling runs with any of the first three",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"where the report goes, without .md/.png (default {DEFAULT_OUT.relative_to(ROOT)}); the history of "
        "full runs is beside it (-runs.jsonl); README.md's results block is rewritten only by a full run to the "
        "default place",
    )
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or not parts <= set(PARTS):
        parser.error(f"--only takes a comma-separated list of {', '.join(PARTS)}, not {args.only!r}")
    if "redis" in parts:
        parts.add("replicas")
    classes = [c.strip() for c in args.worker_classes.split(",") if c.strip()]
    if not classes or not set(classes) <= set(WORKER_CLASSES):
        parser.error(f"--worker-classes takes a comma-separated list of {', '.join(WORKER_CLASSES)}")
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    args.parts = parts
    args.worker_classes = [c for c in WORKER_CLASSES if c in classes]
    args.scale_sizes = [int(s) for s in args.scale.split(",") if s.strip()] if "scale" in parts else []
    #: Whether it measures the rest beside the ceiling; only the scale runs otherwise.
    args.main = bool(parts & set(MAIN_PARTS))
    args.full = set(MAIN_PARTS) <= parts and args.worker_classes == list(WORKER_CLASSES)
    if args.out is None:
        args.out = str(DEFAULT_OUT)
    to_docs = Path(args.out).resolve() == DEFAULT_OUT.resolve()
    if to_docs and args.main and not args.full:
        parser.error("--only or --worker-classes measure part of the benchmark: give --out somewhere outside docs/")
    args.readme = args.full and to_docs
    args.history = Path(args.out + "-runs.jsonl")
    args.replicas_seen = None
    args.redis_version = ""
    #: The loopback PING round trip before the runs and after them, in µs (when a Redis ran).
    args.ping_us = {}
    args.commit, args.dirty = git_commit()
    args.date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return args


def git_commit() -> tuple[str, bool]:
    """HEAD's short hash, and whether the code measured has changes that are not committed."""
    code = ["src", "bench", "run.py", "gunicorn.conf.py", "setup.cfg"]
    return git("rev-parse", "--short", "HEAD") or "unknown", bool(git("status", "--porcelain", "-uno", "--", *code))


def uncommitted(dirty: bool) -> str:
    """What follows a commit's hash when the code measured had changes beyond it."""
    return " with uncommitted changes" if dirty else ""


def which_code(args: argparse.Namespace) -> str:
    """The day of this run and the code it measured."""
    return f"{args.date[:10]}, commit `{args.commit}`{uncommitted(args.dirty)}"


def redis_servers(work: Path, parts: set[str], classes: list[str]) -> dict[str, RedisServer]:
    """The Redis servers the parts need, not yet started.

    Tally and stock share one Redis (under every worker class: each session is
    its own key); the replica rows have their own primary, with a replica, so
    that replication touches neither of those.
    """
    servers: dict[str, RedisServer] = {}
    if "redis" in parts:
        servers["redis"] = RedisServer(work / "redis")
    if "replicas" in parts and MAIN_CLASS in classes:
        servers["primary"] = RedisServer(work / "primary")
        servers["replica"] = RedisServer(work / "replica", primary=servers["primary"])
    return servers


def tally_env(work: Path) -> dict[str, str]:
    return {"TALLY_INSTANCE_PATH": str(work / "instance"), "TALLY_SECRET_KEY": "bench"}


def build_groups(work: Path, servers: dict[str, RedisServer], args: argparse.Namespace) -> list[list[System]]:
    """The systems, in groups that run side by side: per worker class, each Tally beside its stock recipe."""
    if not args.main:
        return []
    return [group for worker_class in args.worker_classes for group in class_groups(worker_class, work, servers, args)]


def class_groups(
    worker_class: str, work: Path, servers: dict[str, RedisServer], args: argparse.Namespace
) -> list[list[System]]:
    """One worker class's groups: Tally and stock on files, on Redis, the REPLICAS pair (gthread), the ceiling."""
    folder = work / worker_class
    tally = tally_env(work)
    modes = ("many", "shared") if worker_class in SHARED_CLASSES else ("many",)

    def system(name: str, target: str, env: dict[str, str], **more: Any) -> System:
        return System(name, target, env, worker_class=worker_class, modes=modes, **more)

    groups: list[list[System]] = []
    if "files" in args.parts:
        groups.append(
            [
                system("Tally, files", "run:app", {**tally, "TALLY_SESSION_DIR": str(folder / "tally-files")},
                       versus="stock, files"),
                system("stock, files", "apps:stock()",
                       {"BENCH_STORE": "files", "BENCH_SESSION_DIR": str(folder / "stock")}, versus="stock, files"),
            ]
        )  # fmt: skip
    if "redis" in args.parts:
        url = servers["redis"].url
        groups.append(
            [
                system("Tally, Redis", "run:app", {**tally, "TALLY_REDIS_URL": url}, versus="stock, Redis",
                       redis=True),
                system("stock, Redis", "apps:stock()", {"BENCH_STORE": "redis", "BENCH_REDIS_URL": url},
                       versus="stock, Redis", redis=True),
            ]
        )  # fmt: skip
    if "replicas" in args.parts and worker_class == MAIN_CLASS:
        url = servers["primary"].url
        groups.append(
            [
                system(REPLICAS.format(n), "run:app", {**tally, "TALLY_REDIS_URL": url, "TALLY_REDIS_REPLICAS": str(n)},
                       redis=True)
                for n in (0, 1)
            ]
        )  # fmt: skip
    groups.append([System(CEILING, "apps:ceiling()", {}, worker_class=worker_class, modes=("many",))])
    return groups


def estimate(systems: list[System], args: argparse.Namespace) -> str:
    """How long the run will take, from its wrk runs and the systems it starts."""
    per_round = sum(len(s.modes) for s in systems)
    seconds = args.rounds * per_round * (args.seconds + WRK_OVERHEAD) + len(systems) * (START_SECONDS + 1)
    parts = (
        [f"{len(systems)} systems, {args.rounds} rounds of {per_round} wrk runs of {args.seconds} s"] if systems else []
    )
    sizes = args.scale_sizes
    if sizes:
        seconds += len(sizes) * ((args.rounds + 1) * (args.seconds + WRK_OVERHEAD) + START_SECONDS)
        seconds += sum(sizes) * POPULATE_SECONDS + sizes[-1] * PRUNE_SECONDS
        parts.append(f"scale runs with {', '.join(f'{n:,}' for n in sizes)} sessions stored")
    done = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
    return f"{'; '.join(parts)}: about {seconds / 60:.1f} minutes, until about {done:%H:%M}"


def run_main(groups: list[list[System]], servers: dict[str, RedisServer], args: argparse.Namespace) -> None:
    """Start every system, warm it up, and run the rounds; stop everything on the way out, however it ends."""
    systems = [s for g in groups for s in g]
    by_class = {c: [g for g in groups if g[0].worker_class == c] for c in args.worker_classes}
    with ExitStack() as stack:
        # Each is stopped even if its start fails halfway, and even if stopping another fails.
        for server in servers.values():
            stack.callback(server.stop)
            server.start()
        first = next(iter(servers.values()), None)
        if first:
            args.ping_us["before"] = ping_us(first)
        for system in systems:
            stack.callback(system.stop)
            system.start(args.workers, args.threads, args.worker_connections)
            wrk(system.url, 1, args.connections)  # warm up
            if system.redis:
                system.hiredis = system.workers_loaded("/hiredis/")
            print(f"started {system.label}", flush=True)
        began = time.monotonic()
        for round_ in range(args.rounds):
            # The worker classes take turns to go first, and so do the groups within each; each
            # Tally goes first in its pair on even rounds and second on odd ones.  A group runs
            # both its modes before the next group starts, so that a system's shared run comes
            # within two runs of its own many run (their ratio is a goal), the modes also taking
            # turns to go first: many, then shared on even rounds, and the reverse on odd ones.
            for worker_class in rotated(args.worker_classes, round_):
                for group in rotated(by_class[worker_class], round_):
                    order = group if round_ % 2 == 0 else group[::-1]
                    for mode in ("many", "shared") if round_ % 2 == 0 else ("shared", "many"):
                        for system in order:
                            if mode not in system.modes:
                                continue
                            result = run_once(system, mode, args.seconds, args.connections)
                            system.runs.setdefault(mode, []).append(result)
                            print(
                                f"round {round_ + 1}/{args.rounds} {time.monotonic() - began:5.0f}s "
                                f"{system.label:44} {mode:6} {result['rps']:8.0f} req/s",
                                flush=True,
                            )
        if first:
            args.ping_us["after"] = ping_us(first)
        if "replica" in servers:
            link = servers["replica"].replication().get("master_link_status")
            if link != "up":
                raise RuntimeError(f"the replica's link to its primary is {link!r} after the runs")
            args.replicas_seen = servers["primary"].replication().get("connected_slaves")
    args.redis_version = next((s.version for s in servers.values()), "")


def main() -> None:
    args = parse_args()

    # SIGTERM ends a run as Ctrl-C does: through every finally, so that nothing is left running.
    def leave(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tally-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        servers = redis_servers(work, args.parts, args.worker_classes)
        groups = build_groups(work, servers, args)
        systems = [s for g in groups for s in g]
        print(estimate(systems, args), flush=True)
        if systems:
            run_main(groups, servers, args)
        scale = run_scale(work, tally_env(work), args) if args.scale_sizes else []
        args.took = time.monotonic() - began
        write_report(systems, scale, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"took {(time.monotonic() - began) / 60:.1f} minutes", flush=True)


def run_scale(work: Path, env: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """p99 and worker RSS with many sessions stored, and the prune of the largest store.

    One Tally per store size (gthread), all running at once and measured in
    alternating rounds, like the main table.  Each request increments one of
    the store's sessions (or of a uniform sample of 10,000 of them) at random,
    so the store's size is what every request meets.
    """
    sizes = args.scale_sizes
    systems = []
    for size in sizes:
        folder = work / f"stored-{size}"
        began = time.monotonic()
        cookies = populate(str(folder), size, 10_000)
        cookie_file = work / f"cookies-{size}"
        cookie_file.write_text("\n".join(cookies) + "\n")
        print(f"stored {size} sessions in {time.monotonic() - began:.0f}s", flush=True)
        store = {**env, "TALLY_SESSION_DIR": str(folder)}
        systems.append(System(f"{size:,}", "run:app", store, worker_class=MAIN_CLASS, cookies=str(cookie_file)))
    # Flush the new files now, or their writeback would compete with the measurement.
    os.sync()
    with ExitStack() as stack:
        for system in systems:
            stack.callback(system.stop)
            system.start(args.workers, args.threads)
            # The first touch of a session whose file is not in the page cache
            # reads the disk; this run does it, and its p99 is shown apart.
            system.runs["first"] = [scale_run(system, args)]
        for round_ in range(args.rounds):
            for system in rotated(systems, round_):
                result = scale_run(system, args)
                system.runs.setdefault("stored", []).append(result)
                print(
                    f"round {round_ + 1} {system.name:>9} stored {result['p99_us'] / 1000:6.2f} ms p99, "
                    f"{result['disk_mib']:.1f} MiB read from disk",
                    flush=True,
                )
        rows = [
            {
                "sessions": size,
                "rps": median(system.runs["stored"], "rps"),
                "p99_us": median(system.runs["stored"], "p99_us"),
                "p99_ratio": ratio(system.runs["stored"], systems[0].runs["stored"], "p99_us"),
                "disk_mib": sum(r["disk_mib"] for r in system.runs["stored"]),
                "first_p99_us": system.runs["first"][0]["p99_us"],
                "rss": system.worker_rss(),
            }
            for size, system in zip(sizes, systems, strict=True)
        ]
    largest = systems[-1]
    # Session files only: the folder also holds the per-address quota counts (quotas/).
    kept = sum(1 for entry in os.scandir(largest.env["TALLY_SESSION_DIR"]) if len(entry.name) == 64)
    assert kept == rows[-1]["sessions"], f"the runs created sessions ({kept}): cookies were not the stored ones"
    began = time.monotonic()
    prune = [sys.executable, "-m", "flask", "--app", "run", "sessions", "prune"]
    prune_env = {**os.environ, **largest.env}
    out = subprocess.run(prune, cwd=ROOT, env=prune_env, capture_output=True, text=True, check=True).stdout
    rows[-1]["prune_seconds"] = time.monotonic() - began
    rows[-1]["prune_output"] = out.strip()
    return rows


def per_round(runs: list[dict[str, float]], base: list[dict[str, float]], key: str) -> list[float]:
    """One measure over another's, round by round: a slow spell on the machine hits both alike."""
    return [mine[key] / theirs[key] for mine, theirs in zip(runs, base, strict=True)]


def ratio(runs: list[dict[str, float]], base: list[dict[str, float]], key: str = "rps") -> str:
    """The median of the per-round ratios, and their range."""
    if runs is base:
        return "1"
    ratios = per_round(runs, base, key)
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


@dataclass(frozen=True)
class Ratio:
    """A measure of one system over another of the same worker class, taken round by round."""

    #: Its name in the history file: keep it when the label changes.
    key: str
    label: str
    system: str
    base: str
    mode: str = "many"
    base_mode: str = "many"
    metric: str = "rps"
    #: The goal issue #15 sets, and the worker classes it names (every class when empty).
    goal: str = ""
    goal_classes: tuple[str, ...] = ()


#: The ratios every run reports, the goals of issue #15 first.
RATIOS = (
    Ratio("files/ceiling", "Tally on files ÷ no-session Flask", "Tally, files", CEILING,
          goal="≥ 0.80", goal_classes=("sync", "gthread")),
    Ratio("files/stock", "Tally on files ÷ stock on files", "Tally, files", "stock, files",
          goal="≥ 2.0", goal_classes=("sync",)),
    Ratio("redis/stock", "Tally on Redis ÷ stock on Redis", "Tally, Redis", "stock, Redis", goal="≥ 1.5"),
    Ratio("redis/ceiling", "Tally on Redis ÷ no-session Flask", "Tally, Redis", CEILING, goal="≥ 0.70"),
    Ratio("files-shared/many", "one shared cookie ÷ a cookie per connection, Tally on files", "Tally, files",
          "Tally, files", mode="shared", goal="≥ 0.9, 0 lost"),
    Ratio("redis-shared/many", "one shared cookie ÷ a cookie per connection, Tally on Redis", "Tally, Redis",
          "Tally, Redis", mode="shared"),
    Ratio("files/stock-shared", "Tally on files ÷ stock on files, one shared cookie", "Tally, files",
          "stock, files", mode="shared", base_mode="shared"),
    Ratio("redis/stock-shared", "Tally on Redis ÷ stock on Redis, one shared cookie", "Tally, Redis",
          "stock, Redis", mode="shared", base_mode="shared"),
    Ratio("replicas/none", "waiting for one replica ÷ not waiting (`REPLICAS=1` ÷ `0`), req/s", REPLICAS.format(1),
          REPLICAS.format(0), goal="≥ 0.75"),
    Ratio("replicas/none-shared", "the same, one shared cookie", REPLICAS.format(1), REPLICAS.format(0),
          mode="shared", base_mode="shared", goal="≥ 0.75"),
    Ratio("replicas/none-p99", "waiting for one replica ÷ not waiting, p99", REPLICAS.format(1),
          REPLICAS.format(0), metric="p99_us"),
)  # fmt: skip


def lost(runs: list[dict[str, float]]) -> int:
    """Increments answered 200 that the counter does not show, over all the runs."""
    return round(sum(r.get("lost", 0) for r in runs))


def measured(systems: list[System]) -> list[dict[str, Any]]:
    """Each system's medians in each mode, as the history keeps them."""
    return [
        {
            "worker_class": s.worker_class,
            "system": s.name,
            "mode": mode,
            "rps": round(median(runs, "rps"), 1),
            "p50_ms": round(median(runs, "p50_us") / 1000, 3),
            "p99_ms": round(median(runs, "p99_us") / 1000, 3),
            "requests": round(sum(r["requests"] for r in runs)),
            "lost": lost(runs) if mode == "shared" else None,
            "failed": round(sum(r["failed"] + r["socket_errors"] for r in runs)),
        }
        for s in systems
        for mode, runs in s.runs.items()
    ]


def ratios_of(systems: list[System]) -> list[dict[str, Any]]:
    """Every ratio of :data:`RATIOS` under every worker class that ran both its systems: the median of the per-round
    ratios and their range, with the lost increments of a shared-cookie measure."""
    found = {(s.worker_class, s.name): s for s in systems}
    rows = []
    for measure in RATIOS:
        for worker_class in WORKER_CLASSES:
            mine, base = found.get((worker_class, measure.system)), found.get((worker_class, measure.base))
            if not mine or not base or measure.mode not in mine.runs or measure.base_mode not in base.runs:
                continue
            values = per_round(mine.runs[measure.mode], base.runs[measure.base_mode], measure.metric)
            row: dict[str, Any] = {
                "worker_class": worker_class,
                "ratio": measure.key,
                "median": round(statistics.median(values), 4),
                "low": round(min(values), 4),
                "high": round(max(values), 4),
            }
            if measure.mode == "shared" and measure.base_mode == "many":
                row["lost"] = lost(mine.runs["shared"])
            rows.append(row)
    return rows


def record(systems: list[System], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Append this full run to the history; return the last :data:`SPREAD_RUNS` full runs, this one last.

    A line per run: ``date`` (UTC), ``commit`` (HEAD, and ``dirty`` when the code measured differs from it), the
    settings, ``environment`` (Python, kernel, the libraries' versions, redis-server's, and the loopback PING in
    µs before and after the runs), ``systems`` (each system's medians per worker class and mode) and ``ratios``
    (per worker class: the median of the per-round ratios, their range, and the lost increments of a
    shared-cookie measure).
    """
    entry = {
        "date": args.date,
        "commit": args.commit,
        "dirty": args.dirty,
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "connections": args.connections,
            "workers": args.workers,
            "threads": args.threads,
            "worker_connections": args.worker_connections,
        },
        "environment": environment(args),
        "systems": measured(systems),
        "ratios": ratios_of(systems),
    }
    args.history.parent.mkdir(parents=True, exist_ok=True)
    with args.history.open("a") as history:
        history.write(json.dumps(entry, ensure_ascii=False) + "\n")
    lines = [line for line in args.history.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines[-SPREAD_RUNS:]]


def shown_path(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def goal_threshold(goal: str) -> float | None:
    """The number that a goal such as "≥ 0.9, 0 lost" asks a ratio's median to reach; None without a goal."""
    match = re.match(r"≥ ([0-9.]+)", goal)
    return float(match.group(1)) if match else None


def ratios_table(systems: list[System], runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """This run's ratios, each beside the goal and its spread over the last full runs."""
    this_run = {(r["worker_class"], r["ratio"]): r for r in ratios_of(systems)}
    hiredis = all(s.hiredis for s in systems if s.redis)
    if runs:
        if len(runs) >= SPREAD_RUNS:
            spread_head = f"last {len(runs)} full runs"
        else:
            spread_head = "1 full run so far" if len(runs) == 1 else f"{len(runs)} full runs so far"
        listed = "; ".join(
            f"{run['date'][:16].replace('T', ' ')} UTC, `{run['commit']}`{uncommitted(run['dirty'])}" for run in runs
        )
        intro = (
            "Each ratio: this run's median of the per-round ratios (their range in brackets), and the lowest to "
            f"highest of that median over the {spread_head} ({listed}). Every full run is kept in "
            f"`{shown_path(args.history)}`."
        )
        if len(runs) < SPREAD_RUNS:
            intro += f" There are fewer than {SPREAD_RUNS} full runs so far, so the spread is over {len(runs)}."
    else:
        spread_head = ""
        intro = (
            "Each ratio: this run's median of the per-round ratios, their range in brackets. A partial run is not "
            "added to the history of full runs, so no spread across runs is shown."
        )
    head = "| measure | workers | goal | this run |" + (f" {spread_head} |" if runs else "")
    lines = ["", intro, "", head, "|---|---|---|---:|" + ("---:|" if runs else "")]
    for measure in RATIOS:
        for worker_class in WORKER_CLASSES:
            row = this_run.get((worker_class, measure.key))
            if not row:
                continue
            label = measure.label
            if measure.key.startswith("redis/stock"):
                label += ", both with hiredis" if hiredis else " (hiredis NOT loaded in every worker)"
            goal = measure.goal if not measure.goal_classes or worker_class in measure.goal_classes else ""
            cell = f"{row['median']:.2f} ({row['low']:.2f}–{row['high']:.2f})"
            if "lost" in row:
                cell += f", {row['lost']} lost"
            line = f"| {label} | {worker_class} | {goal} | {cell} |"
            if runs:
                medians, lost_counts = [], []
                for run in runs:
                    for past in run["ratios"]:
                        if (past["worker_class"], past["ratio"]) == (worker_class, measure.key):
                            medians.append(past["median"])
                            lost_counts.append(past.get("lost", 0))
                spread = f"{min(medians):.2f}–{max(medians):.2f}" if medians else ""
                if "lost" in row and medians:
                    spread += f", {'0 lost in each' if not any(lost_counts) else f'{sum(lost_counts)} lost in all'}"
                if 0 < len(medians) < len(runs):
                    spread += f" ({len(medians)} runs)"
                threshold = goal_threshold(goal)
                if threshold is not None and medians:
                    # Counted on the unrounded medians: 0.696 shows as 0.70 but misses "≥ 0.70".
                    met = sum(m >= threshold and not lost for m, lost in zip(medians, lost_counts, strict=True))
                    spread += f"; goal met in {met} of {len(medians)}"
                line += f" {spread} |"
            lines.append(line)
    return lines


def main_report(systems: list[System], runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The main results: settings, the ratios beside their goals and spread, and each worker class's table."""
    found = {(s.worker_class, s.name): s for s in systems}
    classes = [c for c in WORKER_CLASSES if any(s.worker_class == c for s in systems)]
    if args.full:
        command = "`make bench`"
    else:
        command = f"`bench/harness.py --only {','.join(sorted(args.parts))} --worker-classes {','.join(classes)}`"
    how = {
        "sync": "*sync*: 1 thread per worker",
        "gthread": f"*gthread*: {args.threads} threads per worker",
        "gevent": f"*gevent*: up to {args.worker_connections} connections per worker",
    }
    shared = [c for c in classes if c in SHARED_CLASSES]
    shared_text = (
        f" *shared* (under {' and '.join(shared)}): all connections send one cookie; *lost* counts increments "
        "answered 200 that the counter does not show."
        if shared
        else ""
    )
    lines = [
        f"{command} on this machine ({os.cpu_count()} cores, shared and noisy), {which_code(args)}; it took "
        f"{args.took / 60:.1f} minutes. Every system runs under gunicorn with "
        f"{args.workers} workers, once per worker class ({'; '.join(how[c] for c in classes)}); wrk with "
        f"{args.connections} connections on `GET /inc`, {args.rounds} rounds of {args.seconds:g} s alternating "
        "between systems; medians. A ratio is taken in each round between two systems of one worker class, which "
        f"run side by side. *many*: each connection has its own cookie.{shared_text}",
        *redis_notes(systems, args),
        "",
        environment_note(args),
        *ratios_table(systems, runs, args),
    ]
    for worker_class in classes:
        lines += [
            "",
            f"**{worker_class}** workers, {how[worker_class].split(': ')[1]}:",
            "",
            "| system | mode | req/s | p50 ms | p99 ms | lost | × stock | × ceiling |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        ceiling_runs = found[(worker_class, CEILING)].runs["many"]
        for system in (s for s in systems if s.worker_class == worker_class):
            for mode, runs_ in system.runs.items():
                stock = found.get((worker_class, system.versus or ""))
                versus = ratio(runs_, stock.runs[mode]) if stock else ""
                lost_ = f"{lost(runs_)} of {sum(r['requests'] for r in runs_):.0f}" if mode == "shared" else ""
                lines.append(
                    f"| {system.name} | {mode} | {median(runs_, 'rps'):.0f} | {median(runs_, 'p50_us') / 1000:.2f} | "
                    f"{median(runs_, 'p99_us') / 1000:.2f} | {lost_} | {versus} | {ratio(runs_, ceiling_runs)} |"
                )
    failed = [
        f"{s.label} {mode}: {sum(r['failed'] for r in runs_):.0f} non-200, "
        f"{sum(r['socket_errors'] for r in runs_):.0f} socket errors"
        for s in systems
        for mode, runs_ in s.runs.items()
        if any(r["failed"] or r["socket_errors"] for r in runs_)
    ]
    lines += ["", f"Answers other than 200, and socket errors: {'; '.join(failed) if failed else 'none'}."]
    return "\n".join(lines)


SCALE_HEADING = "## With many sessions stored (Tally, files)"


def scale_report(scale: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        SCALE_HEADING,
        "",
        f"`bench/harness.py --only scale`, {which_code(args)}. One Tally per store size, "
        f"all running, under gunicorn {MAIN_CLASS} with {args.workers} workers and {args.threads} threads, "
        f"{args.rounds} alternating rounds of {args.seconds:g} s. Each "
        "request increments a stored session picked at random (from all of them, or from a uniform sample of "
        "10,000), so every request meets the whole store; none is created. A first run touches the sampled "
        "sessions before the rounds; its p99 is shown apart, because a session file that is not in the page "
        "cache costs a disk read on first touch. This machine also pages out page cache that looks cold "
        "(DAMON proactive reclaim), so a store re-reads some session files in its rounds; the machine's disk "
        "reads during each store's rounds are shown.",
        "",
        f"| sessions stored | req/s | p99 ms | p99 ÷ p99 with {scale[0]['sessions']:,} | MiB read from disk | "
        "workers' RSS MiB | p99 ms of the first run |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in scale:
        lines.append(
            f"| {row['sessions']:,} | {row['rps']:.0f} | {row['p99_us'] / 1000:.2f} | {row['p99_ratio']} | "
            f"{row['disk_mib']:.1f} | {row['rss'] / 2**20:.0f} | {row['first_p99_us'] / 1000:.2f} |"
        )
    last = scale[-1]
    lines += ["", f"`flask sessions prune` over {last['sessions']:,} stored sessions (1 in 31 expired) took "
              f"{last['prune_seconds']:.1f} s: `{last['prune_output']}`"]  # fmt: skip
    return "\n".join(lines)


def redis_notes(systems: list[System], args: argparse.Namespace) -> list[str]:
    """A paragraph: what the Redis rows ran against, and whether redis-py parsed with hiredis in their workers."""
    on_redis = [s for s in systems if s.redis]
    if not on_redis:
        return []
    if redis.utils.HIREDIS_AVAILABLE:
        from importlib.metadata import version

        parser = f"hiredis {version('hiredis')} (`redis.utils.HIREDIS_AVAILABLE` is true)"
    else:
        parser = (
            "its pure-Python parser (hiredis is not installed, or too old: `redis.utils.HIREDIS_AVAILABLE` is false)"
        )
    missing = [s.label for s in on_redis if not s.hiredis]
    if not missing:
        workers = "hiredis was loaded in the workers of all of them"
    else:
        loaded = [s.label for s in on_redis if s.hiredis]
        workers = f"hiredis was loaded in the workers of {', '.join(loaded) or 'none'}, not of {', '.join(missing)}"
    notes = [
        f"Redis rows: redis-server {args.redis_version} on loopback, saving nothing (`--save ''`, "
        f"`--appendonly no`); redis-py {redis.__version__} parses replies with {parser}; {workers}."
    ]
    if "redis" in args.parts:
        notes.append("*Tally, Redis* and *stock, Redis* of every worker class share one Redis, with no replica.")
    if any(s.name.startswith(REPLICAS.format("")) for s in on_redis):
        notes.append(
            f"The two *REPLICAS* rows ({MAIN_CLASS} only) share another Redis, a primary with one replica on loopback "
            f"(`--replicaof`; its link was up before the runs and after them, with {args.replicas_seen} replica "
            "connected): with `TALLY_REDIS_REPLICAS=1` each write is answered only once `WAIT` says the replica has "
            "it, with `0` as soon as the primary has it."
        )
    return ["", " ".join(notes)]


def environment_note(args: argparse.Namespace) -> str:
    """A sentence: Python, the kernel, the libraries, and the loopback PING before and after the runs."""
    env = environment(args)
    libraries = ", ".join(f"{name} {v}" for name, v in env["libraries"].items())
    text = f"Python {env['python']}, Linux {env['kernel']}; {libraries}."
    if args.ping_us:
        times = " and ".join(f"{us:g} µs {when} the runs" for when, us in args.ping_us.items())
        text += f" A redis-py PING over loopback (median of {PINGS}) took {times}."
    return text


RESULTS = ("<!-- results: written by make bench -->", "<!-- end of results -->")
SCALE = ("<!-- scale results: written by bench/harness.py --only scale -->", "<!-- end of scale results -->")


def write_between_markers(
    path: Path, results: str, markers: tuple[str, str] = RESULTS, after: str | None = None
) -> None:
    """Replace the results between ``markers`` in ``path``, keeping the hand-written text around them.

    Missing markers are added: right after the text ``after`` if the file has it, or else at the end.
    """
    begin, end = markers
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text:
        if after and after in text:
            head, tail = text.split(after, 1)
            text = f"{head}{after}\n\n{begin}\n{end}{tail}"
        else:
            text += f"\n{begin}\n{end}\n" if text else f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{results}\n{end}{tail}")


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def split_legacy_scale(path: Path) -> tuple[str, str] | None:
    """A report whose main results still hold the scale runs: those results without them, and them.

    Before the scale runs were opt-in they were written inside the main results; a run that moves them to their own
    block says which run they came from, so that later runs without them keep them.
    """
    text = path.read_text() if path.exists() else ""
    begin, end = RESULTS
    if SCALE[0] in text or begin not in text or end not in text:
        return None
    block = text.split(begin, 1)[1].split(end, 1)[0]
    if SCALE_HEADING not in block:
        return None
    main, section = block.split(SCALE_HEADING, 1)
    # The commit that last changed the prune line wrote these figures.
    written = git("log", "-1", "--format=%h on %ad (%s)", "--date=short", "-G", "sessions prune` over", "--", str(path))
    source = f", committed in {written}" if written else ""
    note = (
        f"From an earlier `make bench`, when the scale runs were part of it ({MAIN_CLASS} workers{source}). "
        "`bench/harness.py --only scale` runs them again; runs without them keep these figures."
    )
    return main.strip(), f"{SCALE_HEADING}\n\n{note}\n\n{section.strip()}"


def write_report(systems: list[System], scale: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The report's blocks (main results, scale runs), the README's results block, the plot and the history."""
    report = Path(args.out + ".md")
    legacy = split_legacy_scale(report)
    if legacy and not systems:
        write_between_markers(report, legacy[0])
    if systems:
        runs = record(systems, args) if args.full else []
        text = main_report(systems, runs, args)
        write_between_markers(report, text)
        if args.readme:
            write_between_markers(ROOT / "README.md", text)
        plot(systems, args.out + ".png")
        print(text)
    if scale:
        text = scale_report(scale, args)
        write_between_markers(report, text, SCALE, after=RESULTS[1])
        print(text)
    elif legacy:
        write_between_markers(report, legacy[1], SCALE, after=RESULTS[1])


#: A colour per worker class in the plot.
COLOURS = {"sync": "#4477aa", "gthread": "#22aa66", "gevent": "#aa5599"}


def plot(systems: list[System], path: str) -> None:
    """Two panels, a cookie per connection and one shared cookie: a bar per system and worker class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in WORKER_CLASSES if any(s.worker_class == c for s in systems)]
    names = [CEILING, *dict.fromkeys(s.name for s in systems if s.name != CEILING)]
    found = {(s.worker_class, s.name): s for s in systems}
    width = 0.8 / len(classes)
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.4 * len(names)), 8), dpi=120, sharex=True)
    for ax, mode, title in (
        (axes[0], "many", "a cookie per connection"),
        (axes[1], "shared", "one cookie shared by all connections"),
    ):
        for k, worker_class in enumerate(classes):
            offset = (k - (len(classes) - 1) / 2) * width
            for i, name in enumerate(names):
                system = found.get((worker_class, name))
                if not system or mode not in system.runs:
                    continue
                runs = system.runs[mode]
                label = worker_class if i == 0 or (mode == "shared" and name == "Tally, files") else None
                ax.bar(i + offset, median(runs, "rps"), width=width, color=COLOURS[worker_class], label=label)
                if mode == "shared":
                    share = lost(runs) / sum(r["requests"] for r in runs)
                    text = "0 lost" if share == 0 else f"{share:.0%}\nlost"
                    ax.annotate(text, (i + offset, median(runs, "rps")), ha="center", va="bottom", fontsize=7)
            ceiling = found.get((worker_class, CEILING))
            if mode == "shared" and ceiling and worker_class in SHARED_CLASSES:
                ax.axhline(median(ceiling.runs["many"], "rps"), color=COLOURS[worker_class], linestyle="--",
                           linewidth=1)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("requests per second")
        ax.legend(fontsize=8, title="gunicorn workers", title_fontsize=8)
    axes[1].set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    fig.suptitle("GET /inc: Tally vs stock Flask-Session and no session (higher is better; dashed: no-session ceiling)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
