"""The counters: this client's, kept in its session, and the global one."""

from __future__ import annotations

import re

from flask import current_app, session
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest

from .sessions import TallySession, TallySessionInterface
from .store import INT64_MAX, INT64_MIN, OutOfRange, Store
from .store.base import integer_field

#: ASCII digits only: int() would also take "1_000", " 7" and "٣".
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")


def parse_step(values: MultiDict[str, str]) -> int:
    """Return the ``by`` parameter (default 1), or raise a 400 that says why."""
    given = values.getlist("by")
    if not given:
        return 1
    if len(given) > 1:
        raise BadRequest("give 'by' at most once")
    if not _INTEGER.fullmatch(given[0]):
        raise BadRequest("'by' must be a whole number, such as by=5 or by=-3")
    step = int(given[0])
    if not INT64_MIN <= step <= INT64_MAX:
        raise BadRequest("'by' must fit in a signed 64-bit integer")
    return step


def _interface() -> TallySessionInterface:
    interface = current_app.session_interface
    assert isinstance(interface, TallySessionInterface)
    return interface


def _session() -> TallySession:
    current = session._get_current_object()  # type: ignore[attr-defined]
    assert isinstance(current, TallySession)
    return current


def store() -> Store:
    """Return the app's store."""
    return _interface().store


def read() -> int:
    """Return this client's counter; never writes."""
    return integer_field(_session(), "counter")


def add(step: int) -> int:
    """Atomically add ``step`` to this client's counter and return the new value."""
    try:
        return _interface().add(current_app, _session(), "counter", step)
    except OutOfRange as exc:
        raise BadRequest("the counter would leave the signed 64-bit range; it is unchanged") from exc


def reset() -> None:
    """Set this client's counter to 0, creating its session if it has none.

    Created, not skipped: a script that resets first and then increments from
    many threads with one cookie jar needs the cookie from the reset, or each
    thread's first increment would make a session of its own.
    """
    _interface().update(current_app, _session(), lambda record: record | {"counter": 0})


def read_global() -> int:
    """Return the counter shared by every client."""
    return store().read_global()


def increment_global() -> int:
    """Atomically take the next global number."""
    return store().increment_global()
