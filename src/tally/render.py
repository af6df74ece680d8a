"""Every answer's rendering, chosen from the Accept header in one place."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Literal

from flask import Flask, Response, jsonify, make_response, redirect, render_template, request, url_for
from werkzeug.datastructures import MIMEAccept
from werkzeug.exceptions import HTTPException, SecurityError
from werkzeug.http import parse_accept_header

from . import counter
from .faults import report
from .security import CrossSiteRequest
from .store import StorageError

log = logging.getLogger(__name__)

Kind = Literal["text", "json", "html"]
_KINDS: dict[str, Kind] = {"text/plain": "text", "application/json": "json", "text/html": "html"}
#: How long a client should wait before retrying after a storage failure.
RETRY_AFTER_SECONDS = 5
#: The Content-Type of every plain-text answer.
TEXT_TYPE = "text/plain; charset=utf-8"


def negotiate() -> Kind:
    """Pick text, JSON or HTML for this request.

    On a tie the earlier offer wins, so ``*/*`` (curl, requests) and a missing
    header get plain text, while a browser, which asks for text/html by name
    and for everything else at q<=0.9, gets HTML.
    """
    return kind_for(request.environ.get("HTTP_ACCEPT", ""))


@lru_cache(maxsize=256)
def kind_for(accept: str) -> Kind:
    """Pick text, JSON or HTML for an Accept header (see :func:`negotiate`)."""
    # Clients send a handful of distinct headers, and parsing one was a tenth
    # of a request's own time; the cache is bounded, so varied headers cost
    # only the parse.
    best = parse_accept_header(accept, MIMEAccept).best_match(list(_KINDS), default="text/plain")
    return _KINDS[best or "text/plain"]


def _answer(text: str, data: dict[str, Any], changed: bool) -> Response:
    kind = negotiate()
    if kind == "json":
        return jsonify(data)
    if kind == "html":
        # After a change, send the browser back to the page (POST/redirect/GET),
        # so a reload does not repeat the change.
        return make_response(redirect(url_for("counter.index"), 303)) if changed else page()
    return _text(text)


def _text(text: str, status: int = 200) -> Response:
    return Response(text, status, content_type=TEXT_TYPE)


def counter_text(value: int) -> str:
    """This client's counter, as a plain-text answer says it."""
    return f"counter is {value}"


def counter_value(value: int, changed: bool) -> Response:
    """Answer with this client's counter."""
    return _answer(counter_text(value), {"counter": value}, changed)


def reset_done() -> Response:
    """Answer a reset."""
    return _answer("counter was reset", {"counter": 0}, changed=True)


def global_value(value: int, changed: bool) -> Response:
    """Answer with the global counter."""
    return _answer(f"global counter is {value}", {"global": value}, changed)


def page() -> Response:
    """The HTML page: this client's count and the global one."""
    return make_response(render_template("index.html", count=counter.read(), total=counter.read_global()))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Render an error the way this request wants its answers."""
    kind = negotiate()
    if kind == "html" and isinstance(request.routing_exception, SecurityError):
        # A Host that TRUSTED_HOSTS refuses leaves the request no URL adapter,
        # so the page's links (url_for) cannot be built: the answer is text.
        kind = "text"
    if kind == "json":
        response = jsonify(error=message)
        response.status_code = status
    elif kind == "html":
        response = make_response(render_template("error.html", status=status, message=message), status)
    else:
        response = _text(message, status)
    response.headers.update(headers or {})
    return response


def _http_error(exc: HTTPException) -> Response | HTTPException:
    if exc.code is None or exc.code < 400:
        return exc  # routing redirects are answers, not errors
    # Keep headers such as Allow (405) that werkzeug computed.
    headers = {k: v for k, v in exc.get_headers() if k != "Content-Type"}
    return error(exc.code, exc.description or exc.name, headers)


#: What each route that changes a counter does, as the refusal page's button says it.
_BUTTONS = {
    "counter.index": "Reset your counter to 0",
    "counter.reset": "Reset your counter to 0",
    "counter.inc": "Add {by} to your counter",
    "counter.dec": "Subtract {by} from your counter",
    "counter.global_inc": "Take the next number of everyone's counter",
}


def _cross_site(exc: CrossSiteRequest) -> Response:
    # A browser is shown the action it was sent to do, as a button on our own
    # page: pressing it is a same-site POST, the visitor's own choice.
    endpoint = request.endpoint or ""
    if negotiate() != "html" or endpoint not in _BUTTONS:
        return error(403, exc.description or exc.name)
    given = request.values.getlist("by")
    by = given[0] if len(given) == 1 else None
    label = _BUTTONS[endpoint].format(by=by or 1)
    page = render_template("cross_site.html", action=url_for(endpoint), by=by, label=label)
    return make_response(page, 403)


def _storage_error(exc: StorageError) -> Response:
    report(exc)
    return error(exc.status, exc.message, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return error(500, "internal error")


def init_app(app: Flask) -> None:
    """Render every error through :func:`error`; a browser refused as cross-site also gets a button."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(CrossSiteRequest, _cross_site)
    app.register_error_handler(StorageError, _storage_error)
    app.register_error_handler(Exception, _unexpected)
