"""Operations endpoints: ``/healthz`` and ``/metrics``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from . import counter, metrics
from .faults import report
from .render import RETRY_AFTER_SECONDS
from .store import StorageError

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response | tuple[Response, int, dict[str, str]]:
    """200 when the store can be read and written (with any warnings); 503 with the reason when not."""
    store = counter.store()
    try:
        store.check()
    except StorageError as exc:
        report(exc)
        body = {"status": "unavailable", "store": store.name, "kind": exc.kind, "reason": exc.message}
        return jsonify(body), 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    warnings = store.warnings()
    return jsonify(status="ok", store=store.name, **({"warnings": warnings} if warnings else {}))


@bp.get("/metrics")
def metrics_text() -> Response:
    """Prometheus metrics, summed over all workers."""
    return metrics.exposition()
