"""``make demo`` (bench/demo.py): its table says what it measured, and it leaves no server running.

The demo runs here on its real gunicorns.  Nothing asserts that the question's
global object fails on this run: the checks are that each printed figure is
what the answers and the servers say, recomputed here, and that Tally counts
every request, which it must on every run.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest
from flask.testing import FlaskClient

from conftest import CHROMIUM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/demo.py, imported as ``python bench/demo.py`` sees it (bench/ on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("demo")


def table(printed: str) -> dict[str, dict[str, str]]:
    """The printed table's rows, by app, as {column: cell}."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.strip("|").split(" | ")] for line in lines)
    return {row[1]: dict(zip(header, row, strict=True)) for row in rows}


def number(cell: str) -> int:
    """A cell's figure: ``100``, or the 98 of ``98 of 100``."""
    return int(cell.split()[0])


def ends(cell: str) -> list[int]:
    """The values in an ``ends at`` cell: ``53 + 25 + 14 + 8 (4 workers)`` or ``500``."""
    return [int(value) for value in cell.split("(")[0].split("+")]


def read(url: str, opener: urllib.request.OpenerDirector) -> int:
    """A counter's value as the server says it now."""
    with opener.open(url, timeout=10) as response:
        return int(response.read().decode().split()[-1])


def demo_client(jar: object) -> urllib.request.OpenerDirector:
    """A client with the demo's cookie jar for that app."""
    assert jar is not None
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPCookieProcessor(jar),  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_the_demo_prints_what_it_measured(demo: ModuleType) -> None:
    with demo.serving() as apps:
        rows = demo.measure(apps)
        printed = demo.report(rows)
        globe, tally_global, stock, tally_inc = rows
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        # What the servers hold after the loads, read here rather than taken from the demo.
        now = {
            "Tally, `/global/inc`": [read(apps.tally.url + "/global", direct)],
            "stock Flask-Session, `/inc`": [read(apps.stock.url + "/counter", demo_client(stock.jar))],
            "Tally, `/inc`": [read(apps.tally.url + "/counter", demo_client(tally_inc.jar))],
        }
        workers = set(apps.question.workers())
    assert all(app.proc.poll() is not None for app in (apps.question, apps.stock, apps.tally))
    printed_rows = table(printed)
    assert list(printed_rows) == [row.app for row in rows]

    for row in rows:
        cells = printed_rows[row.app]
        numbers = [a.number for a in row.answers if a.status == 200 and a.number is not None]
        assert len(row.answers) == row.sent
        assert number(cells["answered"]) == len(numbers)
        assert sum(ends(cells["ends at"])) - sum(row.before.values()) == len(numbers) - number(cells["lost"])
        if row.shared:
            assert number(cells["distinct numbers"]) == len(set(numbers))
            assert number(cells["distinct numbers"]) + number(cells["duplicates"]) == len(numbers)
            assert number(cells["gaps"]) == len(set(range(1, row.sent + 1)) - set(numbers))
        else:
            assert cells["distinct numbers"] == cells["duplicates"] == cells["gaps"] == "–"

    # The global object: each worker's own value, and each duplicate put down to its cause.
    cells = printed_rows[globe.app]
    assert set(globe.after) == workers
    assert sorted(ends(cells["ends at"]), reverse=True) == sorted(globe.after.values(), reverse=True)
    assert globe.before == dict.fromkeys(workers, 0)
    pids_of: defaultdict[int, list[str]] = defaultdict(list)
    highest: defaultdict[str, int] = defaultdict(int)
    for answer in globe.answers:
        if answer.status == 200 and answer.number is not None:
            pids_of[answer.number].append(answer.pid)
            highest[answer.pid] = max(highest[answer.pid], answer.number)
    separate = sum(len(set(pids)) - 1 for pids in pids_of.values())
    same = sum(len(pids) - len(set(pids)) for pids in pids_of.values())
    assert (number(cells["from separate processes"]), number(cells["from threads of one process"])) == (
        separate,
        same,
    )
    # A worker's object only grows, so no worker answered more than it ended at.
    assert all(highest[pid] <= globe.after[pid] for pid in highest)

    for app, values in now.items():
        assert ends(printed_rows[app]["ends at"]) == values

    # Tally counts every request, on every run.
    shared = printed_rows[tally_global.app]
    assert [number(shared[c]) for c in ("answered", "distinct numbers", "duplicates", "gaps", "lost")] == [
        100,
        100,
        0,
        0,
        0,
    ]
    assert sorted(tally_global.numbers) == list(range(1, 101))
    per_client = printed_rows[tally_inc.app]
    assert (number(per_client["answered"]), ends(per_client["ends at"]), number(per_client["lost"])) == (
        500,
        [500],
        0,
    )
    assert number(printed_rows[stock.app]["lost"]) == stock.answered - (now[stock.app][0] - stock.before["counter"])


def children(pid: int) -> list[int]:
    """A process's child processes."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_the_demo_stops_its_servers_and_deletes_its_files_when_told_to_stop(tmp_path: Path) -> None:
    work = tmp_path / "tmp"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(work)}  # where the demo's work folder goes
    command = [sys.executable, str(ROOT / "bench" / "demo.py")]
    # Output to a file, not a pipe: a server left behind would hold a pipe open, and hang the test.
    with (tmp_path / "output").open("wb") as output:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 30
        # Once all three apps' gunicorns have forked their workers, the demo is measuring.
        while not (len(masters := children(proc.pid)) == 3 and all(children(master) for master in masters)):
            assert proc.poll() is None and time.monotonic() < deadline, "the demo did not start its three apps"
            time.sleep(0.05)
        started = [pid for master in masters for pid in [master, *children(master)]]
        # SIGTERM to the demo alone: unlike a terminal's Ctrl-C, the gunicorns do not get it.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in started if alive(pid)]
        for pid in left:  # fail, but leave nothing running
            os.kill(pid, signal.SIGKILL)
    assert not left, (tmp_path / "output").read_text()
    assert not list(work.iterdir())


def test_the_page_links_to_the_question_answered(client: FlaskClient) -> None:
    with client.get("/", headers={"Accept": CHROMIUM}) as page:
        assert 'href="/static/question.html"' in page.get_data(as_text=True)
    with client.get("/static/question.html") as answer:
        assert answer.status_code == 200
        assert answer.mimetype == "text/html"
        assert "make demo" in answer.get_data(as_text=True)
