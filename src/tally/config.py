"""Configuration defaults, and the secret key kept in the instance folder."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from typing import Any

from flask import Flask


def defaults() -> dict[str, Any]:
    """The built-in configuration; instance/config.py and TALLY_* override it."""
    return {
        # Unset: a key is generated once into the instance folder (see below).
        "SECRET_KEY": None,
        # The file store's folder; a relative path is taken from the instance folder.
        "SESSION_DIR": "sessions",
        # fsync each write: survives power loss, not just crashes, at ~1 ms a write.
        "SESSION_FSYNC": False,
        # A Redis URL (redis://, rediss://, redis+sentinel://, redis+cluster://)
        # moves sessions and the global counter to Redis.
        "REDIS_URL": None,
        # Seconds to wait for Redis before answering 503 (connect and each reply).
        "REDIS_TIMEOUT": 2.0,
        # Replicas that must confirm each write (Redis's WAIT) before it is
        # answered 200; 0 acknowledges what the primary alone has.
        "REDIS_REPLICAS": 0,
        # Every key Tally writes starts with this, so one Redis can serve several apps.
        "REDIS_PREFIX": "tally:",
        # A session not written for this long reads as new (counter 0).
        "PERMANENT_SESSION_LIFETIME": timedelta(days=31),
        # Stock Flask rewrites the session on every request; a slow read would
        # then write back a stale counter and undo a concurrent increment.
        "SESSION_REFRESH_EACH_REQUEST": False,
        "SESSION_KEY_PREFIX": "session:",
        # Scripts cannot read the cookie, and other sites' POSTs do not carry it.
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        # Set TALLY_SESSION_COOKIE_SECURE=true when served over HTTPS.
        "SESSION_COOKIE_SECURE": False,
        # How many proxies (each setting X-Forwarded-*) stand before the app.
        "PROXY_COUNT": 0,
        # Requests carry at most a small form; anything larger is a 413.
        "MAX_CONTENT_LENGTH": 16 * 1024,
    }


def load(app: Flask, overrides: dict[str, Any] | None) -> None:
    """Layer the configuration: defaults, instance/config.py, TALLY_*, then overrides."""
    app.config.from_mapping(defaults())
    app.config.from_pyfile("config.py", silent=True)
    app.config.from_prefixed_env("TALLY")
    app.config.update(overrides or {})
    app.config["SESSION_DIR"] = os.path.join(app.instance_path, app.config["SESSION_DIR"])
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = instance_secret(app.instance_path)


def instance_secret(instance_path: str) -> str:
    """Return the instance's secret key, creating it (mode 0600) the first time."""
    path = os.path.join(instance_path, "secret_key")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(instance_path, exist_ok=True)
    staged = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        # link() fails if another worker won the race: then use its key.
        os.link(staged, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(staged)
    with open(path) as f:
        return f.read().strip()
