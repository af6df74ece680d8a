"""The fast lane answers a script's plain GET /inc or /dec exactly as Flask would, and leaves the rest to Flask.

Two apps share one session folder: one as served (with the lane), one built
without it.  Any request, given to each from the same starting state, gets the
same status, headers and body, leaves the same counter, and is counted under
the same metric labels.  The real-gunicorn guarantees (the same-cookie race for
each worker class, kill -9, a stalled Redis) send plain GETs of /inc, so they
run through the lane too.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request, request_started
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from werkzeug.test import TestResponse

from conftest import CHROMIUM, CURL, REQUESTS, counter_of
from tally import create_app, lane
from tally.sessions import TallySessionInterface
from tally.store import INT64_MAX, INT64_MIN, StorageError

_SET_SID = re.compile(r"(?<=session=)[A-Za-z0-9_-]{43}")
_EXPIRES = re.compile(r"Expires=([^;]+)")


@dataclass
class Pair:
    """The app as served, and the same app on the same store without the lane."""

    served: Flask
    flask_only: Flask


def _make(tmp_path: Path) -> Flask:
    settings = {"TESTING": True, "SESSION_DIR": str(tmp_path / "sessions"), "NEW_SESSIONS_PER_MINUTE": 0}
    return create_app(settings, instance_path=str(tmp_path / "instance"))


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pair:
    served = _make(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(lane, "init_app", lambda app: None)
        flask_only = _make(tmp_path)
    return Pair(served, flask_only)


def _session(app: Flask, start: int) -> str:
    """A stored session whose counter is ``start``, made through Flask; its id."""
    client = app.test_client()
    answer = client.post("/reset")
    if start:
        answer = client.get("/inc", query_string={"by": start})
        assert answer.text == f"counter is {start}"
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


@dataclass(frozen=True)
class Ask:
    """A request, the cookie state it starts from, and the app's TRUSTED_HOSTS."""

    method: str = "GET"
    path: str = "/inc"
    query: str = ""
    body: tuple[tuple[str, str], ...] = ()  # the test client's body arguments, as pairs
    headers: tuple[tuple[str, str], ...] = (("Accept", CURL),)
    cookie: str = "known"  # "known", "unknown", "garbage", "among others" or "none"
    host: tuple[str, list[str] | None] = ("localhost", None)  # (Host, TRUSTED_HOSTS)
    start: int = 0


#: What the lane answers is a plain request (the defaults above).  Each example
#: changes up to three of its parts, to any of these: near the line between the
#: lane and Flask, where a missed condition shows.
_OVERSIZED = "by=2&pad=" + "x" * 17_000  # over MAX_CONTENT_LENGTH (16 KiB): a 413 from Flask
_CHANGES: dict[str, list[object]] = {
    "method": ["HEAD", "POST", "PUT", "OPTIONS"],
    "path": ["/dec", "/inc/", "/counter", "/inc/x"],
    "query": ["by=3", "by=x", "by=", "other=1", "by=2&by=3"],
    "body": [
        (("data", ""),),
        (("data", "by=2"), ("content_type", "application/x-www-form-urlencoded")),
        (("data", _OVERSIZED), ("content_type", "application/x-www-form-urlencoded")),
        (("data", "x" * 20_000), ("content_type", "application/octet-stream"), ("chunked", "yes")),
    ],
    "headers": [
        (),
        *((("Accept", accept),) for accept in (REQUESTS, "text/plain", "application/json", CHROMIUM, "text/html")),
        (("Accept", "text/html;q=0.5, */*"),),
        *((("Origin", origin),) for origin in ("http://localhost", "https://evil.example", "null")),
        *((("Sec-Fetch-Site", site),) for site in ("same-origin", "cross-site", "none")),
        (("Accept", CHROMIUM), ("Sec-Fetch-Site", "cross-site")),
    ],
    "cookie": ["unknown", "garbage", "among others", "none"],
    "host": [("evil.example", None), ("evil.example", ["localhost"]), ("localhost", ["localhost", ".example"])],
}


@st.composite
def asks(draw: st.DrawFn) -> Ask:
    changed = draw(st.sets(st.sampled_from(sorted(_CHANGES)), max_size=3))
    parts = {part: draw(st.sampled_from(_CHANGES[part])) for part in sorted(changed)}
    return Ask(start=draw(st.sampled_from([0, 7, INT64_MAX, INT64_MIN])), **parts)  # type: ignore[arg-type]


def _cookie_header(ask: Ask, sid: str) -> str | None:
    return {
        "known": f"session={sid}",
        "unknown": "session=" + "u" * 43,
        "garbage": "session=../../etc/passwd",
        "among others": f"theme=dark; session={sid}; lang=en",
        "none": None,
    }[ask.cookie]


def _requests_counted() -> dict[tuple[tuple[str, str], ...], float]:
    """Every request count, by its labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in REGISTRY.collect()
        if family.name == "tally_requests"
        for sample in family.samples
        if sample.name == "tally_requests_total"
    }


@dataclass
class Seen:
    """What a client sees of one answer, the session ids and the cookie's expiry set aside."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes
    expires: float | None
    sid: str  # the session the client holds afterwards
    counted: dict[tuple[tuple[str, str], ...], float]  # what the metrics counted for it, by labels


def _ask(app: Flask, ask: Ask) -> Seen:
    sid = _session(app, ask.start)
    app.config["TRUSTED_HOSTS"] = ask.host[1]
    headers = [*ask.headers, ("Host", ask.host[0])]
    cookie = _cookie_header(ask, sid)
    if cookie is not None:
        headers.append(("Cookie", cookie))
    body: dict[str, Any] = dict(ask.body)
    if body.pop("chunked", None):  # a body of no announced length, as a chunked one reaches the app
        headers.append(("Transfer-Encoding", "chunked"))
        body["input_stream"] = io.BytesIO(body.pop("data").encode())
        body["environ_overrides"] = {"CONTENT_LENGTH": ""}  # the test client would count it
    path = ask.path + ("?" + ask.query if ask.query else "")
    client = app.test_client(use_cookies=False)
    before = _requests_counted()
    answer: TestResponse = client.open(path, method=ask.method, headers=headers, **body)
    counted = {labels: n - before.get(labels, 0.0) for labels, n in _requests_counted().items()}
    set_cookie = answer.headers.get("Set-Cookie", "")
    given = _SET_SID.search(set_cookie)
    expires = _EXPIRES.search(set_cookie)
    return Seen(
        status=answer.status,
        headers=[(name, _EXPIRES.sub("", _SET_SID.sub("<sid>", value))) for name, value in answer.headers],
        body=answer.get_data(),
        expires=parsedate_to_datetime(expires.group(1)).timestamp() if expires else None,
        sid=given.group(0) if given else sid,
        counted={labels: n for labels, n in counted.items() if n},
    )


def _counter(app: Flask, sid: str) -> str:
    return app.test_client(use_cookies=False).get("/counter", headers={"Cookie": f"session={sid}"}).text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ask=asks())
def test_any_request_is_answered_alike_with_the_lane_and_without_it(pair: Pair, ask: Ask) -> None:
    served = _ask(pair.served, ask)
    flask_only = _ask(pair.flask_only, ask)
    assert (served.status, served.headers, served.body) == (flask_only.status, flask_only.headers, flask_only.body)
    if served.expires is not None or flask_only.expires is not None:
        assert served.expires is not None and flask_only.expires is not None
        assert abs(served.expires - flask_only.expires) <= 1, "the same lifetime, from the same second or the next"
    assert _counter(pair.served, served.sid) == _counter(pair.flask_only, flask_only.sid), "the same count stored"
    assert served.counted == flask_only.counted, "counted under the same route, method and status"
    assert list(served.counted.values()) == [1]


# -- The lane answers the usual request itself, and only that ---------------


@pytest.fixture
def flask_handled(app: Flask) -> Iterator[list[str]]:
    """The paths of the requests that reached Flask's request handling."""
    reached: list[str] = []

    def note(sender: Flask, **extra: object) -> None:
        reached.append(request.path)

    with request_started.connected_to(note, app):
        yield reached


def _known(app: Flask) -> str:
    """A Cookie header with a stored session's id (counter 0)."""
    return f"session={_session(app, 0)}"


@pytest.mark.parametrize("accept", [None, CURL, REQUESTS, "text/plain"])
@pytest.mark.parametrize("path", ["/inc", "/dec"])
def test_a_scripts_plain_get_is_answered_without_flask(
    app: Flask, flask_handled: list[str], path: str, accept: str | None
) -> None:
    cookie = _known(app)
    flask_handled.clear()
    headers = {"Cookie": cookie} | ({"Accept": accept} if accept else {})
    empty = {} if accept else {"CONTENT_LENGTH": "0"}  # as a client that sends Content-Length: 0 on a GET
    client = app.test_client(use_cookies=False)
    answers = [client.get(path, headers=headers, environ_overrides=empty).text for _ in range(3)]
    step = 1 if path == "/inc" else -1
    assert answers == [f"counter is {step}", f"counter is {2 * step}", f"counter is {3 * step}"]
    assert flask_handled == []


def test_a_trusted_host_is_answered_without_flask(app: Flask, flask_handled: list[str]) -> None:
    cookie = _known(app)
    app.config["TRUSTED_HOSTS"] = ["tally.example"]
    flask_handled.clear()
    answer = app.test_client(use_cookies=False).get("/inc", headers={"Cookie": cookie, "Host": "tally.example"})
    assert answer.text == "counter is 1"
    assert flask_handled == []


@pytest.mark.parametrize(
    ("path", "headers", "why"),
    [
        ("/inc?by=1", {}, "a query"),
        ("/inc", {"Accept": CHROMIUM}, "a browser's Accept"),
        ("/inc", {"Accept": "application/json"}, "JSON"),
        ("/inc", {"Origin": "http://localhost"}, "an Origin"),
        ("/inc", {"Sec-Fetch-Site": "same-origin"}, "a fetch's metadata"),
        ("/inc", {"Cookie": "session=" + "u" * 43}, "an unknown session"),
        ("/inc", {"Cookie": ""}, "no session"),
        ("/counter", {}, "another route"),
    ],
)
def test_anything_else_goes_to_flask(
    app: Flask, flask_handled: list[str], path: str, headers: dict[str, str], why: str
) -> None:
    headers = {"Cookie": _known(app)} | headers
    flask_handled.clear()
    app.test_client(use_cookies=False).get(path, headers=headers)
    assert flask_handled == [path.partition("?")[0]], why


def test_a_head_and_a_post_go_to_flask(app: Flask, flask_handled: list[str]) -> None:
    cookie = _known(app)
    flask_handled.clear()
    client = app.test_client(use_cookies=False)
    assert client.head("/inc", headers={"Cookie": cookie}).status_code == 200
    assert client.post("/inc", headers={"Cookie": cookie}).text == "counter is 1", "HEAD changed nothing"
    assert flask_handled == ["/inc", "/inc"]


# -- A failed write: answered once, never tried again -----------------------


def _failing_store(app: Flask, monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[str]:
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)
    tried: list[str] = []

    def add(key: str, *args: object) -> int:
        tried.append(key)
        raise error

    monkeypatch.setattr(interface.store, "add", add)
    return tried


def test_a_failed_write_is_a_503_from_the_apps_own_handler_and_is_not_tried_again(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    cookie = _known(app)
    tried = _failing_store(app, monkeypatch, StorageError("timeout", "the store did not answer in time", 503))
    failures_before = REGISTRY.get_sample_value("tally_storage_errors_total", {"kind": "timeout"}) or 0.0
    client = app.test_client(use_cookies=False)
    answer = client.get("/inc", headers={"Cookie": cookie})
    assert (answer.status_code, answer.text) == (503, "the store did not answer in time")
    assert answer.headers["Retry-After"] == "5"
    assert "Set-Cookie" not in answer.headers and answer.headers["Cache-Control"] == "no-store"
    assert len(tried) == 1, "a write that may have been applied is never made again"
    assert REGISTRY.get_sample_value("tally_storage_errors_total", {"kind": "timeout"}) == failures_before + 1
    # Flask's own path (a query sends it there) gives the same answer.
    through_flask = client.get("/inc?by=1", headers={"Cookie": cookie})
    assert (through_flask.status, through_flask.text) == (answer.status, answer.text)
    assert through_flask.headers == answer.headers


def test_an_unexpected_error_in_the_write_is_a_logged_500(
    app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cookie = _known(app)
    tried = _failing_store(app, monkeypatch, RuntimeError("a bug in the store"))
    with caplog.at_level(logging.ERROR):
        answer = app.test_client(use_cookies=False).get("/inc", headers={"Cookie": cookie})
    assert (answer.status_code, answer.text) == (500, "internal error")
    assert len(tried) == 1
    assert "RuntimeError: a bug in the store" in caplog.text, "logged with its traceback"


def test_a_counter_at_its_limit_gets_flasks_400_and_stays(app: Flask) -> None:
    client = app.test_client()
    client.post("/reset")
    client.get("/inc", query_string={"by": INT64_MAX})
    answer = client.get("/inc")
    assert answer.status_code == 400 and "unchanged" in answer.text
    assert counter_of(client.get("/counter").text) == INT64_MAX
