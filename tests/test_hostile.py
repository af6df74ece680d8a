"""Hostile input: a clear 4xx or a fresh session, never a 5xx, never a change."""

from __future__ import annotations

import random
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHROMIUM, ServerFactory
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
    response = app.test_client().post(route, headers={"Cookie": header})
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
def test_head_never_changes_anything(client: FlaskClient, route: str) -> None:
    client.get("/inc?by=2")
    before = client.get("/global").text
    for accept in ("*/*", CHROMIUM):
        assert client.head(route, headers={"Accept": accept}).status_code == 405
    assert client.get("/counter").text == "counter is 2"
    assert client.get("/global").text == before
    assert client.head("/counter").status_code == 200


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
