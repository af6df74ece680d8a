"""Cross-site request refusal and the security headers of every response."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import Flask, Request, request
from werkzeug.exceptions import Forbidden

from . import body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: No inline script or style: the page's script and CSS are files of ours.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CrossSiteRequest(Forbidden):
    """A request from another site that would change a counter; render.py offers it as a button."""

    description = "cross-site requests that would change a counter are refused; nothing was changed"


def _origin(url: str) -> tuple[str, str, int] | None:
    """Return the (scheme, host, port) of an origin such as ``https://example.org``, or None if it is none."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is no number, or out of range
        return None
    if not parts.hostname or port is None or parts.path or parts.query or parts.fragment:
        return None
    return parts.scheme, parts.hostname, port


def is_cross_site(req: Request) -> bool:
    """Whether a browser says request ``req`` came from another site."""
    # Read from the WSGI environ, as request.headers would, without building the
    # header map on every request.
    environ = req.environ
    if environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
        return True
    # An Origin is foreign unless scheme, host and port all match ours exactly:
    # https://tally.example.evil, http:// for https:// and another port all are.
    # "null" (sandboxed frames, some redirects) matches nothing.
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return False
    theirs = _origin(origin)
    return theirs is None or theirs != _origin(req.host_url.rstrip("/"))


def check_request() -> None:
    """Before any view: read and check the body, then refuse a cross-site POST."""
    # One hook, not two: Flask pays for each hook it calls, on every request.
    # The body first: a malformed or cut-short one is a 400 whatever else holds.
    # The request itself, not the proxy, which would look it up on every use.
    req = request._get_current_object()  # type: ignore[attr-defined]
    body.read_whole(req)
    refuse_cross_site(req)


def refuse_cross_site(req: Request) -> None:
    """Refuse a POST (or other unsafe method) that a browser sent from another site."""
    # Every POST here changes a counter.  A GET that would is refused by
    # may_change() in its view, which alone knows (GET / shows a browser the page).
    if req.method not in _SAFE_METHODS and is_cross_site(req):
        raise CrossSiteRequest()


def may_change() -> bool:
    """Whether this request may change a counter: never a HEAD; a cross-site request is refused.

    SameSite=Lax sends the cookie with a top-level GET from another site, so a
    link there to /inc?by=1000 would otherwise count for the visitor.  Scripts
    send no Sec-Fetch-Site and no Origin, and are not a CSRF vector.
    """
    req = request._get_current_object()  # type: ignore[attr-defined]
    if req.method == "HEAD":
        return False  # a HEAD promises GET's answer without GET's effect
    if is_cross_site(req):
        raise CrossSiteRequest()
    return True


_ALWAYS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"))
_CSP = (("Content-Security-Policy", CSP),)
# Answers depend on the cookie and on Accept: no shared cache may keep them.
_PRIVATE = (("Cache-Control", "no-store"), ("Vary", "Cookie, Accept"))
_OURS = frozenset(name.lower() for name, _ in _ALWAYS + _CSP + _PRIVATE)
#: What is added, by (is the answer HTML, is it private).
_ADDED = {
    (html, private): list(_ALWAYS + (_CSP if html else ()) + (_PRIVATE if private else ()))
    for html in (False, True)
    for private in (False, True)
}


def with_headers(headers: list[tuple[str, str]], status: str, static: bool) -> list[tuple[str, str]]:
    """Return ``headers`` with ours in place of any of the same names."""
    kept = []
    html = False
    for name, value in headers:
        lower = name.lower()
        if lower in _OURS:
            continue
        if lower == "content-type":
            html = value.partition(";")[0].strip().lower() == "text/html"
        kept.append((name, value))
    # Static files are the same for everyone and may be cached; an error on a
    # static path (a missing file) is rendered per Accept like any other error.
    kept += _ADDED[html, not static or int(status[:3]) >= 400]
    return kept


def _headers_added(wsgi_app: WSGIApplication, static_prefix: str) -> WSGIApplication:
    """Wrap the app to add the headers to every answer as it starts."""

    # Added to the WSGI list as the answer starts, not to the Response in an
    # after_request hook: werkzeug checks and copies each header it holds, and
    # Flask's call of a hook cost more than the headers themselves.  This also
    # covers every answer, including those no hook sees.
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Flask serves static files from one rule, <static_url_path>/<filename>.
        static = environ.get("PATH_INFO", "").startswith(static_prefix)

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            return start_response(status, with_headers(headers, status, static), exc_info)

        return wsgi_app(environ, respond)

    return app


def init_app(app: Flask) -> None:
    """Register the request checks, and add the headers to every answer."""
    app.before_request(check_request)
    app.wsgi_app = _headers_added(app.wsgi_app, f"{app.static_url_path}/")  # type: ignore[method-assign,assignment]
