"""Operations endpoints: ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import Forbidden

from . import counter, metrics
from .faults import report, worked
from .render import RETRY_AFTER_SECONDS
from .store import StorageError

bp = Blueprint("ops", __name__)

#: How long one health check's outcome answers /healthz.
HEALTH_CHECK_SECONDS = 1.0


@bp.get("/healthz")
def healthz() -> Response | tuple[Response, int, dict[str, str]]:
    """200 when the store can be read and written (with any warnings); 503 with the reason when not."""
    store = counter.store()
    try:
        _checks().run(store.check)
    except StorageError as exc:
        report(exc)
        body = {"status": "unavailable", "store": store.name, "kind": exc.kind, "reason": exc.message}
        return jsonify(body), 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    worked(current_app)
    warnings = store.warnings()
    return jsonify(status="ok", store=store.name, **({"warnings": warnings} if warnings else {}))


@bp.get("/metrics")
def metrics_text() -> Response:
    """Prometheus metrics, summed over all workers, for the networks allowed to see them."""
    if not _allowed(request.remote_addr, current_app.config["METRICS_ALLOW"]):
        raise Forbidden("metrics are served only to the networks in TALLY_METRICS_ALLOW")
    return metrics.exposition()


def _allowed(address: str | None, networks: Iterable[str | IPv4Network | IPv6Network]) -> bool:
    try:
        ip = ip_address(address or "")
    except ValueError:
        return False  # a Unix socket's peer, with no proxy to name the client: unknown
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in ip_network(net, strict=False) for net in networks)


class CheckCache:
    """The last health check's outcome, reused for a moment.

    A load balancer may poll /healthz many times a second from many places;
    each real check writes to the store (and on files may fsync).  Within
    ``HEALTH_CHECK_SECONDS`` of the last check, its outcome, success or
    failure, is the answer.
    """

    def __init__(self) -> None:
        self._at = -HEALTH_CHECK_SECONDS
        self._error: StorageError | None = None

    def run(self, check: Callable[[], None]) -> None:
        """Run ``check``, or raise what it raised, if it ran a moment ago."""
        now = time.monotonic()
        if now - self._at > HEALTH_CHECK_SECONDS:
            try:
                check()
                self._error = None
            except StorageError as exc:
                self._error = exc
            self._at = now
        if self._error is not None:
            raise self._error


def _checks() -> CheckCache:
    cache: CheckCache = current_app.extensions.setdefault("tally.health", CheckCache())
    return cache
