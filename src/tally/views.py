"""The routes: a fixed contract that scripted clients rely on."""

from __future__ import annotations

from flask import Blueprint, Response, request
from werkzeug.exceptions import MethodNotAllowed

from . import counter, render

bp = Blueprint("counter", __name__)

ANY = ["GET", "POST"]
#: Routes whose GET changes something.  Flask answers HEAD wherever it
#: answers GET, but a HEAD must never change anything.
_CHANGING_ON_GET = {"counter.index", "counter.inc", "counter.dec", "counter.global_inc"}


@bp.before_app_request
def refuse_changing_head() -> None:
    """Answer 405 to a HEAD that would change a counter."""
    if request.method == "HEAD" and request.endpoint in _CHANGING_ON_GET:
        raise MethodNotAllowed(ANY, "HEAD would change the counter; use GET or POST")


@bp.route("/", methods=ANY)
def index() -> Response:
    """Reset this client's counter; a browser's GET shows the page instead."""
    if request.method == "GET" and render.negotiate() == "html":
        return render.page()  # loading a page must not change anything
    counter.reset()
    return render.reset_done()


@bp.post("/reset")
def reset() -> Response:
    """Reset this client's counter."""
    counter.reset()
    return render.reset_done()


@bp.route("/inc", methods=ANY)
def inc() -> Response:
    """Add ``by`` (default 1) to this client's counter."""
    return render.counter_value(counter.add(counter.parse_step(request.values)), changed=True)


@bp.route("/dec", methods=ANY)
def dec() -> Response:
    """Subtract ``by`` (default 1) from this client's counter."""
    return render.counter_value(counter.add(-counter.parse_step(request.values)), changed=True)


@bp.get("/counter")
def show() -> Response:
    """Show this client's counter; never writes."""
    return render.counter_value(counter.read(), changed=False)


@bp.route("/global/inc", methods=ANY)
def global_inc() -> Response:
    """Take the next number of the counter shared by everyone."""
    return render.global_value(counter.increment_global(), changed=True)


@bp.get("/global")
def global_show() -> Response:
    """Show the counter shared by everyone."""
    return render.global_value(counter.read_global(), changed=False)
