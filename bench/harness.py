"""``make bench``: Tally against stock Flask-Session and the no-session ceiling.

Every system runs under gunicorn with the same workers and threads.  Runs
alternate between systems, round after round, so a noisy machine slows all of
them alike; the table shows medians, and ratios taken round by round, which is
what holds on a shared 2-core machine.  The scale runs do the same with one
Tally per store size.  Results go to docs/benchmarks.md and docs/benchmarks.png,
and the main table to README.md's results block.

Two more Tallys measure what waiting for a replica costs: both on a second
Redis that has a replica attached, one with ``TALLY_REDIS_REPLICAS=0`` and one
with ``=1`` (each write then waits for Redis's ``WAIT``).

``--only redis`` (or ``files``, ``replicas``, ``scale``; comma-separated)
measures part of it, beside the ceiling; such a run, or one with ``--out``
elsewhere, leaves README.md alone, and a partial run must be given ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.utils

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_OUT = ROOT / "docs" / "benchmarks"
#: The parts ``--only`` can pick; the ceiling always runs, as every ratio needs it.
PARTS = ("files", "redis", "replicas", "scale")
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


@dataclass
class RedisServer:
    """A redis-server on a free loopback port, saving nothing; a replica of ``primary`` if given."""

    folder: Path
    primary: RedisServer | None = None
    port: int = 0
    version: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.port = free_port()
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
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@dataclass
class System:
    """One app under gunicorn."""

    name: str
    target: str
    env: dict[str, str]
    sessions: bool = True
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
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int, threads: int) -> None:
        self.port = free_port()
        # An explicit config: from the project root gunicorn would read Tally's own.
        command = [sys.executable, "-m", "gunicorn", "--config", str(BENCH / "gunicorn_bench.py")]
        command += ["--workers", str(workers)]
        if self.target.startswith("apps:"):
            command += ["--pythonpath", str(BENCH)]
        command += ["--threads", str(threads), "--bind", f"127.0.0.1:{self.port}"]
        # A system may bring its own metrics folder (the demo's is in its work folder, deleted after).
        metrics = self.env.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="bench-metrics-")
        env = {**os.environ, **self.env, "PROMETHEUS_MULTIPROC_DIR": metrics}
        self.proc = subprocess.Popen([*command, self.target], cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            if status_of(self.url + "/counter") == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.1)

    def workers(self) -> list[str]:
        assert self.proc
        return Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()

    def workers_loaded(self, library: str) -> bool:
        """Whether every worker has mapped a shared library whose path contains ``library``."""
        pids = self.workers()
        return bool(pids) and all(library in Path(f"/proc/{pid}/maps").read_text() for pid in pids)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--scale", default="1000,100000,1000000", help="stored sessions for the scale runs ('' to skip)"
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to measure, of {', '.join(PARTS)} (redis includes replicas); "
        "the no-session ceiling always runs",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"where the report goes, without .md/.png (default {DEFAULT_OUT.relative_to(ROOT)}); "
        "README.md's results block is rewritten only by a full run to the default place",
    )
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or not parts <= set(PARTS):
        parser.error(f"--only takes a comma-separated list of {', '.join(PARTS)}, not {args.only!r}")
    if "redis" in parts:
        parts.add("replicas")
    args.parts = parts
    args.full = parts == set(PARTS)
    if args.out is None:
        args.out = str(DEFAULT_OUT)
    if not args.full and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        parser.error("--only measures part of the benchmark: give --out somewhere outside docs/")
    args.readme = args.full and Path(args.out).resolve() == DEFAULT_OUT.resolve()
    args.replicas_seen = None
    return args


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="tally-bench-", dir=os.environ.get("BENCH_DIR")))
    # Tally and stock share one Redis; the replica rows have their own primary,
    # with a replica, so that replication touches neither of those.
    servers: dict[str, RedisServer] = {}
    if "redis" in args.parts:
        servers["redis"] = RedisServer(work / "redis")
    if "replicas" in args.parts:
        servers["primary"] = RedisServer(work / "primary")
        servers["replica"] = RedisServer(work / "replica", primary=servers["primary"])
    tally = {"TALLY_INSTANCE_PATH": str(work / "instance"), "TALLY_SECRET_KEY": "bench"}
    groups: list[list[System]] = []
    systems: list[System] = []
    try:
        for server in servers.values():
            server.start()
        # Each Tally runs right beside what it is compared with, first on even
        # rounds and second on odd ones; the pairs take turns to go first.
        if "files" in args.parts:
            groups.append(
                [
                    System("Tally, files", "run:app", {**tally, "TALLY_SESSION_DIR": str(work / "tally-files")},
                           versus="stock, files"),
                    System("stock, files", "apps:stock()",
                           {"BENCH_STORE": "files", "BENCH_SESSION_DIR": str(work / "stock")}, versus="stock, files"),
                ]
            )  # fmt: skip
        if "redis" in args.parts:
            url = servers["redis"].url
            groups.append(
                [
                    System("Tally, Redis", "run:app", {**tally, "TALLY_REDIS_URL": url}, versus="stock, Redis",
                           redis=True),
                    System("stock, Redis", "apps:stock()", {"BENCH_STORE": "redis", "BENCH_REDIS_URL": url},
                           versus="stock, Redis", redis=True),
                ]
            )  # fmt: skip
        if "replicas" in args.parts:
            url = servers["primary"].url
            zero, one = (f"Tally, Redis + replica, REPLICAS={n}" for n in (0, 1))
            groups.append(
                [
                    System(zero, "run:app", {**tally, "TALLY_REDIS_URL": url, "TALLY_REDIS_REPLICAS": "0"},
                           redis=True),
                    System(one, "run:app", {**tally, "TALLY_REDIS_URL": url, "TALLY_REDIS_REPLICAS": "1"},
                           redis=True),
                ]
            )  # fmt: skip
        groups.append([System("Flask, no session", "apps:ceiling()", {}, sessions=False)])
        systems = [s for g in groups for s in g]
        for system in systems:
            system.start(args.workers, args.threads)
            wrk(system.url, 1, args.connections)  # warm up
            if system.redis:
                system.hiredis = system.workers_loaded("/hiredis/")
        for round_ in range(args.rounds):
            order = [s for g in rotated(groups, round_) for s in (g if round_ % 2 == 0 else g[::-1])]
            for mode in ("many", "shared"):
                for system in order:
                    if mode == "shared" and not system.sessions:
                        continue
                    result = run_once(system, mode, args.seconds, args.connections)
                    system.runs.setdefault(mode, []).append(result)
                    print(f"round {round_ + 1} {system.name:34} {mode:6} {result['rps']:8.0f} req/s", flush=True)
        if "replica" in servers:
            link = servers["replica"].replication().get("master_link_status")
            if link != "up":
                raise RuntimeError(f"the replica's link to its primary is {link!r} after the runs")
            args.replicas_seen = servers["primary"].replication().get("connected_slaves")
    finally:
        for system in systems:
            system.stop()
        for server in reversed(servers.values()):
            server.stop()
    args.redis_version = next((s.version for s in servers.values()), "")
    scale = run_scale(work, tally, args) if args.scale and "scale" in args.parts else []
    write_report(systems, scale, args)
    shutil.rmtree(work, ignore_errors=True)


def run_scale(work: Path, env: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """p99 and worker RSS with many sessions stored, and the prune of the largest store.

    One Tally per store size, all running at once and measured in alternating
    rounds, like the main table.  Each request increments one of the store's
    sessions (or of a uniform sample of 10,000 of them) at random, so the
    store's size is what every request meets.
    """
    sizes = [int(s) for s in args.scale.split(",")]
    systems = []
    for size in sizes:
        folder = work / f"stored-{size}"
        began = time.monotonic()
        cookies = populate(str(folder), size, 10_000)
        cookie_file = work / f"cookies-{size}"
        cookie_file.write_text("\n".join(cookies) + "\n")
        print(f"stored {size} sessions in {time.monotonic() - began:.0f}s", flush=True)
        store = {**env, "TALLY_SESSION_DIR": str(folder)}
        systems.append(System(f"{size:,}", "run:app", store, cookies=str(cookie_file)))
    # Flush the new files now, or their writeback would compete with the measurement.
    os.sync()
    try:
        for system in systems:
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
    finally:
        for system in systems:
            system.stop()
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


def write_report(systems: list[System], scale: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by_name = {s.name: s for s in systems}
    ceiling_runs = by_name["Flask, no session"].runs["many"]
    ceiling = median(ceiling_runs, "rps")
    command = "`make bench`" if args.full else f"`bench/harness.py --only {','.join(sorted(args.parts))}`"
    lines = [
        f"{command} on this machine ({os.cpu_count()} cores, shared and noisy): gunicorn with "
        f"{args.workers} workers and {args.threads} threads for every system, wrk with {args.connections} connections "
        f"on `GET /inc`, {args.rounds} rounds of {args.seconds:g} s alternating between systems; medians. "
        "Ratios are the median of each round's ratio, with their range in brackets. "
        "*many*: each connection has its own cookie. *shared*: all connections send one cookie; "
        "*lost* counts increments answered 200 that the counter does not show.",
        *redis_notes(systems, args),
        "",
        "| system | mode | req/s | p50 ms | p99 ms | lost | × stock | × ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system in systems:
        for mode, runs in system.runs.items():
            rps = median(runs, "rps")
            stock = by_name.get(system.versus or "")
            versus = ratio(runs, stock.runs[mode]) if stock else ""
            lost = f"{sum(r.get('lost', 0) for r in runs):.0f} of {sum(r['requests'] for r in runs):.0f}"
            lines.append(
                f"| {system.name} | {mode} | {rps:.0f} | {median(runs, 'p50_us') / 1000:.2f} | "
                f"{median(runs, 'p99_us') / 1000:.2f} | {lost if mode == 'shared' else ''} | {versus} | "
                f"{ratio(runs, ceiling_runs)} |"
            )
    shared = [f"{s.name}: {ratio(s.runs['shared'], s.runs['many'])}" for s in systems if s.name.startswith("Tally")]
    lines += ["", f"One shared cookie ÷ a cookie per connection, in req/s: {'; '.join(shared)}."]
    zero, one = (by_name.get(f"Tally, Redis + replica, REPLICAS={n}") for n in (0, 1))
    if zero and one:
        waits = [
            f"{mode}: {ratio(one.runs[mode], zero.runs[mode])} in req/s, "
            f"{ratio(one.runs[mode], zero.runs[mode], 'p99_us')} in p99"
            for mode in ("many", "shared")
        ]
        lines += [
            "",
            f"Waiting for one replica ÷ not waiting (`TALLY_REDIS_REPLICAS=1` ÷ `0`, both on the primary with a "
            f"replica, run side by side in every round): {'; '.join(waits)}. The goal is under 25% fewer requests "
            "a second (a req/s ratio above 0.75).",
        ]
    failed = [
        f"{s.name} {mode}: {sum(r['failed'] for r in runs):.0f} non-200, {sum(r['socket_errors'] for r in runs):.0f} "
        "socket errors"
        for s in systems
        for mode, runs in s.runs.items()
        if any(r["failed"] or r["socket_errors"] for r in runs)
    ]
    lines += ["", f"Answers other than 200, and socket errors: {'; '.join(failed) if failed else 'none'}."]
    if scale:
        lines += ["", "## With many sessions stored (Tally, files)", ""]
        lines += [
            f"One Tally per store size, all running, {args.rounds} alternating rounds of {args.seconds:g} s. Each "
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
    write_between_markers(Path(args.out + ".md"), "\n".join(lines))
    if args.readme:
        # The README shows the main table; the scale runs stay in docs/benchmarks.md.
        main_table = "\n".join(
            lines[: lines.index("## With many sessions stored (Tally, files)") - 1] if scale else lines
        )
        write_between_markers(ROOT / "README.md", main_table)
    plot(systems, ceiling, args.out + ".png")
    print("\n".join(lines))


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
    loaded = [s.name for s in on_redis if s.hiredis]
    missing = [s.name for s in on_redis if not s.hiredis]
    workers = f"hiredis was loaded in the workers of {'all of them' if not missing else ', '.join(loaded) or 'none'}"
    if missing and loaded:
        workers += f", not of {', '.join(missing)}"
    notes = [
        f"Redis rows: redis-server {args.redis_version} on loopback, saving nothing (`--save ''`, "
        f"`--appendonly no`); redis-py {redis.__version__} parses replies with {parser}; {workers}."
    ]
    if "redis" in args.parts:
        notes.append("*Tally, Redis* and *stock, Redis* share one Redis, with no replica.")
    if "replicas" in args.parts:
        notes.append(
            "The two *REPLICAS* rows share another Redis, a primary with one replica on loopback (`--replicaof`; "
            f"its link was up before the runs and after them, with {args.replicas_seen} replica connected): with "
            "`TALLY_REDIS_REPLICAS=1` each write is answered only once `WAIT` says the replica has it, with `0` as "
            "soon as the primary has it."
        )
    return ["", " ".join(notes)]


BEGIN, END = "<!-- results: written by make bench -->", "<!-- end of results -->"


def write_between_markers(path: Path, results: str) -> None:
    """Replace the results in ``path``, keeping the hand-written text around them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{results}\n{END}{tail}")


def plot(systems: list[System], ceiling: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(systems)), 4), dpi=120)
    names = [s.name.replace(", ", "\n") for s in systems]
    for offset, mode, colour, label in (
        (-0.2, "many", "#2a6", "a cookie per connection"),
        (0.2, "shared", "#e83", "one shared cookie"),
    ):
        values = [median(s.runs[mode], "rps") if mode in s.runs else 0 for s in systems]
        ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=label, color=colour)
    for i, system in enumerate(systems):
        if "shared" in system.runs:
            runs = system.runs["shared"]
            lost = sum(r["lost"] for r in runs) / sum(r["requests"] for r in runs)
            text = "0 lost" if lost == 0 else f"{lost:.0%} lost"
            ax.annotate(text, (i + 0.2, median(runs, "rps")), ha="center", va="bottom", fontsize=8)
    ax.axhline(ceiling, color="grey", linestyle="--", linewidth=1, label="no-session ceiling")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("requests per second (GET /inc)")
    ax.set_title("Tally vs stock Flask-Session (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
