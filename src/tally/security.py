"""Cross-site request refusal and the security headers of every response."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.exceptions import Forbidden

from . import body

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


def is_cross_site() -> bool:
    """Whether a browser says this request came from another site."""
    # Read from the WSGI environ, as request.headers would, without building the
    # header map on every request.
    environ = request.environ
    if environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
        return True
    # An Origin is foreign unless scheme, host and port all match ours exactly:
    # https://tally.example.evil, http:// for https:// and another port all are.
    # "null" (sandboxed frames, some redirects) matches nothing.
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return False
    theirs = _origin(origin)
    return theirs is None or theirs != _origin(request.host_url.rstrip("/"))


def check_request() -> None:
    """Before any view: read and check the body, then refuse a cross-site POST."""
    # One hook, not two: Flask pays for each hook it calls, on every request.
    # The body first: a malformed or cut-short one is a 400 whatever else holds.
    body.read_whole()
    refuse_cross_site()


def refuse_cross_site() -> None:
    """Refuse a POST (or other unsafe method) that a browser sent from another site."""
    # Every POST here changes a counter.  A GET that would is refused by
    # may_change() in its view, which alone knows (GET / shows a browser the page).
    if request.method not in _SAFE_METHODS and is_cross_site():
        raise CrossSiteRequest()


def may_change() -> bool:
    """Whether this request may change a counter: never a HEAD; a cross-site request is refused.

    SameSite=Lax sends the cookie with a top-level GET from another site, so a
    link there to /inc?by=1000 would otherwise count for the visitor.  Scripts
    send no Sec-Fetch-Site and no Origin, and are not a CSRF vector.
    """
    if request.method == "HEAD":
        return False  # a HEAD promises GET's answer without GET's effect
    if is_cross_site():
        raise CrossSiteRequest()
    return True


_ALWAYS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"))
# Answers depend on the cookie and on Accept: no shared cache may keep them.
_PRIVATE = (("Cache-Control", "no-store"), ("Vary", "Cookie, Accept"))


def add_headers(response: Response) -> Response:
    """Set the headers that keep answers private and uninterpreted."""
    # Plain assignments: this runs on every request, and parsing Vary back
    # into a set (response.vary) cost more than the rest of the hook.
    headers = response.headers
    for name, value in _ALWAYS:
        headers[name] = value
    if response.mimetype == "text/html":
        headers["Content-Security-Policy"] = CSP
    # Static files are the same for everyone and may be cached; an error on a
    # static path (a missing file) is rendered per Accept like any other error.
    if request.endpoint != "static" or response.status_code >= 400:
        for name, value in _PRIVATE:
            headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Register the request checks and header hooks."""
    app.before_request(check_request)
    app.after_request(add_headers)
