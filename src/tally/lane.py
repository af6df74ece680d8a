"""The fast lane: a script's plain ``GET /inc`` or ``GET /dec``, answered without Flask's request handling.

Flask's handling of a request (its contexts, routing, hooks, a Response object
and werkzeug's writing of it) costs about what the counter's own atomic write
costs, and through Flask the two add up: however little Tally's view and
session did, it stayed near 0.7 of Flask with no session at all
(``docs/benchmarks.md``, runs 8 to 13).  So the request that nearly every
script sends, with its session's cookie and nothing else, is answered here:

* the same atomic write (:meth:`TallySessionInterface.add_to_stored`), the
  same ``Set-Cookie`` (:meth:`TallySessionInterface.cookie_header`), and the
  text and its type from :mod:`tally.render`;
* inside the metrics and security-header wrappers, so every answer is counted
  and given its headers by the one code that does so for Flask's answers;
* a write that raised is answered by the app's own error handlers, in a
  request context made for it; it is never handed to Flask to try again, since
  a write that timed out may have been applied.

Every other request falls through to Flask untouched: another path or method
(HEAD promises no change), a query string (``by``, parsed in one place), a
body, an Accept that does not pick text, an ``Origin`` or ``Sec-Fetch-Site``
(browsers: the cross-site checks), a Host that ``TRUSTED_HOSTS`` refuses, and
a cookie with no stored session (a new session is the quota's to allow).  After
the write the lane hands a request on only when the store wrote nothing: no
session under the id, or a counter that would leave its range.

``tests/test_lane.py`` checks that the two paths answer alike, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask
from werkzeug.exceptions import SecurityError
from werkzeug.wsgi import get_host

from . import faults, metrics, render
from .sessions import TallySessionInterface
from .store import OutOfRange

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: The routes the lane answers, and the step of each.
STEPS = {"/inc": 1, "/dec": -1}


def is_plain(environ: WSGIEnvironment) -> bool:
    """Whether a request to one of :data:`STEPS` is one Flask would answer with the plain counter."""
    return (
        environ.get("REQUEST_METHOD") == "GET"
        and not environ.get("QUERY_STRING")
        and environ.get("CONTENT_LENGTH", "") in ("", "0")
        and "HTTP_TRANSFER_ENCODING" not in environ
        and "HTTP_ORIGIN" not in environ
        and "HTTP_SEC_FETCH_SITE" not in environ
        and render.kind_for(environ.get("HTTP_ACCEPT", "")) == "text"
    )


def _host_trusted(app: Flask, environ: WSGIEnvironment) -> bool:
    trusted = app.config["TRUSTED_HOSTS"]
    if not trusted:
        return True  # Flask checks nothing then
    try:
        get_host(environ, trusted)
    except SecurityError:
        return False
    return True


def _failed(app: Flask, exc: Exception, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answer a write that raised as Flask would have: through the app's error handlers."""
    # Called inside the except clause, so that a handler that logs the
    # exception (an unexpected one is logged with its traceback) sees it.
    with app.request_context(environ):
        response = app.finalize_request(app.handle_user_exception(exc), from_error_handler=True)
        return response(environ, start_response)


def _lane(app: Flask, wsgi_app: WSGIApplication) -> WSGIApplication:
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)

    def lane(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        step = STEPS.get(path)
        if step is None or not is_plain(environ) or not _host_trusted(app, environ):
            return wsgi_app(environ, start_response)
        sid = interface.cookie_sid(app, environ)
        if sid is None:
            return wsgi_app(environ, start_response)
        try:
            value = interface.add_to_stored(app, sid, "counter", step)
        except OutOfRange:
            value = None  # the counter would leave its range: Flask answers the 400
        except Exception as exc:
            return _failed(app, exc, environ, start_response)
        if value is None:  # nothing written, so Flask may answer it afresh
            return wsgi_app(environ, start_response)
        faults.worked(app)
        body = render.counter_text(value).encode()
        environ[metrics.ROUTE] = path
        start_response(
            "200 OK",
            [
                ("Content-Type", render.TEXT_TYPE),
                ("Content-Length", str(len(body))),
                ("Set-Cookie", interface.cookie_header(app, sid)),
            ],
        )
        return [body]

    return lane


def init_app(app: Flask) -> None:
    """Put the lane in front of Flask; call it before the metrics and headers wrap the app."""
    app.wsgi_app = _lane(app, app.wsgi_app)  # type: ignore[method-assign,assignment]
