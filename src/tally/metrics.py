"""Prometheus metrics, correct across gunicorn's worker processes.

Each worker has its own memory, so in multiprocess mode (the environment
variable ``PROMETHEUS_MULTIPROC_DIR``, set by gunicorn.conf.py) every worker
writes its samples to files there and ``/metrics`` sums them.  Without it
(the development server) the process's own registry is served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from .sessions import TallySessionInterface
from .store import StorageError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REQUESTS = Counter("tally_requests_total", "Requests answered.", ["route", "method", "status"])
LATENCY = Histogram(
    "tally_request_duration_seconds",
    "Time to answer a request.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONTENTION = Counter(
    "tally_session_contention_total", "Same-session updates that waited for a lock or retried.", ["store"]
)
STORAGE_ERRORS = Counter("tally_storage_errors_total", "Storage operations that failed, by kind.", ["kind"])
CORRUPT = Counter("tally_corrupt_sessions_total", "Corrupt stored sessions set aside.", ["store"])
CREATED = Counter("tally_sessions_created_total", "New sessions stored.")


def storage_failed(exc: StorageError) -> None:
    """Count a failed storage operation."""
    STORAGE_ERRORS.labels(exc.kind).inc()


#: Where the moment a request reached the app is kept, in its WSGI environ.
_STARTED = "tally.started"


def _timed(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Wrap the app to note when each request reaches it, for the latency histogram."""

    # Not a before_request hook keeping it in flask.g: Flask's call of a hook and
    # the two look-ups through g's proxy cost more than the rest of the timing.
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[_STARTED] = time.perf_counter()
        return wsgi_app(environ, start_response)

    return app


#: Methods counted by name; any other is counted as "other", or a client
#: inventing methods would add a series to every worker's files each time.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@lru_cache(maxsize=256)
def _children(route: str, method: str, status: int) -> tuple[Any, Any]:
    # labels() validates and looks up under a lock on every call, a fifth of
    # this hook's cost; the set of (route, method, status) is small, and
    # bounded here anyway.
    return REQUESTS.labels(route, method, str(status)), LATENCY.labels(route)


def _observe(response: Response) -> Response:
    # The request itself, not the proxy, which would resolve it on every look.
    req = request._get_current_object()  # type: ignore[attr-defined]
    # The rule, not the path: paths are unbounded, and would be labels.
    rule = req.url_rule
    method = req.method
    requests, latency = _children(
        rule.rule if rule else "unmatched", method if method in _METHODS else "other", response.status_code
    )
    requests.inc()
    started = req.environ.get(_STARTED)
    if started is not None:
        latency.observe(time.perf_counter() - started)
    return response


def exposition() -> Response:
    """The metrics in Prometheus's text format."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    # content_type, not mimetype: CONTENT_TYPE_LATEST has its charset already,
    # and a repeated parameter fails the scrape in Prometheus 3.
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Time and count every request, and watch the store."""
    app.wsgi_app = _timed(app.wsgi_app)  # type: ignore[method-assign,assignment]
    app.after_request(_observe)
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)
    store = interface.store
    store.on_contention = CONTENTION.labels(store.name).inc
    store.on_corrupt = lambda hashed: CORRUPT.labels(store.name).inc()
    interface.on_created = CREATED.inc
