"""The routes: a fixed contract that scripted clients rely on."""

from __future__ import annotations

from flask import Blueprint, Response, request

from . import counter, render
from .security import may_change

bp = Blueprint("counter", __name__)

ANY = ["GET", "POST"]

# HEAD is answered on every route as GET would be, but never changes anything
# (may_change() says no): where GET changes a counter, HEAD validates the same
# way (a bad ``by`` is the same 400) and its headers describe the count as it
# stands.  A 405 would be truthful too, but monitors and link checkers that get
# one retry with GET, and so make the very change HEAD was chosen to avoid.


@bp.route("/", methods=ANY)
def index() -> Response:
    """Reset this client's counter; a browser's GET shows the page instead."""
    if request.method != "POST" and render.negotiate() == "html":
        return render.page()  # loading a page must not change anything
    if may_change():
        counter.reset()
    return render.reset_done()


@bp.post("/reset")
def reset() -> Response:
    """Reset this client's counter."""
    if may_change():
        counter.reset()
    return render.reset_done()


@bp.route("/inc", methods=ANY)
def inc() -> Response:
    """Add ``by`` (default 1) to this client's counter."""
    step = counter.requested_step()
    return render.counter_value(counter.add(step) if may_change() else counter.read(), changed=True)


@bp.route("/dec", methods=ANY)
def dec() -> Response:
    """Subtract ``by`` (default 1) from this client's counter."""
    step = counter.requested_step()
    return render.counter_value(counter.add(-step) if may_change() else counter.read(), changed=True)


@bp.get("/counter")
def show() -> Response:
    """Show this client's counter; never writes."""
    return render.counter_value(counter.read(), changed=False)


@bp.route("/global/inc", methods=ANY)
def global_inc() -> Response:
    """Take the next number of the counter shared by everyone."""
    return render.global_value(counter.increment_global() if may_change() else counter.read_global(), changed=True)


@bp.get("/global")
def global_show() -> Response:
    """Show the counter shared by everyone."""
    return render.global_value(counter.read_global(), changed=False)
