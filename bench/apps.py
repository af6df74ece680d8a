"""What Tally is measured against: stock Flask-Session, and Flask with no session.

``gunicorn --pythonpath bench 'apps:stock()'`` serves the stock recipe on the
store that ``BENCH_STORE`` names (``files`` or ``redis``); ``'apps:ceiling()'``
serves the same texts with no session at all, the most any Flask app can do.
"""

from __future__ import annotations

import os

from flask import Flask, session


def stock() -> Flask:
    """The usual answer: Flask-Session on cachelib files (threshold 0) or Redis."""
    from flask_session import Session

    app = Flask(__name__)
    app.config["SECRET_KEY"] = "bench"
    if os.environ["BENCH_STORE"] == "redis":
        import redis  # redis-py parses replies with hiredis whenever it is importable

        app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]))
    else:
        from cachelib.file import FileSystemCache

        # threshold=0: the default of 500 deletes live sessions, and would be slower still.
        cache = FileSystemCache(os.environ["BENCH_SESSION_DIR"], threshold=0)
        app.config.update(SESSION_TYPE="cachelib", SESSION_CACHELIB=cache)
    Session(app)

    @app.route("/inc")
    def inc() -> str:
        session["counter"] = session.get("counter", 0) + 1
        return f"counter is {session['counter']}"

    @app.route("/counter")
    def counter() -> str:
        return f"counter is {session.get('counter', 0)}"

    return app


def ceiling() -> Flask:
    """Flask alone: the same answer, nothing stored."""
    app = Flask(__name__)

    @app.route("/inc")
    def inc() -> str:
        return "counter is 1"

    @app.route("/counter")
    def counter() -> str:
        return "counter is 1"

    return app
