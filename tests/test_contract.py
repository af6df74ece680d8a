"""The routes' contract, in each rendering, as real clients ask for it."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import CHROMIUM, CURL, REQUESTS, json_of

SCRIPTS = [pytest.param(CURL, id="curl"), pytest.param(REQUESTS, id="requests"), pytest.param("text/plain", id="text")]


@pytest.mark.parametrize("accept", SCRIPTS)
def test_text_answers_are_exactly_the_documented_texts(client: FlaskClient, accept: str) -> None:
    h = {"Accept": accept}
    assert client.get("/inc", headers=h).text == "counter is 1"
    assert client.post("/inc", headers=h).text == "counter is 2"
    assert client.get("/inc?by=40", headers=h).text == "counter is 42"
    assert client.get("/dec", headers=h).text == "counter is 41"
    assert client.post("/dec?by=-9", headers=h).text == "counter is 50"
    assert client.get("/counter", headers=h).text == "counter is 50"
    assert client.get("/", headers=h).text == "counter was reset"
    assert client.get("/counter", headers=h).text == "counter is 0"
    client.get("/inc", headers=h)
    assert client.post("/reset", headers=h).text == "counter was reset"
    assert client.post("/", headers=h).text == "counter was reset"
    assert client.get("/counter", headers=h).text == "counter is 0"
    response = client.get("/counter", headers=h)
    assert response.mimetype == "text/plain"


def test_by_is_also_read_from_a_posted_form(client: FlaskClient) -> None:
    assert client.post("/inc", data={"by": "7"}).text == "counter is 7"
    assert client.post("/dec", data={"by": "2"}).text == "counter is 5"


def test_json_answers(client: FlaskClient) -> None:
    h = {"Accept": "application/json"}
    assert client.get("/inc?by=3", headers=h).json == {"counter": 3}
    assert client.get("/dec", headers=h).json == {"counter": 2}
    assert client.get("/counter", headers=h).json == {"counter": 2}
    assert client.post("/reset", headers=h).json == {"counter": 0}
    before = json_of(client.get("/global", headers=h))["global"]
    assert client.post("/global/inc", headers=h).json == {"global": before + 1}
    assert client.get("/global", headers=h).json == {"global": before + 1}


def test_global_counter_text(client: FlaskClient) -> None:
    assert client.get("/global").text == "global counter is 0"
    assert client.get("/global/inc").text == "global counter is 1"
    assert client.post("/global/inc").text == "global counter is 2"
    assert client.get("/global").text == "global counter is 2"


def test_browser_gets_a_page_and_changes_redirect_back(client: FlaskClient) -> None:
    h = {"Accept": CHROMIUM}
    client.get("/inc?by=5")
    page = client.get("/", headers=h)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert 'id="count"' in page.text and ">5<" in page.text
    # The page's own GET changed nothing: it is not the reset that GET / is for scripts.
    assert client.get("/counter").text == "counter is 5"
    for path in ("/inc", "/dec", "/reset", "/global/inc"):
        response = client.post(path, headers=h)
        assert response.status_code == 303 and response.headers["Location"] == "/"
    assert client.get("/counter").text == "counter is 0"
    assert client.get("/counter", headers=h).mimetype == "text/html"
    assert client.get("/global", headers=h).mimetype == "text/html"


def test_page_has_forms_that_post(client: FlaskClient) -> None:
    page = client.get("/", headers={"Accept": CHROMIUM}).text
    for action in ('formaction="/inc"', 'formaction="/dec"', 'action="/reset"', 'action="/global/inc"'):
        assert action in page
    assert page.count('method="post"') == 3


@pytest.mark.parametrize(
    ("accept", "check"),
    [
        (CURL, lambda r: r.mimetype == "text/plain" and "whole number" in r.text),
        ("application/json", lambda r: r.mimetype == "application/json" and "whole number" in r.json["error"]),
        (CHROMIUM, lambda r: r.mimetype == "text/html" and "whole number" in r.text),
    ],
    ids=["text", "json", "html"],
)
def test_errors_are_rendered_the_requested_way(client: FlaskClient, accept: str, check: object) -> None:
    response = client.get("/inc?by=two", headers={"Accept": accept})
    assert response.status_code == 400
    assert check(response)  # type: ignore[operator]


@pytest.mark.parametrize("accept", [CURL, "application/json", CHROMIUM])
def test_404_and_405_are_rendered_too(client: FlaskClient, accept: str) -> None:
    missing = client.get("/nowhere", headers={"Accept": accept})
    assert missing.status_code == 404
    wrong = client.delete("/inc", headers={"Accept": accept})
    assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"]
    assert client.post("/counter").status_code == 405
    if accept == "application/json":
        assert set(json_of(missing)) == {"error"} and set(json_of(wrong)) == {"error"}


@pytest.mark.parametrize(
    "by",
    ["x", "1.5", "1e3", "", " 1", "1_000", "٣", "0x10", "9223372036854775808", "-9223372036854775809", "9" * 400],
)
def test_a_bad_step_is_a_400_and_changes_nothing(client: FlaskClient, by: str) -> None:
    client.get("/inc?by=7")
    response = client.get("/inc", query_string={"by": by})
    assert response.status_code == 400
    assert response.text
    assert client.get("/counter").text == "counter is 7"


def test_a_repeated_step_is_a_400(client: FlaskClient) -> None:
    assert client.get("/inc?by=1&by=2").status_code == 400
    assert client.get("/counter").text == "counter is 0"


def test_the_counter_stays_within_signed_64_bits(client: FlaskClient) -> None:
    top = 2**63 - 1
    assert client.get(f"/inc?by={top}").text == f"counter is {top}"
    over = client.get("/inc")
    assert over.status_code == 400 and "64-bit" in over.text
    assert client.get("/counter").text == f"counter is {top}"
    assert client.get(f"/dec?by={top}").text == "counter is 0"
    assert client.get(f"/dec?by={top}").text == f"counter is {-top}"
    assert client.get("/dec").text == f"counter is {-top - 1}"
    assert client.get("/dec").status_code == 400
    assert client.get("/counter").text == f"counter is {-top - 1}"


def test_cookie_dependent_answers_are_not_cached(client: FlaskClient) -> None:
    for path in ("/counter", "/inc", "/global", "/"):
        response = client.get(path)
        assert response.headers["Cache-Control"] == "no-store"
        assert "Cookie" in response.headers["Vary"]


def test_static_files_may_be_cached_but_errors_on_their_paths_may_not(client: FlaskClient) -> None:
    with client.get("/static/app.js") as script:
        assert script.status_code == 200 and script.headers.get("Cache-Control") != "no-store"
    # A missing file, and a body that ends before its Content-Length: rendered per Accept.
    missing = client.get("/static/nowhere.js")
    cut_short = client.get("/static/app.js", data=b"by=3", environ_overrides={"CONTENT_LENGTH": "100"})
    for response, status in ((missing, 404), (cut_short, 400)):
        assert response.status_code == status
        assert response.headers.get("Cache-Control") == "no-store" and response.headers.get("Vary") == "Cookie, Accept"


def test_the_exact_bodies_and_headers_a_script_relies_on(client: FlaskClient) -> None:
    text = client.get("/inc")
    assert text.get_data() == b"counter is 1" and text.headers["Content-Type"] == "text/plain; charset=utf-8"
    as_json = client.get("/inc", headers={"Accept": "application/json"})
    assert as_json.get_data() == b'{"counter":2}\n' and as_json.headers["Content-Type"] == "application/json"
    error = client.get("/inc?by=x", headers={"Accept": "application/json"})
    assert error.get_data().startswith(b'{"error":"') and error.get_data().endswith(b'"}\n')
    health = client.get("/healthz")
    assert health.get_data() == b'{"status":"ok","store":"files"}\n'
    for response in (text, as_json, error, health):
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Vary"] == "Cookie, Accept"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize(("by", "counted"), [("-3", -3), ("%2B3", 3), ("+3", None)])
def test_by_takes_an_optional_sign(client: FlaskClient, by: str, counted: int | None) -> None:
    # A query string reads "+" as a space, so a plus sign must be sent as %2B.
    response = client.get(f"/inc?by={by}")
    if counted is None:
        assert response.status_code == 400 and "whole number" in response.text
        assert client.get("/counter").text == "counter is 0"
    else:
        assert response.text == f"counter is {counted}"


def test_a_bad_step_says_what_is_wrong_and_every_good_one_counts(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/inc?by=1&by=2").text == "give 'by' at most once"
    assert client.get("/inc?by=x").text == "'by' must be a whole number, such as by=5 or by=-3"
    assert client.get("/inc?by=9223372036854775808").text == "'by' must fit in a signed 64-bit integer"
    assert client.get("/inc?ref=newsletter").text == "counter is 1", "a query without 'by' is a step of 1"
    lowest = app.test_client()
    assert lowest.get("/inc?by=-9223372036854775808").text == "counter is -9223372036854775808"
