"""HTTP as hostile clients send it, raw over a socket to a real gunicorn.

Client libraries tidy requests up (they frame chunks, count lengths and refuse
odd methods), so these requests are written byte by byte.
"""

from __future__ import annotations

import http.client
import itertools
import socket
from dataclasses import dataclass
from email.message import Message

import pytest
import requests

from conftest import CHROMIUM, CURL, Server, ServerFactory

#: gunicorn's default limits, which gunicorn.conf.py keeps and the README documents.
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
MAX_CONTENT_LENGTH = 16 * 1024
FORM = "application/x-www-form-urlencoded"


@dataclass
class Answer:
    """A response as read off the socket."""

    status: int
    headers: Message
    text: str


def exchange(server: Server, data: bytes, method: str = "GET", shut_write: bool = False) -> Answer:
    """Send ``data`` as it is, then read one response (``shut_write``: then close our sending side)."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return Answer(response.status, response.msg, response.read().decode("utf-8", "replace"))


def message(
    method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"", cookie: str = ""
) -> bytes:
    """A request written out byte for byte: only the headers given, plus Host and Connection: close."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"Cookie: session={cookie}"] if cookie else []
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes) -> bytes:
    """``body`` as one chunk and the last chunk."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def post_chunked(payload: bytes, cookie: str, accept: str = CURL, method: str = "POST") -> bytes:
    """A chunked form POST (or ``method``) to /inc whose body is ``payload`` as it is (framing included)."""
    headers = [("Transfer-Encoding", "chunked"), ("Content-Type", FORM), ("Accept", accept)]
    return message(method, "/inc", headers, payload, cookie)


def counter(server: Server, cookie: str) -> str:
    """What a second, well-behaved client reads for ``cookie``."""
    return server.get("/counter", cookie).text


def assert_no_error_logged(server: Server) -> None:
    log = server.log.read_text()
    assert "Traceback" not in log and "[ERROR]" not in log, log


@pytest.fixture
def server(serve: ServerFactory) -> Server:
    return serve(workers=1, threads=4)


#: Chunked bodies that gunicorn cannot parse, each carrying by=3.
MALFORMED = {
    "size": b"zz\r\nby=3\r\n0\r\n\r\n",  # a chunk size that is no hex number
    "terminator": b"4\r\nby=3XX0\r\n\r\n",  # a chunk with no CRLF after it
    "extension": b"4;=\r\nby=3\r\n0\r\n\r\n",  # a malformed chunk extension
    "trailer": b"4\r\nby=3\r\n0\r\nBad Trailer\r\n\r\n",  # a trailer that is no header
}


# A GET with a body is otherwise a script's plain GET, which the fast lane answers; a body sends it to Flask.
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_malformed_chunked_body_is_a_400_and_changes_nothing(server: Server, method: str) -> None:
    cookie = server.new_client()
    for name, payload in MALFORMED.items():
        answer = exchange(server, post_chunked(payload, cookie, method=method))
        assert answer.status == 400, name
        assert "chunked" in answer.text and "nothing was changed" in answer.text, name
    assert counter(server, cookie) == "counter is 1"
    assert_no_error_logged(server)


def test_a_well_formed_chunked_body_counts(server: Server) -> None:
    cookie = server.new_client()
    assert exchange(server, post_chunked(chunked(b"by=3"), cookie)).text == "counter is 4"


def test_cookie_bytes_that_are_not_utf8_keep_the_session(server: Server) -> None:
    # A browser sends UTF-8, but the header is bytes: werkzeug's cookie parser
    # raises on others, which was a 500 before any view ran.
    cookie = server.new_client()
    for header in (f"theme=\xff\xfe; session={cookie}", "session=\x80\xff"):  # written out as latin-1 bytes
        answer = exchange(server, message("GET", "/inc", [("Accept", CURL), ("Cookie", header)]))
        assert answer.status == 200, header
    assert counter(server, cookie) == "counter is 2"  # the first kept the session; the second made a fresh one
    assert_no_error_logged(server)


def test_the_body_limit_holds_for_chunked_bodies(server: Server) -> None:
    cookie = server.new_client()
    at_limit = b"by=3&pad=" + b"x" * (MAX_CONTENT_LENGTH - 9)
    assert exchange(server, post_chunked(chunked(at_limit), cookie)).text == "counter is 4"
    for size in (MAX_CONTENT_LENGTH + 1, 40_000):
        over = b"by=3&pad=" + b"x" * (size - 9)
        answer = exchange(server, post_chunked(chunked(over), cookie))
        assert answer.status == 413 and "16384 bytes" in answer.text
        # Several chunks add up too: no one chunk is over the limit here.
        pieces = b"".join(chunked(over[i : i + 4096])[:-5] for i in range(0, len(over), 4096)) + b"0\r\n\r\n"
        assert exchange(server, post_chunked(pieces, cookie)).status == 413
    assert counter(server, cookie) == "counter is 4"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_cut_short_changes_nothing(server: Server, framing: str) -> None:
    cookie = server.new_client()
    if framing == "content-length":
        headers = [("Content-Length", "100"), ("Content-Type", FORM)]
        request = message("POST", "/inc", headers, b"by=3", cookie)
    else:
        request = post_chunked(b"a\r\nby=3", cookie)  # a 10-byte chunk of which 4 came
    answer = exchange(server, request, shut_write=True)
    assert answer.status == 400 and "nothing was changed" in answer.text
    assert counter(server, cookie) == "counter is 1"
    assert_no_error_logged(server)


def test_an_oversized_content_length_is_a_413_before_the_body_is_read(server: Server) -> None:
    cookie = server.new_client()
    body = b"by=3&pad=" + b"x" * MAX_CONTENT_LENGTH
    headers = [("Content-Length", str(len(body))), ("Content-Type", FORM)]
    answer = exchange(server, message("POST", "/inc", headers, body, cookie))
    assert answer.status == 413 and "16384 bytes" in answer.text
    assert counter(server, cookie) == "counter is 1"


# -- HEAD: answered wherever GET is, and never a change ----------------------


def test_head_is_answered_like_get_and_changes_nothing(server: Server) -> None:
    cookie = server.new_client()
    total = server.get("/global").text
    routes = ("/", "/inc?by=5", "/dec", "/global/inc", "/counter", "/global", "/healthz")
    for route in routes:
        allow = requests.options(server.url + route.split("?")[0], timeout=10).headers["Allow"]
        assert "HEAD" in allow, "Allow says HEAD is answered: it must be"
    for accept, route in itertools.product((CURL, "application/json", CHROMIUM), routes):
        response = requests.head(
            server.url + route, cookies={"session": cookie}, headers={"Accept": accept}, timeout=10
        )
        # A browser's GET of a changing route is a 303 back to the page, so is its HEAD.
        changes = route not in ("/", "/counter", "/global", "/healthz")
        assert response.status_code == (303 if changes and accept == CHROMIUM else 200), (accept, route)
        assert response.content == b"" and "Set-Cookie" not in response.headers
    assert counter(server, cookie) == "counter is 1", "HEAD / did not reset, HEAD /inc did not count"
    assert server.get("/global").text == total


def test_head_validates_like_get_and_creates_no_session(server: Server) -> None:
    stored = sorted(server.session_dir.rglob("*"))
    assert requests.head(server.url + "/inc?by=x", timeout=10).status_code == 400
    for route in ("/inc", "/global/inc", "/"):
        response = requests.head(server.url + route, timeout=10)
        assert response.status_code == 200 and "Set-Cookie" not in response.headers
    assert sorted(server.session_dir.rglob("*")) == stored
    assert requests.get(server.url + "/global", timeout=10).text == "global counter is 0"


def test_an_uptime_monitor_can_head_the_page(server: Server) -> None:
    answer = exchange(server, message("HEAD", "/"), method="HEAD")
    assert answer.status == 200 and answer.text == ""


# -- gunicorn's own limits, as the README documents them ---------------------


def padded_inc(length: int) -> str:
    """The target of a request line of exactly ``length`` bytes that adds 1 (zeros pad ``by``)."""
    fixed = len("GET /inc?by=1 HTTP/1.1")
    return "/inc?by=" + "0" * (length - fixed) + "1"


def test_a_request_line_up_to_the_limit_is_served_and_a_longer_one_is_a_414(server: Server) -> None:
    cookie = server.new_client()
    answer = exchange(server, message("GET", padded_inc(LIMIT_REQUEST_LINE), cookie=cookie))
    assert answer.status == 200 and answer.text == "counter is 2"
    for target in (padded_inc(LIMIT_REQUEST_LINE + 1), "/inc?by=" + "1" * 5000, "/" + "a" * 5000):
        assert exchange(server, message("GET", target, cookie=cookie)).status == 414
    assert counter(server, cookie) == "counter is 2"


def test_header_fields_up_to_the_limits_are_served_and_more_is_a_431(server: Server) -> None:
    cookie = server.new_client()
    # Host, Connection and Cookie are three of the fields.
    few = [(f"X-Pad-{i}", "1") for i in range(LIMIT_REQUEST_FIELDS - 3)]
    assert exchange(server, message("GET", "/inc", few, cookie=cookie)).text == "counter is 2"
    many = [*few, ("X-One-Too-Many", "1")]
    assert exchange(server, message("GET", "/inc", many, cookie=cookie)).status == 431
    cookies = [("Cookie", f"session={cookie}")] * 120
    assert exchange(server, message("GET", "/inc", cookies)).status == 431
    # A field's line, with its CRLF, is at most LIMIT_REQUEST_FIELD_SIZE bytes.
    longest = [("X-Pad", "v" * (LIMIT_REQUEST_FIELD_SIZE - len("X-Pad: \r\n")))]
    assert exchange(server, message("GET", "/inc", longest, cookie=cookie)).text == "counter is 3"
    too_long = [("X-Pad", "v" * (LIMIT_REQUEST_FIELD_SIZE + 1 - len("X-Pad: \r\n")))]
    assert exchange(server, message("GET", "/inc", too_long, cookie=cookie)).status == 431
    assert counter(server, cookie) == "counter is 3"


def test_a_method_over_20_characters_is_a_400(server: Server) -> None:
    cookie = server.new_client()
    assert exchange(server, message("A" * 20, "/inc", cookie=cookie)).status == 405  # reaches the app
    for method in ("A" * 21, "A" * 200):
        assert exchange(server, message(method, "/inc", cookie=cookie)).status == 400
    assert counter(server, cookie) == "counter is 1"


# -- Cache headers on every answer but a static file -------------------------


def private(headers: Message) -> bool:
    """Whether ``headers`` keep an answer out of shared caches and name what it varies on."""
    vary = {v.strip().lower() for v in (headers.get("Vary") or "").split(",")}
    return headers.get("Cache-Control") == "no-store" and {"cookie", "accept"} <= vary


def test_error_answers_carry_no_store_and_vary(server: Server) -> None:
    cookie = server.new_client()
    for accept in (CURL, CHROMIUM):
        errors_carry_no_store_and_vary(server, cookie, accept)
    assert counter(server, cookie) == "counter is 1"


def errors_carry_no_store_and_vary(server: Server, cookie: str, accept: str) -> None:
    big = b"by=3&pad=" + b"x" * 40_000
    form = [("Content-Type", FORM), ("Accept", accept)]
    requests_ = {
        400: [
            message("GET", "/inc?by=x", [("Accept", accept)], cookie=cookie),
            post_chunked(b"zz\r\nby=3\r\n0\r\n\r\n", cookie, accept),
        ],
        403: [message("GET", "/inc?by=1000", [("Sec-Fetch-Site", "cross-site"), ("Accept", accept)], cookie=cookie)],
        404: [
            message("GET", "/nowhere", [("Accept", accept)]),
            message("GET", "/static/nowhere.js", [("Accept", accept)]),
        ],
        405: [message("PUT", "/inc", [("Accept", accept)]), message("POST", "/static/app.js", [("Accept", accept)])],
        413: [
            message("POST", "/inc", [*form, ("Content-Length", str(len(big)))], big, cookie),
            post_chunked(chunked(big), cookie, accept),
        ],
    }
    for status, sent in requests_.items():
        for data in sent:
            answer = exchange(server, data)
            assert answer.status == status
            assert private(answer.headers), (status, data[:40], dict(answer.headers))
    cut_short = message("POST", "/inc", [*form, ("Content-Length", "100")], b"by=3", cookie)
    answer = exchange(server, cut_short, shut_write=True)
    assert answer.status == 400 and private(answer.headers)


def test_static_files_may_be_cached(server: Server) -> None:
    answer = exchange(server, message("GET", "/static/app.js"))
    assert answer.status == 200 and not private(answer.headers)
    assert answer.headers.get("Cache-Control") != "no-store"
