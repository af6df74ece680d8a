"""Per-client sessions: isolation, cookies, reads that never write, nothing evicted."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from flask import Flask, jsonify, session
from flask.testing import FlaskClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from werkzeug.http import parse_cookie, parse_date
from werkzeug.wrappers import Response

from conftest import CHROMIUM, session_files_in
from tally import counter, create_app, sessions
from tally.store.files import RecordFileCache


def session_files(app: Flask) -> list[Path]:
    return session_files_in(app.config["SESSION_DIR"])


def test_two_clients_have_their_own_counters(app: Flask) -> None:
    alice, bob = app.test_client(), app.test_client()
    alice.get("/inc?by=10")
    bob.get("/dec?by=3")
    alice.get("/inc")
    assert alice.get("/counter").text == "counter is 11"
    assert bob.get("/counter").text == "counter is -3"
    bob.get("/")
    assert alice.get("/counter").text == "counter is 11"


def test_the_cookie_is_httponly_lax_and_expires(client: FlaskClient) -> None:
    response = client.get("/inc")
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert cookie.http_only and cookie.same_site == "Lax" and not cookie.secure
    assert cookie.expires is not None
    assert len(cookie.value) == 43
    sent = SimpleCookie(response.headers["Set-Cookie"])["session"]
    assert (sent["path"], sent["domain"]) == ("/", ""), "the whole site, this host only"


def test_the_cookie_follows_flasks_cookie_settings(tmp_path: Path) -> None:
    app = create_app(
        {"SESSION_DIR": str(tmp_path / "s"), "SESSION_COOKIE_NAME": "tally", "SESSION_COOKIE_DOMAIN": "tally.example",
         "SESSION_COOKIE_PATH": "/counters"},
        instance_path=str(tmp_path),
    )  # fmt: skip
    response = app.test_client().get("/inc", base_url="http://tally.example")
    sent = SimpleCookie(response.headers["Set-Cookie"])["tally"]
    assert (sent["domain"], sent["path"]) == ("tally.example", "/counters")


def test_one_interface_sends_each_app_its_own_cookie_within_the_same_second(tmp_path: Path) -> None:
    # The interface keeps no app: it serves whichever app calls it, and its
    # cookie header, made once a second, must be that app's.
    first = create_app({"SESSION_DIR": str(tmp_path / "s")}, instance_path=str(tmp_path))
    second = create_app(
        {"SESSION_DIR": str(tmp_path / "s"), "SESSION_COOKIE_NAME": "other"}, instance_path=str(tmp_path)
    )
    second.session_interface = first.session_interface
    for _ in range(3):  # three tries: the second may turn between the two requests
        start = int(time.time())
        names = [SimpleCookie(a.test_client().get("/inc").headers["Set-Cookie"]).keys() for a in (first, second)]
        if int(time.time()) == start:
            break
    assert [list(n) for n in names] == [["session"], ["other"]]


@pytest.fixture
def local_time_far_from_utc() -> Iterator[None]:
    """The process's local time zone ten hours behind UTC, for one test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "HST+10")
        time.tzset()
        yield
    time.tzset()


@pytest.mark.usefixtures("local_time_far_from_utc")
def test_each_write_renews_the_cookie_for_the_lifetime_and_a_read_sends_none(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cookie expires with the session: the lifetime from each write, whatever
    # the server's local time zone.  The cookie's clock is ours, to let a second
    # pass between the writes (its expiry is in whole seconds) without waiting.
    clock = int(time.time()) + 0.5
    monkeypatch.setattr(sessions, "time", SimpleNamespace(time=lambda: clock))
    first = client.get("/inc").headers["Set-Cookie"]
    assert "Set-Cookie" not in client.get("/counter").headers
    clock += 1
    second = client.get("/inc").headers["Set-Cookie"]
    assert first.split(";")[0] == second.split(";")[0], "the same session"
    expires = [parse_date(SimpleCookie(header)["session"]["expires"]) for header in (first, second)]
    written = [datetime.fromtimestamp(int(at), UTC) for at in (clock - 1, clock)]
    assert expires == [at + app.permanent_session_lifetime for at in written]


def test_secure_cookie_is_configurable(tmp_path: Path) -> None:
    app = create_app({"SESSION_COOKIE_SECURE": True, "SESSION_DIR": str(tmp_path)}, instance_path=str(tmp_path))
    client = app.test_client()
    response = client.get("/inc", base_url="https://localhost")
    assert "Secure" in response.headers["Set-Cookie"]


def test_a_read_leaves_the_stored_session_untouched(app: Flask, client: FlaskClient) -> None:
    client.get("/inc?by=4")
    [path] = session_files(app)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    os.utime(path, ns=(1, 1))  # any write would move the mtime
    for _ in range(3):
        assert client.get("/counter").text == "counter is 4"
        assert client.get("/", headers={"Accept": CHROMIUM}).status_code == 200
        assert client.get("/global").status_code == 200
    assert path.read_bytes() == before[0]
    assert path.stat().st_mtime_ns == 1
    assert "Set-Cookie" not in client.get("/counter").headers


def test_reading_the_global_counter_leaves_its_file_untouched(app: Flask, client: FlaskClient) -> None:
    client.get("/global/inc")
    path = Path(app.config["SESSION_DIR"]) / "global"
    before = path.read_bytes()
    os.utime(path, ns=(1, 1))  # any write would move the mtime
    for _ in range(3):
        assert client.get("/global").text == "global counter is 1"
        assert client.get("/", headers={"Accept": CHROMIUM}).status_code == 200  # the page shows it too
    assert path.read_bytes() == before and path.stat().st_mtime_ns == 1


def test_a_read_with_no_session_stores_nothing(app: Flask, client: FlaskClient) -> None:
    assert client.get("/counter").text == "counter is 0"
    assert client.get("/global").text == "global counter is 0"
    assert session_files(app) == []
    assert client.get_cookie("session") is None


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/"), ("POST", "/reset")])
def test_a_reset_creates_the_session_it_reports(app: Flask, client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    assert response.text == "counter was reset" and "Set-Cookie" in response.headers
    assert len(session_files(app)) == 1
    assert client.get("/inc").text == "counter is 1", "the next increment counts in the same session"
    assert len(session_files(app)) == 1


def test_thousands_of_sessions_are_all_kept(app: Flask) -> None:
    clients = [app.test_client() for _ in range(3000)]
    for n, c in enumerate(clients):
        c.get(f"/inc?by={n}")
    assert len(session_files(app)) == 3000
    for n, c in enumerate(clients):
        assert c.get("/counter").text == f"counter is {n}"


def test_an_unknown_or_garbage_cookie_starts_a_fresh_session(app: Flask, client: FlaskClient) -> None:
    for value in ("A" * 43, "../../etc/passwd", "x" * 4000, "é"):
        client.set_cookie("session", value)
        response = client.get("/inc")
        assert response.text == "counter is 1"
        assert client.get_cookie("session").value != value  # type: ignore[union-attr]
        client.delete_cookie("session")


@pytest.mark.parametrize(
    "header",
    [
        "session={}", "theme=dark; session={}", "session={}; theme=dark", 'session="{}"', "session={}; session=other",
        "theme=\xff\xfe; session={}",  # bytes that are not UTF-8, as a WSGI server hands them on
    ],
)  # fmt: skip
def test_the_session_cookie_is_found_among_others_and_quoted(app: Flask, header: str) -> None:
    sid = app.test_client().get("/inc?by=7").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    # Without a cookie jar: the test client's own would replace the header.
    response = app.test_client(use_cookies=False).get("/inc", headers={"Cookie": header.format(sid)})
    assert response.text == "counter is 8" and sid in response.headers["Set-Cookie"]


#: Cookie names near the session's, and values near an id (42 to 44 of its characters).
_NAMES = st.sampled_from(["session", "tally", "sessio", "sessionx", " session"])
_SID_TEXT = st.text(st.sampled_from("AZaz09_-"), min_size=42, max_size=44)
#: What a WSGI server hands on: the header's bytes, each as one character.
_LATIN1 = st.text(st.characters(max_codepoint=255), max_size=50)


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(["session", "tally"]),
    parts=st.lists(
        st.tuples(
            st.one_of(_NAMES, st.text(st.characters(max_codepoint=255), max_size=8)),
            st.sampled_from(["=", "", " = ", "=="]),
            st.one_of(_SID_TEXT, _LATIN1),
            st.booleans(),
        ),
        max_size=3,
    ),
    joiner=st.sampled_from(["; ", ";", ", ", " "]),
)
# A name run into an id-like value, with no "=": no cookie of that name, for werkzeug.
@example(name="session", parts=[("session", "", "A" * 44, False)], joiner="; ")
def test_a_cookie_header_is_read_as_werkzeug_reads_it(
    name: str, parts: list[tuple[str, str, str, bool]], joiner: str
) -> None:
    # The usual header is read without werkzeug's parser: every header must
    # still give the value werkzeug would, so that no client's session is lost.
    header = joiner.join(f'{k}{eq}"{v}"' if quoted else f"{k}{eq}{v}" for k, eq, v, quoted in parts)
    try:
        expected = parse_cookie(header).get(name, "")
    except UnicodeDecodeError:  # not UTF-8: werkzeug gives up; read as if each other byte were "?"
        expected = parse_cookie("".join(c if c < "\x80" else "?" for c in header)).get(name, "")
    assert sessions._cookie_value(header, name) == expected


def test_session_files_are_private_and_hold_no_pickle(app: Flask, client: FlaskClient) -> None:
    client.get("/inc?by=3")
    folder = Path(app.config["SESSION_DIR"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [path] = session_files(app)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert b'"counter":3' in raw
    assert b"\x80\x04" not in raw and b"\x80\x05" not in raw  # pickle protocol headers


def test_sessions_are_stored_under_the_configured_key_prefix(tmp_path: Path) -> None:
    app = create_app({"SESSION_DIR": str(tmp_path / "s"), "SESSION_KEY_PREFIX": "tally:"}, instance_path=str(tmp_path))
    client = app.test_client()
    assert client.get("/inc").text == "counter is 1"
    cookie = client.get_cookie("session")
    assert cookie is not None
    [path] = session_files(app)
    assert path.name == hashlib.sha256(f"tally:{cookie.value}".encode()).hexdigest()


def test_the_store_folder_is_created_when_missing(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "er" / "sessions"
    app = create_app({"SESSION_DIR": str(folder), "SECRET_KEY": "k"}, instance_path=str(tmp_path))
    assert app.test_client().get("/inc").text == "counter is 1"
    assert folder.is_dir()


@pytest.mark.parametrize("backend", ["files", "redis"])
def test_keys_a_view_sets_are_merged_without_undoing_a_concurrent_increment(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    # Stock Flask-Session writes back the whole session it loaded, which would
    # undo the increment that lands while the view runs.  Tally stores only the
    # view's own changes, set and removed keys alike, in one atomic merge, with
    # the session's lifetime, and under an id of its own.
    settings: dict[str, object] = {"SECRET_KEY": "k", "SESSION_DIR": str(tmp_path / "sessions")}
    if backend == "redis":
        settings["REDIS_URL"] = request.getfixturevalue("redis_url")
        settings["REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    app = create_app(settings, instance_path=str(tmp_path / "instance"))
    client, concurrent = app.test_client(), app.test_client()

    @app.post("/note")
    def note() -> str:
        session["note"] = "kept until /prefs removes it"
        return "noted"

    @app.post("/prefs")
    def prefs() -> str:
        assert session["counter"] == 1, "the view has loaded the session"
        assert concurrent.get("/inc").text == "counter is 2"  # the same cookie, while this view runs
        session["theme"] = "dark"
        del session["note"]
        return "saved"

    @app.post("/forget")
    def forget() -> str:
        del session["theme"]
        return "forgotten"

    @app.get("/keys")
    def keys() -> Response:
        return jsonify(dict(session))

    assert client.get("/inc").text == "counter is 1"
    cookie = client.get_cookie("session")
    assert cookie is not None
    concurrent.set_cookie("session", cookie.value)
    assert client.post("/note").text == "noted"
    assert client.get("/keys").json == {"counter": 1, "note": "kept until /prefs removes it"}
    assert client.post("/prefs").text == "saved"
    assert client.get("/keys").json == {"counter": 2, "theme": "dark"}
    assert client.post("/forget").text == "forgotten"
    assert client.get("/keys").json == {"counter": 2}
    assert client.get_cookie("session").value == cookie.value  # type: ignore[union-attr]

    # The merge wrote the session with its lifetime: it expires, and not sooner.
    lifetime = app.permanent_session_lifetime.total_seconds()
    if backend == "redis":
        direct = redis.Redis.from_url(str(settings["REDIS_URL"]))
        [key] = direct.keys(f"{settings['REDIS_PREFIX']}session:*")
        left = direct.pttl(key) / 1000
        direct.close()
    else:
        [path] = session_files(app)
        slot = RecordFileCache.read_slot(str(path))
        assert slot is not None
        left = slot.expires - time.time()
    assert lifetime - 30 < left <= lifetime

    # A first request that only sets a key makes the session.
    newcomer = app.test_client()
    assert newcomer.post("/note").text == "noted"
    assert newcomer.get_cookie("session") is not None
    assert newcomer.get("/keys").json == {"note": "kept until /prefs removes it"}


def test_a_view_that_loads_then_writes_never_adopts_a_made_up_id(app: Flask) -> None:
    @app.post("/note")
    def note() -> str:
        session["note"] = "set after the load"
        return "noted"

    chosen = "x" * 43
    client = app.test_client()
    client.set_cookie("session", chosen)
    assert client.post("/note").text == "noted"
    given = client.get_cookie("session")
    assert given is not None and given.value != chosen, "the client gets a fresh id of ours"


def _app_on(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Flask:
    """An app on files or on the suite's Redis, with a view that shows the whole session."""
    settings: dict[str, object] = {"SECRET_KEY": "k", "SESSION_DIR": str(tmp_path / "sessions")}
    if backend == "redis":
        settings["REDIS_URL"] = request.getfixturevalue("redis_url")
        settings["REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    app = create_app(settings, instance_path=str(tmp_path / "instance"))

    @app.get("/keys")
    def keys() -> Response:
        return jsonify(dict(session))

    return app


def test_keyword_updates_of_the_session_are_stored(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = _app_on("files", tmp_path, request)

    @app.post("/prefs")
    def prefs() -> str:
        session.update({"lang": "en"}, theme="dark")
        return "saved"

    client = app.test_client()
    assert client.post("/prefs").text == "saved"
    assert client.get("/keys").json == {"lang": "en", "theme": "dark"}


def _stored_sessions(app: Flask) -> int:
    if app.config.get("REDIS_URL"):
        direct = redis.Redis.from_url(app.config["REDIS_URL"])
        found = len(direct.keys(app.config["REDIS_PREFIX"] + "session:*"))
        direct.close()
        return found
    return len(session_files(app))


@pytest.mark.parametrize("backend", ["files", "redis"])
def test_a_view_that_counts_then_sets_keys_under_a_made_up_id_makes_one_fresh_session(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    # Two writes in one request (the count, then the merge of the keys set) go to
    # one fresh id: the first write replaces the unknown id, the second finds it
    # stored.  The values round-trip as JSON, nested ones included.
    app = _app_on(backend, tmp_path, request)
    prefs = {"theme": "dark", "sizes": [1, 2], "seen": {"help": True}}

    @app.post("/count-and-note")
    def count_and_note() -> Response:
        value = counter.add(1)
        session["prefs"] = prefs
        return jsonify(value=value, session=dict(session))

    chosen = "x" * 43
    client = app.test_client()
    client.set_cookie("session", chosen)
    response = client.post("/count-and-note")
    assert response.json == {"value": 1, "session": {"counter": 1, "prefs": prefs}}
    given = client.get_cookie("session")
    assert given is not None and given.value != chosen, "the client gets a fresh id of ours"
    assert client.get("/keys").json == {"counter": 1, "prefs": prefs}
    assert _stored_sessions(app) == 1, "one session, not one per write"


@pytest.mark.parametrize("backend", ["files", "redis"])
def test_a_session_removed_while_a_view_runs_is_never_stored_again_under_its_id(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    # It expired, or was removed, between the view's load and its write: the id is
    # no longer one the store holds, so the view's change goes to a fresh one.
    app = _app_on(backend, tmp_path, request)
    store = app.session_interface.store  # type: ignore[attr-defined]

    @app.post("/note")
    def note() -> str:
        assert session["counter"] == 1, "loaded while still stored"
        store.delete("session:" + session.sid)  # type: ignore[attr-defined]
        session["note"] = "set after the removal"
        return "noted"

    client = app.test_client()
    assert client.get("/inc").text == "counter is 1"
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert client.post("/note").text == "noted"
    given = client.get_cookie("session")
    assert given is not None and given.value != cookie.value, "a fresh id, not the removed one"
    assert store.load("session:" + cookie.value) is None
    assert client.get("/keys").json == {"note": "set after the removal"}
    assert _stored_sessions(app) == 1
