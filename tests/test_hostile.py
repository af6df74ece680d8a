"""Hostile input: a clear 4xx or a fresh session, never a 5xx, never a change."""

from __future__ import annotations

import random
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from flask import Flask, Response
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHROMIUM, ServerFactory, json_of
from tally import create_app

LATIN1 = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=300)
ROUTES = ["/", "/inc", "/dec", "/reset", "/counter", "/global", "/global/inc"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Flask, FlaskClient]:
    """One app for all examples, with a bystander whose count must never move."""
    folder = tmp_path_factory.mktemp("hostile")
    app = create_app({"SESSION_DIR": str(folder / "s"), "SECRET_KEY": "k"}, instance_path=str(folder))
    bystander = app.test_client()
    assert bystander.get("/inc?by=42").text == "counter is 42"
    return app, bystander


def assert_untouched(bystander: FlaskClient) -> None:
    assert bystander.get("/counter").text == "counter is 42"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(by=st.one_of(LATIN1, st.integers().map(str), st.floats().map(str)), route=st.sampled_from(["/inc", "/dec"]))
def test_any_step_is_a_count_or_a_clear_400(shared: tuple[Flask, FlaskClient], by: str, route: str) -> None:
    app, bystander = shared
    client = app.test_client()
    response = client.get(route, query_string={"by": by})
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert response.text.strip()
        assert client.get("/counter").text == "counter is 0"
    assert_untouched(bystander)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cookie=LATIN1, route=st.sampled_from(ROUTES), repeat=st.booleans())
def test_any_cookie_is_a_session_or_a_fresh_one(
    shared: tuple[Flask, FlaskClient], cookie: str, route: str, repeat: bool
) -> None:
    app, bystander = shared
    header = f"session={cookie}; session={cookie}" if repeat else f"session={cookie}"
    # Without a cookie jar: the test client would otherwise replace the header with its own (empty) one.
    response = app.test_client(use_cookies=False).post(route, headers={"Cookie": header})
    assert response.status_code < 500
    assert_untouched(bystander)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), max_size=80), method=st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
))  # fmt: skip
def test_any_path_and_method_is_answered_below_500(shared: tuple[Flask, FlaskClient], path: str, method: str) -> None:
    app, bystander = shared
    # Percent-encoded: a raw "//x" would be read as a host by the test client itself.
    response = app.test_client().open("/" + quote(path.lstrip("/"), safe="/%?&="), method=method)
    assert response.status_code < 500
    assert_untouched(bystander)


@pytest.mark.parametrize("route", ["/", "/inc", "/dec", "/global/inc"])
def test_head_is_answered_and_never_changes_anything(client: FlaskClient, route: str) -> None:
    client.get("/inc?by=2")
    before = client.get("/global").text
    for accept in ("*/*", "application/json", CHROMIUM):
        response = client.head(route, headers={"Accept": accept})
        assert response.status_code in (200, 303) and response.data == b""
    assert client.get("/counter").text == "counter is 2"
    assert client.get("/global").text == before
    assert client.head("/counter").status_code == 200


@pytest.mark.parametrize(
    ("by", "counted"),
    [("00000000000000000000005", 5), ("-0007", -7), ("+000", 0), ("0" * 4095 + "9", 9), ("0" * 4096, 0)],
)
def test_leading_zeros_are_a_number(client: FlaskClient, by: str, counted: int) -> None:
    assert client.post("/inc", data={"by": by}).text == f"counter is {counted}"


@pytest.mark.parametrize(
    ("by", "says"),
    [
        ("0" * 4096 + "5", "at most 4096 characters"),
        ("0" * 16_000, "at most 4096 characters"),  # fits the 16 KiB body; int() alone would raise
        ("000" + str(2**63), "signed 64-bit"),
        ("0x10", "whole number"),
    ],
)
def test_a_step_too_long_or_out_of_range_is_a_clear_400(client: FlaskClient, by: str, says: str) -> None:
    response = client.post("/inc", data={"by": by})
    assert response.status_code == 400 and says in response.text
    assert client.get("/counter").text == "counter is 0"


def test_an_oversized_body_is_a_413(client: FlaskClient) -> None:
    response = client.post("/inc", data={"by": "1", "pad": "x" * 100_000})
    assert response.status_code == 413
    assert client.get("/counter").text == "counter is 0"


@pytest.mark.parametrize("route", ["/inc", "/dec", "/reset", "/", "/global/inc"])
def test_a_cross_site_post_is_refused(client: FlaskClient, route: str) -> None:
    client.get("/inc?by=3")
    before = client.get("/global").text
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        response = client.post(route, headers=headers)
        assert response.status_code == 403 and "cross-site" in response.text
    assert client.get("/counter").text == "counter is 3"
    assert client.get("/global").text == before
    assert (
        client.post("/inc", headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}).status_code == 200
    )


#: Tally as the tests' browser would reach it; other sites are what a browser calls foreign.
TALLY = "https://tally.example"
FOREIGN = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://tally.example.evil"},
    {"Origin": "http://tally.example"},  # another scheme
    {"Origin": "http://tally.example:443"},  # another scheme alone: the same host and port
    {"Origin": "https://tally.example:8443"},  # another port
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Origin": "https://tally.example/inc"},  # no origin at all
    {"Origin": "https://tally.example?by=1"},  # nor this
]
#: What scripts and same-site browsers send: they keep working.
OWN = [
    {},
    {"Origin": TALLY},
    {"Origin": "https://tally.example:443"},
    {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "none"},  # typed into the address bar, or a bookmark
]
#: Every kind of request that changes a counter, and its answer when allowed (from a count of 3).
CHANGES = [
    ("GET", "/inc?by=1000", "counter is 1003"),
    ("GET", "/dec?by=1000", "counter is -997"),
    ("GET", "/", "counter was reset"),
    ("GET", "/global/inc", None),
    ("POST", "/inc?by=1000", "counter is 1003"),
    ("POST", "/dec?by=1000", "counter is -997"),
    ("POST", "/", "counter was reset"),
    ("POST", "/reset", "counter was reset"),
    ("POST", "/global/inc", None),
]


@pytest.mark.parametrize(("method", "route", "_"), CHANGES)
def test_a_cross_site_change_is_refused_whatever_its_method(
    client: FlaskClient, method: str, route: str, _: str | None
) -> None:
    client.get("/inc?by=3", base_url=TALLY)
    before = client.get("/global").text
    for headers in FOREIGN:
        for accept in ("*/*", "application/json", CHROMIUM):
            response = client.open(route, method=method, base_url=TALLY, headers={**headers, "Accept": accept})
            # A browser's GET / is the page, which changes nothing (see the test below).
            page = (method, route, accept) == ("GET", "/", CHROMIUM)
            assert response.status_code == (200 if page else 403), (headers, accept)
            if accept == "application/json":
                assert "cross-site" in json_of(response)["error"]
    assert client.get("/counter", base_url=TALLY).text == "counter is 3"
    assert client.get("/global").text == before


@pytest.mark.parametrize(("method", "route", "answer"), CHANGES)
def test_scripts_and_same_site_requests_still_change(app: Flask, method: str, route: str, answer: str | None) -> None:
    for headers in OWN:
        client = app.test_client()
        client.get("/inc?by=3", base_url=TALLY)
        response = client.open(route, method=method, base_url=TALLY, headers=headers)
        assert response.status_code == 200, headers
        if answer:
            assert response.text == answer


def test_a_link_from_another_site_to_the_page_shows_it(client: FlaskClient) -> None:
    client.get("/inc?by=3")
    response = client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Accept": CHROMIUM})
    assert response.status_code == 200 and 'id="count"' in response.text
    assert client.get("/counter").text == "counter is 3"


def test_a_refused_browser_is_offered_the_change_as_a_button(client: FlaskClient) -> None:
    cross_site = {"Sec-Fetch-Site": "cross-site", "Accept": CHROMIUM}
    response = client.get("/dec?by=1000", headers=cross_site)
    assert response.status_code == 403 and response.mimetype == "text/html"
    page = response.text
    assert "another site" in page and "Subtract 1000 from your counter" in page
    assert '<form method="post" action="/dec">' in page and 'name="by" value="1000"' in page
    response = client.get("/global/inc", headers=cross_site)
    assert 'action="/global/inc"' in response.text and 'name="by"' not in response.text
    # A value the page would echo is escaped like any other.
    response = client.post("/inc", data={"by": '"><script>'}, headers=cross_site)
    assert response.status_code == 403 and "<script>" not in response.text


def test_html_answers_carry_a_strict_policy(client: FlaskClient) -> None:
    for response in (
        client.get("/", headers={"Accept": CHROMIUM}),
        client.get("/nowhere", headers={"Accept": CHROMIUM}),
    ):
        assert response.mimetype == "text/html"
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "<script>" not in response.text and "style=" not in response.text  # nothing inline
    response = client.get("/counter")
    assert response.headers["Cache-Control"] == "no-store" and "Cookie" in response.headers["Vary"]


def test_a_view_cannot_weaken_the_headers_by_setting_its_own(app: Flask) -> None:
    careless = {"cache-control": "public, max-age=86400", "VARY": "Accept-Encoding", "x-content-type-options": "no",
                "X-Their-Own": "kept"}  # fmt: skip
    app.add_url_rule("/careless", "careless", lambda: ("cached?", careless))
    app.add_url_rule("/bare-html", "bare_html", lambda: Response("<p>hi</p>", content_type="text/html"))
    client = app.test_client()
    response = client.get("/careless")
    assert response.status_code == 200 and response.text == "cached?"
    assert response.headers.getlist("Cache-Control") == ["no-store"]
    assert response.headers.getlist("Vary") == ["Cookie, Accept"]
    assert response.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert response.headers["X-Their-Own"] == "kept"
    assert "script-src 'self'" in client.get("/bare-html").headers["Content-Security-Policy"], "HTML with no charset"


def test_a_fuzz_loop_of_10000_requests_never_gets_a_5xx(serve: ServerFactory, tmp_path: Path) -> None:
    server = serve(workers=4, threads=4)
    bystander = server.new_client()
    rng = random.Random(1234)
    junk = string.printable + "éü€\x00\x7f"

    def request(i: int) -> int:
        r = random.Random(i)
        method = r.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"])
        path = r.choice([*ROUTES, "/static/app.js", "/../../etc/passwd", "/%2e%2e/", "/" + "a" * r.randint(1, 3000)])
        params = {"by": r.choice(["1", "-1", "x", "1e9", "9" * r.randint(1, 50), "", "٣", "0.5"])}
        if r.random() < 0.2:
            params = [("by", "1"), ("by", "2")]  # type: ignore[assignment]
        cookie = r.choice(["", "A" * 43, "".join(r.choice(junk[:94]) for _ in range(r.randint(0, 200))), "../x"])
        headers = {"Cookie": f"session={cookie}", "Accept": r.choice(["*/*", CHROMIUM, "application/json", "x/y"])}
        if r.random() < 0.1:
            headers["Origin"] = "https://evil.example"
        if r.random() < 0.02:
            headers["X-Huge"] = "h" * 10_000
        data = "x" * r.choice([0, 10, 20_000]) if method != "GET" else None
        try:
            response = server.http().request(
                method, server.url + path, params=params, headers=headers, data=data, timeout=30, allow_redirects=False
            )
        except requests.ConnectionError:
            return 0  # gunicorn may close on an oversized request line or header
        return response.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(request, (rng.randrange(2**32) for _ in range(10_000))))
    assert len(statuses) == 10_000
    assert not [s for s in statuses if s >= 500], "no 5xx"
    assert {200, 303, 400, 403, 404, 405} <= set(statuses)
    assert server.get("/counter", bystander).text == "counter is 1"


def test_a_500_carries_no_store_and_vary(app: Flask) -> None:
    @app.get("/broken")
    def broken() -> str:
        raise RuntimeError("a bug")

    for accept in ("*/*", CHROMIUM):
        response = app.test_client().get("/broken", headers={"Accept": accept})
        assert response.status_code == 500
        assert response.headers["Cache-Control"] == "no-store"
        assert {"Cookie", "Accept"} <= {v.strip() for v in response.headers["Vary"].split(",")}


@pytest.mark.parametrize("accept", ["*/*", CHROMIUM, "application/json"])
def test_a_host_that_trusted_hosts_refuses_is_a_400_for_a_browser_too(tmp_path: Path, accept: str) -> None:
    # Flask's own setting: its refusal leaves no URL adapter, and a page built links with one (a 500).
    app = create_app({"TRUSTED_HOSTS": ["tally.example"], "SESSION_DIR": str(tmp_path / "s")}, str(tmp_path))
    client = app.test_client()
    refused = client.get("/inc", headers={"Host": "evil.example", "Accept": accept})
    assert refused.status_code == 400 and "evil.example" in refused.text and "Set-Cookie" not in refused.headers
    # A cross-site POST is judged against our host, which is the refused one.
    cross_site = {"Host": "evil.example", "Accept": accept, "Origin": "https://evil.example"}
    assert client.post("/inc", headers=cross_site).status_code == 400
    assert client.post("/inc", headers=cross_site | {"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get("/inc", headers={"Host": "tally.example", "Accept": "*/*"}).text == "counter is 1"


def test_behind_a_proxy_the_origin_check_uses_the_forwarded_scheme_and_host(tmp_path: Path) -> None:
    proxied = create_app({"SECRET_KEY": "k", "PROXY_COUNT": 1}, instance_path=str(tmp_path / "a"))
    direct = create_app({"SECRET_KEY": "k"}, instance_path=str(tmp_path / "b"))
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "tally.example", "X-Forwarded-For": "203.0.113.9"}
    same_site = {"Origin": "https://tally.example", **forwarded}
    assert proxied.test_client().post("/inc", headers=same_site).status_code == 200
    assert direct.test_client().post("/inc", headers=same_site).status_code == 403, "no proxy trusted: foreign"
    for origin in ("http://tally.example", "https://tally.example:8443", "https://tally.example.evil"):
        response = proxied.test_client().post("/inc", headers={**forwarded, "Origin": origin})
        assert response.status_code == 403, origin


def test_behind_two_proxies_scheme_host_and_address_are_each_taken_two_hops_back(tmp_path: Path) -> None:
    # client -> TLS proxy (tally.example) -> internal proxy -> Tally.  Each proxy appends
    # what it saw, after whatever the client sent itself.  With TALLY_PROXY_COUNT=2 the
    # scheme, host and client address are each the second value from the right.
    app = create_app(
        {"SECRET_KEY": "k", "PROXY_COUNT": 2, "METRICS_ALLOW": ["203.0.113.9/32"]}, instance_path=str(tmp_path)
    )
    forwarded = {
        "X-Forwarded-Proto": "http, https, http",
        "X-Forwarded-Host": "spoofed.example, tally.example, tls-proxy.internal:8080",
        "X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.0.0.2",
    }
    client = app.test_client()
    assert client.post("/inc", headers={**forwarded, "Origin": "https://tally.example"}).text == "counter is 1"
    for origin in ("http://tls-proxy.internal:8080", "https://spoofed.example", "http://tally.example"):
        assert client.post("/inc", headers={**forwarded, "Origin": origin}).status_code == 403, origin
    assert client.get("/metrics", headers=forwarded).status_code == 200, "the client's address is 203.0.113.9"
    spoofed = {**forwarded, "X-Forwarded-For": "203.0.113.9, 198.51.100.1, 10.0.0.2"}
    assert client.get("/metrics", headers=spoofed).status_code == 403, "what the client wrote itself is not trusted"
