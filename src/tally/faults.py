"""Storage faults: one warning per fault, not one per request."""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, current_app

from .metrics import storage_failed
from .store import StorageError

log = logging.getLogger(__name__)

#: A fault of the same kind within this many seconds of the last is the same fault.
QUIET_SECONDS = 60.0


class FaultLog:
    """Logs a storage fault when it starts, and again only after a quiet spell.

    A full disk fails new sessions while existing ones still write in place,
    so failures and successes interleave; a "cleared" line would flap, so the
    start of each fault is what is logged (``/healthz`` and the metrics show
    the rest).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def failed(self, exc: StorageError) -> None:
        """Note a failed storage operation; log it if it starts a fault."""
        storage_failed(exc)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(exc.kind)
            self._last[exc.kind] = now
        if last is None or now - last > QUIET_SECONDS:
            log.warning("storage fault (%s): %s; answering %d until it clears", exc.kind, exc.message, exc.status)


def report(exc: StorageError) -> None:
    """Count and, at the start of a fault, log a failed storage operation."""
    current_app.extensions["tally.faults"].failed(exc)


def init_app(app: Flask) -> None:
    """Give the app its own fault log."""
    app.extensions["tally.faults"] = FaultLog()
