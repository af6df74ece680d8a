"""Storage faults: one warning when one starts and one line when it clears, not one per request."""

from __future__ import annotations

import logging
import threading

from flask import Flask, Response

from .store import StorageError

log = logging.getLogger(__name__)


class FaultLog:
    """Remembers this process's current storage fault, so each is logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: The kind of the fault now in progress, if any.
        self.current: str | None = None

    def failed(self, exc: StorageError) -> None:
        """Note a failed storage operation; log it if it is a new fault."""
        with self._lock:
            if self.current == exc.kind:
                return
            self.current = exc.kind
        log.warning("storage fault (%s): %s; answering %d until it clears", exc.kind, exc.message, exc.status)

    def succeeded(self) -> None:
        """Note a request that the store served; log the end of a fault."""
        if self.current is None:  # the common case, without the lock
            return
        with self._lock:
            ended, self.current = self.current, None
        if ended:
            log.warning("storage fault (%s) cleared; serving again", ended)


faults = FaultLog()


def _after(response: Response) -> Response:
    if response.status_code < 500:
        faults.succeeded()
    return response


def init_app(app: Flask) -> None:
    """Watch every answer for the end of a fault."""
    app.after_request(_after)
