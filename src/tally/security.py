"""Cross-site request refusal and the security headers of every response."""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.exceptions import Forbidden

#: No inline script or style: the page's script and CSS are files of ours.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def refuse_cross_site() -> None:
    """Refuse a state-changing request that a browser sent from another site."""
    if request.method in _SAFE_METHODS:
        return
    # Scripts (curl, requests) send no Origin and are not a CSRF vector;
    # SameSite=Lax already keeps the cookie off most cross-site POSTs, and
    # this closes the rest (same-site subdomains, older browsers).
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        raise Forbidden("cross-site requests are refused")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise Forbidden("cross-site requests are refused")


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
    if request.endpoint != "static":
        for name, value in _PRIVATE:
            headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Register the request checks and header hooks."""
    app.before_request(refuse_cross_site)
    app.after_request(add_headers)
