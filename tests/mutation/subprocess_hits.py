"""A pytest plugin for ``make mutants``: which tests run against each mutant.

While mutmut records which functions each test calls, the processes a test
starts (gunicorn and its workers) write their calls to files (see
``sitecustomize.py`` here).  Before mutmut files a test's calls, this adds the
lines written since the previous test, so that a test that reaches a
function only through gunicorn is run against that function's mutants.

Then, when the recording ends, each function keeps the fastest of its tests
up to :data:`BUDGET` seconds, timed whole (setup and teardown included), and
any of :data:`GUARANTEES` that reach it and guard its module.
Nearly every test goes through the session and store code, and mutmut runs
every test it has for a function against each mutant that survives: without
a budget, each surviving mutant of a hot function would cost minutes.
mutmut runs the fastest first and stops at the first failure, so the budget
only cuts the slow tail of a function's tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mutmut.mutation.trampoline import get_mutant_under_test
from mutmut.state import state

#: Seconds of a function's fastest tests that run against each of its mutants.
BUDGET = 3.0
#: Slower tests that run against every mutant they reach in the modules named,
#: because they alone check a guarantee that only real processes, real threads
#: or a stalled server can break.  Scoped to the store behind the promise: the
#: gunicorn tests reach every function of a request, and a surviving mutant of
#: the security headers would otherwise run them all.
GUARANTEES = {
    # flock across gunicorn workers: no increment of one cookie is lost (its
    # plain GETs go through the fast lane).
    "tests/test_concurrency.py::test_concurrent_increments_with_one_cookie_are_all_counted": (
        "tally.store.files", "tally.store.group", "tally.store.base", "tally.sessions", "tally.lane",
    ),
    # Reads never write: a slow read cannot undo a concurrent increment.
    "tests/test_concurrency.py::test_reads_during_increments_never_undo_them": (
        "tally.store.files", "tally.store.group", "tally.store.base", "tally.sessions", "tally.lane",
    ),
    # A batch of one process's updates answers as the same updates one at a time
    # would (about 1 s of hypothesis examples).
    "tests/test_group_commit.py::test_a_batch_answers_and_stores_what_the_same_updates_one_at_a_time_would": (
        "tally.store.files", "tally.store.group",
    ),
    # The fast lane answers as Flask would (about 3 s of hypothesis examples),
    # and a GET with a malformed chunked body is Flask's, under gunicorn.
    "tests/test_lane.py::test_any_request_is_answered_alike_with_the_lane_and_without_it": ("tally.lane",),
    "tests/test_raw_http.py::test_a_malformed_chunked_body_is_a_400_and_changes_nothing[GET]": ("tally.lane",),
    # The cookie read as werkzeug reads it (about 1 s of hypothesis examples):
    # since the lane, faster tests fill _cookie_value's budget first.
    "tests/test_sessions.py::test_a_cookie_header_is_read_as_werkzeug_reads_it": ("tally.sessions",),
    # The Redis deadline: a write that a stalled Redis runs late does nothing.
    "tests/test_redis.py::test_a_hung_redis_gets_503_in_bounded_time_and_counts_resume_exactly": ("tally.store.redis",),
    # The three below, each 1 to 1.6 s, fell beyond the budget, and mutants that
    # break these promises survived.  (That the deadline is tight is checked fast,
    # without a stall: test_the_deadline_is_half_the_timeout_ahead_...)
    # REDIS_REPLICAS: a write that too few replicas confirm is a 503, never a 200.
    "tests/test_redis.py::test_with_replicas_required_and_none_following_writes_answer_503_not_200": (
        "tally.store.redis", "tally.store.base",
    ),
    # REDIS_REPLICAS, the other way: a write the replica confirms is a 200 (0.6 s;
    # the budget left it out, and WAIT misspelt or 1 replica thought too few survived).
    "tests/test_redis.py::test_with_a_replica_following_writes_are_acknowledged": ("tally.store.redis",),
    # No retries, and timeouts on reads: a timed-out write is sent once, and a read
    # of a hung Redis is a 503 within one timeout.
    "tests/test_redis.py::test_a_timed_out_write_is_sent_once_and_answered_within_the_timeout": (
        "tally.store.redis", "tally.store.redis_connect",
    ),
    "tests/test_redis.py::test_reads_and_writes_on_a_hung_redis_answer_503_within_the_timeout[/global]": (
        "tally.store.redis", "tally.store.redis_connect",
    ),
    # Waiting awake (each 0.5 to 2 s, beyond the budget of functions that every Redis test
    # reaches): the only checks that a late Redis stops being polled, and that nothing polls
    # under gevent.  Left out, 15 mutants of ReplyWait and GroupCommit.run survived.
    "tests/test_redis.py::test_a_redis_whose_replies_come_late_stops_being_waited_for_awake": (
        "tally.store.redis_connect", "tally.store.awake",
    ),
    "tests/test_redis.py::test_under_gevent_a_reply_is_never_waited_for_awake[gevent]": (
        "tally.store.redis_connect", "tally.store.awake",
    ),
    "tests/test_group_commit.py::test_under_gevent_a_queued_update_never_waits_awake[gevent]": (
        "tally.store.group", "tally.store.awake",
    ),
    # Pipelines under gevent (each about 1 s, a gevent subprocess): the only checks that a
    # worker's concurrent commands share a connection with each its own replies, and what
    # the commands queued behind a failed batch get.
    "tests/test_redis.py::test_under_gevent_concurrent_commands_share_one_connection_each_with_its_own_replies": (
        "tally.store.redis", "tally.store.group", "tally.store.awake",
    ),
    "tests/test_redis.py::test_under_gevent_concurrent_commands_for_two_redis_servers_each_go_to_their_own": (
        "tally.store.redis", "tally.store.group",
    ),
    "tests/test_redis.py::test_under_gevent_commands_queued_behind_a_hung_redis_fail_at_once_unsent": (
        "tally.store.redis", "tally.store.group",
    ),
    "tests/test_redis.py::test_under_gevent_commands_queued_behind_a_cut_connection_go_on_down_a_new_one": (
        "tally.store.redis", "tally.store.group",
    ),
    "tests/test_redis.py::test_under_gevent_concurrent_writes_wait_for_replicas_together": (
        "tally.store.redis", "tally.store.group",
    ),
}  # fmt: skip

#: How far each hit file has been read, so that every test gets only its own lines.
_read_up_to: dict[Path, int] = {}


def _new_hits(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in sorted(folder.glob("*.txt")):
        with path.open("rb") as f:
            f.seek(_read_up_to.get(path, 0))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        _read_up_to[path] = _read_up_to.get(path, 0) + len(complete)
        names.update(complete.decode().split())
    return names


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Add the subprocesses' calls to the test's own, before mutmut files them under the test."""
    folder = os.environ.get("TALLY_MUTANTS_HITS")
    if folder and get_mutant_under_test() == "stats" and Path(folder).is_dir():
        state()._stats.update(_new_hits(Path(folder)))


#: Each test's whole time, setup and teardown included: a test that starts
#: gunicorn or a TLS Cluster costs that with every mutant it runs against,
#: while mutmut itself times the test's call alone.
_whole_time: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add up each phase of each test."""
    if get_mutant_under_test() == "stats":
        _whole_time[report.nodeid] = _whole_time.get(report.nodeid, 0.0) + report.duration


def _guards(test: str, function: str) -> bool:
    return any(function.startswith(module + ".") for module in GUARANTEES.get(test, ()))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Trim each function's tests to the budget, keeping the guarantees' tests."""
    if get_mutant_under_test() != "stats":
        return
    durations = state().duration_by_test
    # mutmut orders, budgets and times out each mutant's tests by these.
    durations.update((test, seconds) for test, seconds in _whole_time.items() if test in durations)
    for function, tests in state().tests_by_mangled_function_name.items():
        guarantees = {test for test in tests if _guards(test, function)}
        kept: set[str] = set()
        spent = 0.0
        for test in sorted(tests - guarantees, key=lambda t: durations.get(t, 0.0)):
            spent += durations.get(test, 0.0)
            if spent > BUDGET and kept:
                break
            kept.add(test)
        tests.intersection_update(kept | guarantees)
