"""Storage faults: one warning when a fault starts and one when it clears, not one per request."""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, current_app

from .metrics import storage_failed
from .store import StorageError

log = logging.getLogger(__name__)

#: A fault clears once this many seconds pass with no failure of its kind;
#: a failure within them is the same fault, not a new one.
QUIET_SECONDS = 60.0


class FaultLog:
    """Logs a storage fault when it starts, and when it clears.

    A full disk fails new sessions while existing ones still write in place,
    so failures and successes interleave.  A fault therefore clears only when
    an operation succeeds after a quiet spell with no failure of its kind; a
    failure after that is logged as a new fault.  ``/healthz`` and the
    metrics show the rest.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: kind -> (first failure of this fault, last failure, failures counted)
        self._open: dict[str, tuple[float, float, int]] = {}

    def failed(self, exc: StorageError) -> None:
        """Note a failed storage operation; log it if it starts a fault."""
        storage_failed(exc)
        now = time.monotonic()
        with self._lock:
            first, last, count = self._open.get(exc.kind, (now, now, 0))
            if now - last > QUIET_SECONDS:  # quiet, with no success seen since: a new fault
                first, count = now, 0
            self._open[exc.kind] = (first, now, count + 1)
        if count == 0:
            log.warning("storage fault (%s): %s; answering %d until it clears", exc.kind, exc.message, exc.status)

    def succeeded(self) -> None:
        """Note a storage operation that worked; log the faults it shows to have cleared."""
        if not self._open:  # the usual case: nothing to look at, no lock to take
            return
        now = time.monotonic()
        with self._lock:
            cleared = {k: v for k, v in self._open.items() if now - v[1] > QUIET_SECONDS}
            for kind in cleared:
                del self._open[kind]
        for kind, (first, last, count) in cleared.items():
            log.warning(
                "storage fault (%s) cleared: %d operations failed over %.0f s; none since %.0f s ago",
                kind, count, last - first, now - last,
            )  # fmt: skip


def _log(app: Flask) -> FaultLog:
    log_: FaultLog = app.extensions["tally.faults"]
    return log_


def report(exc: StorageError) -> None:
    """Count and, at the start of a fault, log a failed storage operation."""
    _log(current_app).failed(exc)


def worked(app: Flask) -> None:
    """Note that a storage operation of ``app``'s worked, which may clear a fault."""
    _log(app).succeeded()


def init_app(app: Flask) -> None:
    """Give the app its own fault log."""
    app.extensions["tally.faults"] = FaultLog()
