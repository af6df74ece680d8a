"""What Tally is measured against: stock Flask-Session, and Flask with no session.

``gunicorn --pythonpath bench 'apps:stock()'`` serves the stock recipe on the
store that ``BENCH_STORE`` names (``files`` or ``redis``); ``'apps:ceiling()'``
serves the same texts with no session at all, the most any Flask app can do.
``'apps:question()'`` serves the program of the question Tally answers, a
module-level counter object (``make demo`` shows what happens to it).
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

    # The routes of the Flask-Session answer to the question: /, /inc and /dec.
    @app.route("/")
    def reset() -> str:
        session["counter"] = 0
        return "counter was reset"

    @app.route("/inc")
    def inc() -> str:
        session["counter"] = session.get("counter", 0) + 1
        return f"counter is {session['counter']}"

    @app.route("/dec")
    def dec() -> str:
        session["counter"] = session.get("counter", 0) - 1
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


class SomeObj:
    """The question's object, as the question wrote it (with types added)."""

    def __init__(self, param: int) -> None:
        self.param = param

    def query(self) -> int:
        self.param += 1
        return self.param


# As in the question, one object at module level.  gunicorn imports this module
# in every worker process, so each worker has an object of its own.
global_obj = SomeObj(0)


def question() -> Flask:
    """The question's program: ``/`` answers ``global_obj.query()``, and says which worker process answered."""
    app = Flask(__name__)

    def answer(number: int) -> tuple[str, dict[str, str]]:
        """The number as text, and the pid of the worker process that answered."""
        return str(number), {"X-Worker-Pid": str(os.getpid())}

    @app.route("/")
    def home() -> tuple[str, dict[str, str]]:
        # The question flashes the number into a template; the number is what matters here.
        return answer(global_obj.query())

    @app.route("/counter")
    def counter() -> tuple[str, dict[str, str]]:
        """This worker's value, unchanged: read once every worker is done counting."""
        return answer(global_obj.param)

    return app
