"""The counters: this client's, kept in its session, and the global one."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from typing import Concatenate, ParamSpec, TypeVar

from flask import Flask, current_app, request, session
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest

from . import faults
from .sessions import TallySession, TallySessionInterface
from .store import INT64_MAX, INT64_MIN, OutOfRange, Store
from .store.base import integer_field

#: ASCII digits only: int() would also take "1_000", " 7" and "٣".  Any
#: number of leading zeros: a number is a number.
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: The longest ``by`` read.  gunicorn's request line (4094 bytes) bounds a
#: query string, but a form body may be 16 KiB, and int() refuses strings over
#: 4300 digits with a ValueError (a 500); 4096 leaves room for any ``by`` that
#: fits in a request line.
MAX_STEP_LENGTH = 4096


def parse_step(values: MultiDict[str, str]) -> int:
    """Return the ``by`` parameter (default 1), or raise a 400 that says why."""
    given = values.getlist("by")
    if not given:
        return 1
    if len(given) > 1:
        raise BadRequest("give 'by' at most once")
    if len(given[0]) > MAX_STEP_LENGTH:
        raise BadRequest(f"'by' must be at most {MAX_STEP_LENGTH} characters long")
    if not _INTEGER.fullmatch(given[0]):
        raise BadRequest("'by' must be a whole number, such as by=5 or by=-3")
    step = int(given[0])
    if not INT64_MIN <= step <= INT64_MAX:
        raise BadRequest("'by' must fit in a signed 64-bit integer")
    return step


def requested_step() -> int:
    """Return this request's ``by`` (default 1), or raise a 400 that says why."""
    environ = request.environ
    # Most requests give no ``by``: with no query string and no body there is
    # nothing to parse, and building request.values would cost more than the rest of the view.
    if not environ.get("QUERY_STRING") and environ.get("CONTENT_LENGTH", "0") in ("", "0"):
        return 1
    return parse_step(request.values)


P = ParamSpec("P")
R = TypeVar("R")


def _uses_store(fn: Callable[Concatenate[Flask, P], R]) -> Callable[P, R]:
    """Mark a function that works on the store: its success shows that a storage fault cleared.

    The function is given the app, looked up once: each look through the
    ``current_app`` proxy costs as much as the function's own arithmetic.
    """

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        result = fn(app, *args, **kwargs)
        faults.worked(app)
        return result

    return wrapper


def _interface(app: Flask) -> TallySessionInterface:
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)
    return interface


def _session() -> TallySession:
    current = session._get_current_object()  # type: ignore[attr-defined]
    assert isinstance(current, TallySession)
    return current


def store() -> Store:
    """Return the app's store."""
    return _interface(current_app).store


@_uses_store
def read(app: Flask) -> int:
    """Return this client's counter; never writes."""
    return integer_field(_session(), "counter")


@_uses_store
def add(app: Flask, step: int) -> int:
    """Atomically add ``step`` to this client's counter and return the new value."""
    try:
        return _interface(app).add(app, _session(), "counter", step)
    except OutOfRange as exc:
        raise BadRequest("the counter would leave the signed 64-bit range; it is unchanged") from exc


@_uses_store
def reset(app: Flask) -> None:
    """Set this client's counter to 0, creating its session if it has none.

    Created, not skipped: a script that resets first and then increments from
    many threads with one cookie jar needs the cookie from the reset, or each
    thread's first increment would make a session of its own.
    """
    _interface(app).update(app, _session(), lambda record: record | {"counter": 0})


@_uses_store
def read_global(app: Flask) -> int:
    """Return the counter shared by every client."""
    return _interface(app).store.read_global()


@_uses_store
def increment_global(app: Flask) -> int:
    """Atomically take the next global number."""
    return _interface(app).store.increment_global()
