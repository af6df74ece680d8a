"""No lost update, against a real gunicorn with several workers and threads.

Flask's test client runs one request at a time, so these go over HTTP.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ServerFactory, burst_across, counter_of, session_files_in


def test_concurrent_increments_with_one_cookie_are_all_counted(serve: ServerFactory) -> None:
    server = serve(workers=4, threads=4)
    cookie = server.new_client()
    outcome = server.burst("/inc", 500, cookie, threads=48)
    assert outcome.statuses == [200] * 500
    assert sorted(outcome.values) == list(range(2, 502)), "each increment saw its own, distinct value"
    assert server.get("/counter", cookie).text == "counter is 501"


def test_reads_during_increments_never_undo_them(serve: ServerFactory) -> None:
    server = serve(workers=4, threads=4)
    cookie = server.new_client()
    paths = ["/inc", "/counter", "/dec?by=-2", "/counter"] * 100  # +300 in all
    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(lambda p: server.get(p, cookie), paths))
    assert {a.status_code for a in answers} == {200}
    assert server.get("/counter", cookie).text == "counter is 301"


def test_100_concurrent_clients_each_get_a_unique_global_number(serve: ServerFactory) -> None:
    server = serve(workers=4, threads=4)
    start = counter_of(server.get("/global").text)
    outcome = server.burst("/global/inc", 100, threads=100)
    assert sorted(outcome.values) == list(range(start + 1, start + 101))
    assert server.get("/global").text == f"global counter is {start + 100}"


def test_two_servers_on_one_folder_share_counters(serve: ServerFactory) -> None:
    first, second = serve(workers=2, threads=4), serve(workers=2, threads=4)
    cookie = first.new_client()
    assert sorted(burst_across([first, second], "/inc", 150, cookie)) == list(range(2, 302))
    assert second.get("/counter", cookie).text == "counter is 301"


def test_kill_9_of_a_worker_under_load_loses_no_acknowledged_update(serve: ServerFactory) -> None:
    server = serve(workers=4, threads=4)
    cookie = server.new_client()
    stop = threading.Event()
    acked: list[int] = []
    cut_off = 0
    lock = threading.Lock()

    def hammer() -> None:
        nonlocal cut_off
        while not stop.is_set():
            try:
                response = server.get("/inc", cookie)
            except Exception:
                with lock:
                    cut_off += 1
                continue
            if response.status_code == 200:
                with lock:
                    acked.append(counter_of(response.text))

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        # Kill until some request was really cut off mid-flight (bounded).
        for kills in range(1, 21):
            time.sleep(0.3)
            os.kill(server.workers()[0], signal.SIGKILL)
            if kills >= 3 and cut_off:
                break
    finally:
        time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join()

    assert len(acked) > 100 and cut_off > 0, "the kills must land while requests are in flight"
    assert len(set(acked)) == len(acked)
    began = time.monotonic()
    final = counter_of(server.get("/counter", cookie).text)
    assert 1 + len(acked) <= final <= 1 + len(acked) + cut_off
    # No lock was left behind: an update goes through at once.
    assert server.get("/inc", cookie).text == f"counter is {final + 1}"
    assert time.monotonic() - began < 2


def test_a_lock_held_by_a_killed_process_is_released(serve: ServerFactory) -> None:
    server = serve(workers=2, threads=2)
    cookie = server.new_client()
    [path] = session_files_in(server.session_dir)
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print(1, flush=True); time.sleep(600)"
    )
    with subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == b"1\n"
        with open(path, "r+") as f, pytest.raises(BlockingIOError):  # the lock is really held
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
    began = time.monotonic()
    assert server.get("/inc", cookie).text == "counter is 2"
    assert time.monotonic() - began < 1


def test_reset_then_concurrent_increments_from_one_cookie_jar_end_at_exactly_n(serve: ServerFactory) -> None:
    # The original question's script: reset first, then increment from many threads with one jar.
    server = serve(workers=4, threads=4)
    with requests.Session() as jar:
        assert jar.post(server.url + "/reset", timeout=30).text == "counter was reset"
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: jar.get(server.url + "/inc", timeout=30).text, range(200)))
        assert sorted(counter_of(a) for a in answers) == list(range(1, 201))
        assert jar.get(server.url + "/counter", timeout=30).text == "counter is 200"
