"""Prometheus metrics, correct across gunicorn's worker processes.

Each worker has its own memory, so in multiprocess mode (the environment
variable ``PROMETHEUS_MULTIPROC_DIR``, set by gunicorn.conf.py) every worker
writes its samples to files there and ``/metrics`` sums them.  Without it
(the development server) the process's own registry is served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response
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


#: Methods counted by name; any other is counted as "other", or a client
#: inventing methods would add a series to every worker's files each time.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@lru_cache(maxsize=256)
def _children(route: str, method: str, status: str) -> tuple[Any, Any]:
    # labels() validates and looks up under a lock on every call, a fifth of
    # the cost of counting a request; the set of (route, method, status) is
    # small, and bounded here anyway.
    return REQUESTS.labels(route, method, status), LATENCY.labels(route)


#: The environ key under which an answer made without Flask (the fast lane) names its route.
ROUTE = "tally.route"


def observe(environ: WSGIEnvironment, status: str, seconds: float) -> None:
    """Count an answer and its time, labelled by the route it matched, its method and its status."""
    route = environ.get(ROUTE)
    if route is None:
        # The Request that Flask made for this environ (werkzeug keeps it there):
        # its rule, not its path, since paths are unbounded and would be labels.
        request = environ.get("werkzeug.request")
        rule = request.url_rule if isinstance(request, Request) else None
        route = rule.rule if rule else "unmatched"
    method = environ.get("REQUEST_METHOD", "")
    requests, latency = _children(route, method if method in _METHODS else "other", status[:3])
    requests.inc()
    latency.observe(seconds)


def _counted(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Wrap the app to count and time each answer as it starts."""

    # Not after_request hooks: Flask's call of a hook and the look-ups through
    # its request proxy cost more than counting.  This also times the whole
    # request, session save included, and counts answers that no hook sees.
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            observe(environ, status, time.perf_counter() - started)
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, respond)

    return app


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
    app.wsgi_app = _counted(app.wsgi_app)  # type: ignore[method-assign,assignment]
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface)
    store = interface.store
    store.on_contention = CONTENTION.labels(store.name).inc
    store.on_corrupt = lambda hashed: CORRUPT.labels(store.name).inc()
    interface.on_created = CREATED.inc
