"""Tally: a per-client counter on server-side sessions that never loses an update."""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import cli, config, faults, lane, metrics, ops, quota, render, security, sessions, views
from .store import make_store


def create_app(test_config: dict[str, Any] | None = None, instance_path: str | None = None) -> Flask:
    """Create the app: configuration, then the store, then each part."""
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    config.load(app, test_config)
    os.makedirs(app.instance_path, exist_ok=True)

    store = make_store(app.config)
    for warning in store.warnings():
        logging.getLogger(__name__).warning("%s", warning)
    app.session_interface = sessions.TallySessionInterface(store, app.config["SESSION_KEY_PREFIX"])

    lane.init_app(app)  # first: the headers and metrics wrap its answers too
    security.init_app(app)
    faults.init_app(app)
    render.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(ops.bp)
    metrics.init_app(app)
    quota.init_app(app)  # after metrics: it wraps the sessions-created hook
    cli.init_app(app)

    proxies = int(app.config["PROXY_COUNT"])
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies)  # type: ignore[method-assign]
    return app
