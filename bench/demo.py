"""``make demo``: the question Tally answers, put to three programs under the same load.

"Are global variables thread-safe in Flask?  If 100 clients make requests at
once, will each see a unique number from 1 to 100, or will numbers be skipped
and repeated?"  Three apps run, each under ``gunicorn -w 4 --threads 4``
(gthread) on a free loopback port, on files only:

- the question's program, a module-level object counting in ``query()``
  (``apps:question()``, which says which worker process answered);
- the answers' recipe, stock Flask-Session on cachelib files (``apps:stock()``);
- Tally (``run:app``) on a fresh file store.

Each gets the same two loads, from plain threads on the standard library's
HTTP client (``make run`` installs nothing more), and one table says what came
back.  Every process started here is stopped on the way out, also on Ctrl-C,
SIGTERM or an error.
"""

from __future__ import annotations

import http.cookiejar
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from harness import DIRECT, System

WORKERS = 4
THREADS = 4
#: The question's 100 clients, one request each, on the shared counter.
CLIENTS = 100
#: Increments sent at once by one client with one cookie jar.
INCREMENTS = 500
#: Seconds any one request may take; a burst gives up twice that after it starts.
TIMEOUT = 30.0
#: Seconds to wait for every worker of the question's app to answer a read.
ALL_WORKERS_WITHIN = 15.0


@dataclass
class Answer:
    """One request's outcome: its status (0 when nothing answered), the number in the body, the worker's pid."""

    status: int
    number: int | None = None
    pid: str | None = None


def get(url: str, opener: urllib.request.OpenerDirector = DIRECT) -> Answer:
    """GET ``url`` on a connection of its own (urllib closes each), so gunicorn hands it to any worker."""
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            body = response.read().decode()
            status, pid = int(response.status), response.headers.get("X-Worker-Pid")
    except urllib.error.HTTPError as error:
        error.close()
        return Answer(error.code)
    except OSError:  # refused, reset or timed out: no answer
        return Answer(0)
    # Every answer here ends with its number: "7", "counter is 7", "global counter is 7".
    last = body.split()[-1] if body.split() else ""
    return Answer(status, int(last) if last.lstrip("-").isdigit() else None, pid)


def burst(n: int, send: Callable[[], Answer]) -> list[Answer]:
    """Send ``n`` requests at once, one per thread, all released together; collect what came back.

    Bounded: a request that has not finished twice TIMEOUT after the release is
    counted as unanswered (its daemon thread is left to time out on its own).
    """
    start = threading.Barrier(n + 1)
    answers: list[Answer | None] = [None] * n

    def one(i: int) -> None:
        try:
            start.wait(TIMEOUT)
        except threading.BrokenBarrierError:
            return
        answers[i] = send()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    start.wait(TIMEOUT)
    deadline = time.monotonic() + 2 * TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [answer or Answer(0) for answer in answers]


def every_worker(system: System) -> dict[str, int]:
    """Each worker's value of the global object, read (``/counter`` changes nothing) until all have answered.

    Which worker takes a connection is up to the kernel, so reads go out in
    small bursts until every worker gunicorn forked has answered one.
    """
    want = set(system.workers())
    values: dict[str, int] = {}
    deadline = time.monotonic() + ALL_WORKERS_WITHIN
    while not want <= values.keys():
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(want - values.keys())} did not answer within {ALL_WORKERS_WITHIN} s")
        for answer in burst(2 * WORKERS, lambda: get(system.url + "/counter")):
            if answer.status == 200 and answer.pid in want and answer.number is not None:
                values[answer.pid] = answer.number
    return values


@dataclass
class Row:
    """One app under one load: what was sent, what came back, and the counter(s) before and after."""

    load: str
    app: str
    sent: int
    answers: list[Answer]
    #: The counter before and after the load: one value per worker process for
    #: the global object (keyed by pid), else one value (keyed "counter").
    before: dict[str, int]
    after: dict[str, int]
    #: Whether each answer is a number taken from a counter that everyone shares.
    shared: bool
    #: The client's cookie jar, for the per-client loads.
    jar: http.cookiejar.CookieJar | None = None

    @property
    def numbers(self) -> list[int]:
        """The numbers of the answers that came back 200."""
        return [a.number for a in self.answers if a.status == 200 and a.number is not None]

    @property
    def answered(self) -> int:
        """How many requests came back 200 with a number."""
        return len(self.numbers)

    @property
    def distinct(self) -> int:
        """How many different numbers came back."""
        return len(set(self.numbers))

    @property
    def duplicates(self) -> int:
        """Answers that repeated a number someone else had also been given."""
        return self.answered - self.distinct

    def duplicates_by_cause(self) -> tuple[int, int] | None:
        """Duplicates from separate processes, and from threads of one process; None if answers carry no pid.

        For each number given k times: one per extra pid that gave it is a
        separate process counting on its own; one per extra time a pid gave it
        is two threads of that process racing.
        """
        pids_of: defaultdict[int, list[str]] = defaultdict(list)
        for answer in self.answers:
            if answer.status == 200 and answer.number is not None:
                if answer.pid is None:
                    return None if self.duplicates else (0, 0)
                pids_of[answer.number].append(answer.pid)
        processes = sum(len(set(pids)) - 1 for pids in pids_of.values())
        return processes, self.duplicates - processes

    @property
    def gaps(self) -> int:
        """Numbers a correct counter would have handed out for these requests that nobody got."""
        base = sum(self.before.values())
        return len(set(range(base + 1, base + self.sent + 1)) - set(self.numbers))

    @property
    def lost(self) -> int:
        """Requests answered 200 that the counter(s) do not show."""
        return self.answered - (sum(self.after.values()) - sum(self.before.values()))


@dataclass
class Apps:
    """The three programs, each under its own gunicorn."""

    question: System
    stock: System
    tally: System


def control_socket_off() -> dict[str, str]:
    """Keep these gunicorns off the user's default control socket, which each would take over (gunicorn 25.1+)."""
    from gunicorn.config import KNOWN_SETTINGS

    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        return {"GUNICORN_CMD_ARGS": "--no-control-socket"}
    return {}


def stop(systems: list[System]) -> None:
    """Stop every gunicorn, killing one that does not stop, and carry on to the next."""
    for system in systems:
        try:
            system.stop()
        except subprocess.TimeoutExpired:
            assert system.proc
            system.proc.kill()
            system.proc.wait()


@contextmanager
def serving() -> Iterator[Apps]:
    """Start the three apps on a fresh work folder; stop them and delete it on the way out, however it ends."""
    work = Path(tempfile.mkdtemp(prefix="tally-demo-"))
    common = control_socket_off()
    apps = Apps(
        System("question", "apps:question()", common),
        System("stock", "apps:stock()", {**common, "BENCH_STORE": "files", "BENCH_SESSION_DIR": str(work / "stock")}),
        System(
            "tally",
            "run:app",
            {
                **common,
                "TALLY_INSTANCE_PATH": str(work / "instance"),
                "TALLY_SESSION_DIR": str(work / "sessions"),
                "TALLY_SECRET_KEY": secrets.token_urlsafe(32),
                # Files only, even in a shell that exports a Redis URL.
                "TALLY_REDIS_URL": "",
            },
        ),
    )
    systems = [apps.question, apps.stock, apps.tally]
    try:
        for system in systems:
            system.env["PROMETHEUS_MULTIPROC_DIR"] = str(work / f"metrics-{system.name}")
            Path(system.env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
            system.start(WORKERS, THREADS)
        yield apps
    finally:
        stop(systems)
        shutil.rmtree(work, ignore_errors=True)


SHARED = f"{CLIENTS} clients, 1 request each"
ONE_JAR = f"1 cookie jar, {INCREMENTS} increments at once"


def global_object(system: System) -> Row:
    """The question's load on its own program: each worker's value before and after, read directly."""
    # Also waits until every worker takes requests, so that all four get a share of the load.
    before = every_worker(system)
    answers = burst(CLIENTS, lambda: get(system.url + "/"))
    return Row(SHARED, "the question's global object, `/`", CLIENTS, answers, before, every_worker(system), True)


def tally_global(system: System) -> Row:
    """The question's load on Tally's counter shared by everyone."""
    before = get(system.url + "/global").number
    answers = burst(CLIENTS, lambda: get(system.url + "/global/inc"))
    after = get(system.url + "/global").number
    assert before is not None and after is not None, "Tally's /global did not answer"
    return Row(SHARED, "Tally, `/global/inc`", CLIENTS, answers, {"counter": before}, {"counter": after}, True)


def one_jar(system: System, app: str) -> Row:
    """One client, one cookie jar, many increments at once: a fresh session reset to 0, then ``/inc``."""
    jar = http.cookiejar.CookieJar()
    # A jar per app: cookies ignore ports, and both apps call theirs "session".
    client = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar))
    if get(system.url + "/", client).status != 200 or not jar:
        raise RuntimeError(f"{app}: / did not answer with a session cookie")
    before = get(system.url + "/counter", client).number
    answers = burst(INCREMENTS, lambda: get(system.url + "/inc", client))
    after = get(system.url + "/counter", client).number
    assert before is not None and after is not None, f"{app}: /counter did not answer"
    return Row(ONE_JAR, app, INCREMENTS, answers, {"counter": before}, {"counter": after}, False, jar)


def measure(apps: Apps) -> list[Row]:
    """The two loads on each app, one app at a time."""
    return [
        global_object(apps.question),
        tally_global(apps.tally),
        one_jar(apps.stock, "stock Flask-Session, `/inc`"),
        one_jar(apps.tally, "Tally, `/inc`"),
    ]


COLUMNS = (
    "load",
    "app",
    "answered",
    "distinct numbers",
    "duplicates",
    "from separate processes",
    "from threads of one process",
    "gaps",
    "ends at",
    "lost",
)


def cells(row: Row) -> list[str]:
    """A row of the table."""
    answered = str(row.answered) if row.answered == row.sent else f"{row.answered} of {row.sent}"
    if len(row.after) > 1:
        ends = " + ".join(str(v) for v in sorted(row.after.values(), reverse=True)) + f" ({len(row.after)} workers)"
    else:
        ends = str(sum(row.after.values()))
    if not row.shared:
        return [row.load, row.app, answered, "–", "–", "–", "–", "–", ends, str(row.lost)]
    causes = row.duplicates_by_cause()
    processes, threads = (str(n) for n in causes) if causes else ("?", "?")
    counts = [row.distinct, row.duplicates]
    return [row.load, row.app, answered, *map(str, counts), processes, threads, str(row.gaps), ends, str(row.lost)]


def notes(rows: list[Row]) -> list[str]:
    """What the table shows, and why, in sentences built from the same measurements."""
    globe, tally_shared, stock, tally_jar = rows
    causes = globe.duplicates_by_cause() or (0, 0)
    workers = len(globe.after)
    answered_by = {a.pid for a in globe.answers if a.status == 200}
    if len(answered_by) > 1:
        lines = [
            f"The global object: gunicorn runs {workers} worker processes and each has its own `global_obj`. "
            f"{len(answered_by)} of them took part of the {globe.sent} requests and each counted from 1 on its own, "
            f"so the clients got {globe.distinct} distinct numbers; {causes[0]} duplicates were numbers that "
            "another process had also handed out."
        ]
    else:
        # Which worker takes a connection is up to the kernel; on a busy machine one can take them all.
        idle = [str(value) for pid, value in globe.after.items() if pid not in answered_by]
        lines = [
            f"The global object: gunicorn runs {workers} worker processes and each has its own `global_obj`. "
            f"This run one of them took all {globe.answered} answered requests (which worker takes a connection is "
            f"up to the kernel), so no process repeated another's numbers, but the other objects still stand at "
            f"{', '.join(idle) or 'nothing'}: the next clients those workers serve get numbers already handed out. "
            "Run it again to see the requests split."
        ]
    if causes[1]:
        lines.append(
            f"{causes[1]} duplicates came from two threads of one process: a thread switch landed inside "
            "`self.param += 1`, or between it and `return self.param`."
        )
    else:
        lines.append(
            "0 duplicates came from threads of one process on this run: CPython's GIL hands over to another thread "
            f"only when one waits on I/O or has run {sys.getswitchinterval() * 1000:g} ms, so a switch inside "
            "`self.param += 1`, or between it and `return self.param`, is rare, but nothing prevents it."
        )
    lines += [
        f"Tally's `/global/inc`: {tally_shared.distinct} distinct numbers for {tally_shared.sent} clients, "
        f"{tally_shared.lost} lost: one counter in the store, incremented under a file lock, for every process.",
        f"Stock Flask-Session: {stock.answered} increments answered 200, the counter ended at "
        f"{sum(stock.after.values())}: every request loads the whole session and writes it all back, so "
        f"concurrent requests with one cookie overwrite each other's increments ({stock.lost} lost).",
        f"Tally's `/inc`: {tally_jar.answered} answered, the counter ended at {sum(tally_jar.after.values())}, "
        f"{tally_jar.lost} lost: each increment is one read-modify-write under a lock on the session's own file.",
    ]
    return lines


def report(rows: list[Row]) -> str:
    """The table, with its setting above it and its explanation below."""
    lines = [
        f"Each app under `gunicorn -w {WORKERS} --threads {THREADS}` (gthread) on 127.0.0.1, files only; "
        "the requests are sent by threads, all released at once.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * 6 + "---|---:|",
        *("| " + " | ".join(cells(row)) + " |" for row in rows),
        "",
        *notes(rows),
    ]
    return "\n".join(lines)


def interrupted(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into an exit that runs the clean-up, as Ctrl-C does."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Start the three apps, put the loads to them, stop them, print the table."""
    signal.signal(signal.SIGTERM, interrupted)
    print("Starting the question's global object, stock Flask-Session and Tally ...", flush=True)
    try:
        with serving() as apps:
            rows = measure(apps)
    except KeyboardInterrupt:
        sys.exit("Interrupted; every server the demo started is stopped.")
    print(report(rows))


if __name__ == "__main__":
    main()
