"""Where a request's time goes: microseconds per stage of ``GET /inc``, in one process.

    python bench/breakdown.py                      # Tally on files, beside Flask with no session
    python bench/breakdown.py --redis redis://127.0.0.1:6379/0

The app is called as gunicorn would call it (a WSGI environ with a session
cookie, the body iterated and closed), with no server, so what is left is the
app's own cost.  Each stage is a function of Tally's or Flask's, wrapped in a
timer; a stage that calls another is shown without it (the view without the
store and the rendering, the session's save without the cookie).  The wrappers
cost a fraction of a microsecond each, so the stages add up to a little more
than the plain request, which is timed apart.  The machine is shared: each
figure is the lowest of several repeats' medians.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: (stage, object path, attribute): the functions each stage times.  A stage
#: may list several (the store's write and read); a missing one is skipped,
#: so that the tool also measures older versions of Tally.
STAGES: list[tuple[str, str, str]] = [
    ("routing", "flask.app:Flask", "create_url_adapter"),
    ("routing", "flask.ctx:RequestContext", "match_request"),
    ("request checks (body, cross-site)", "tally.body", "read_whole"),
    ("request checks (body, cross-site)", "tally.security", "refuse_cross_site"),
    ("fast lane: is the request plain", "tally.lane", "is_plain"),
    ("session open", "tally.sessions:TallySessionInterface", "open_session"),
    ("store", "tally.store.files:FileStore", "update"),
    ("store", "tally.store.files:FileStore", "load"),
    ("store", "tally.store.redis:RedisStore", "add"),
    ("store", "tally.store.redis:RedisStore", "load"),
    ("rendering", "tally.render", "counter_value"),
    ("view, without store and rendering", "flask.app:Flask", "dispatch_request"),
    ("cookie", "tally.sessions:TallySessionInterface", "cookie_header"),
    ("cookie", "tally.sessions:TallySessionInterface", "_cookie"),  # its name before the fast lane
    ("cookie", "werkzeug.sansio.response:Response", "set_cookie"),  # what versions before 9dbcf5a called
    ("session save, without cookie", "tally.sessions:TallySessionInterface", "save_session"),
    ("metrics", "tally.metrics", "_started"),  # a hook until the WSGI wrapper, which is not timed
    ("metrics", "tally.metrics", "_observe"),  # a hook until metrics were counted in WSGI
    ("metrics", "tally.metrics", "observe"),
    ("security headers", "tally.security", "add_headers"),  # a hook until they were added in WSGI
    ("security headers", "tally.security", "with_headers"),
    ("WSGI response", "werkzeug.wrappers.response:Response", "__call__"),
]
#: A stage's time includes these stages' times, which are taken out of it.
NESTED: dict[str, tuple[str, ...]] = {
    "view, without store and rendering": ("store", "rendering"),
    "session save, without cookie": ("cookie",),
}
#: Since the metrics and the security headers wrap start_response, werkzeug's
#: response calls them: where they do, its time is shown without theirs.
NESTED_IN_WSGI: tuple[str, tuple[str, ...], str] = (
    "WSGI response",
    ("metrics", "security headers"),
    "tally.security:with_headers",
)


def resolve(path: str) -> Any | None:
    """Return the module or class ``module:Class`` names, or None if it does not exist."""
    module, _, name = path.partition(":")
    try:
        found: Any = __import__(module, fromlist=["_"])
    except ImportError:
        return None
    return getattr(found, name, None) if name else found


class Timers:
    """Wraps functions so that each call adds its time to its stage."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, stage: str, owner: Any, name: str) -> None:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return
        totals = self.totals
        clock = time.perf_counter

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                totals[stage] = totals.get(stage, 0.0) + clock() - started

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))
        totals.setdefault(stage, 0.0)
        # A module-level function registered as a hook was registered before
        # we wrapped it: the app's hook lists are patched in install().

    def undo(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def environ(cookie: str | None) -> dict[str, Any]:
    """A GET /inc as gunicorn passes it to the app."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/inc",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "5000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:5000",
        "HTTP_USER_AGENT": "wrk",
        "HTTP_ACCEPT": "*/*",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if cookie:
        env["HTTP_COOKIE"] = f"session={cookie}"
    return env


def caller(app: Callable[..., Iterable[bytes]]) -> tuple[Callable[[int], None], str | None]:
    """Return a function that makes n requests with one client's cookie, and that cookie."""
    headers: list[tuple[str, str]] = []

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        headers[:] = response_headers

    def call(env: dict[str, Any]) -> None:
        body = app(env, start_response)
        try:
            b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close:
                close()

    call(environ(None))
    cookie = next((v.split(";")[0].split("=", 1)[1] for k, v in headers if k == "Set-Cookie"), None)

    def run(n: int) -> None:
        for _ in range(n):
            call(environ(cookie))

    return run, cookie


def per_request(run: Callable[[int], None], n: int, repeats: int) -> float:
    """Microseconds per request: the lowest of the repeats' medians of batches."""
    medians = []
    for _ in range(repeats):
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            run(n // 5)
            batches.append((time.perf_counter() - started) / (n // 5))
        medians.append(statistics.median(batches))
    return min(medians) * 1e6


def tally_app(redis_url: str | None, work: Path) -> Any:
    os.environ.update(
        TALLY_SECRET_KEY="breakdown",
        TALLY_INSTANCE_PATH=str(work / "instance"),
        TALLY_SESSION_DIR=str(work / "sessions"),
        TALLY_NEW_SESSIONS_PER_MINUTE="0",
    )
    if redis_url:
        os.environ["TALLY_REDIS_URL"] = redis_url
    from tally import create_app

    return create_app()


def stages_of(app: Any, run: Callable[[int], None], n: int, repeats: int) -> dict[str, float]:
    """Microseconds per request in each stage (the lowest over the repeats)."""
    timers = Timers()
    for stage, path, name in STAGES:
        owner = resolve(path)
        if owner is not None:
            timers.wrap(stage, owner, name)
    # Hooks were registered as the functions they were: point them at the wrappers.
    for hooks in (app.before_request_funcs, app.after_request_funcs):
        for funcs in hooks.values():
            for i, func in enumerate(funcs):
                module = sys.modules.get(func.__module__)
                wrapped = getattr(module, func.__name__, None) if module else None
                if wrapped is not None and getattr(wrapped, "__wrapped__", None) is func:
                    funcs[i] = wrapped
    best: dict[str, float] = {}
    try:
        run(n // 10)  # warm up, wrapped
        for _ in range(repeats):
            for stage in timers.totals:  # in place: the wrappers hold this dict
                timers.totals[stage] = 0.0
            run(n)
            for stage, seconds in timers.totals.items():
                us = seconds / n * 1e6
                best[stage] = min(best.get(stage, us), us)
    finally:
        timers.undo()
    nested = dict(NESTED)
    stage, inner, marker = NESTED_IN_WSGI
    if resolve(marker) is not None:
        nested[stage] = inner
    for stage, inner in nested.items():
        if stage in best:
            best[stage] -= sum(best.get(s, 0.0) for s in inner)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", help="measure Tally on this Redis URL instead of files")
    parser.add_argument("--requests", type=int, default=5000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="breakdown-metrics-"))
    sys.path.insert(0, str(ROOT / "bench"))
    from apps import ceiling

    work = Path(tempfile.mkdtemp(prefix="breakdown-"))
    app = tally_app(args.redis, work)
    run, cookie = caller(app)
    assert cookie, "Tally sent no session cookie"
    ceiling_run, _ = caller(ceiling())
    ceiling_us = per_request(ceiling_run, args.requests, args.repeats)
    total_us = per_request(run, args.requests, args.repeats)
    stages = stages_of(app, run, args.requests, args.repeats)
    store = "Redis" if args.redis else "files"
    print(f"GET /inc, Tally on {store}, one client's cookie, {args.requests} requests x {args.repeats} repeats\n")
    print("| stage | µs per request |")
    print("|---|---:|")
    for stage in dict.fromkeys(s for s, _, _ in STAGES):
        if stage in stages:
            print(f"| {stage} | {stages[stage]:.1f} |")
    print(f"| Flask's own request handling (the rest) | {max(total_us - sum(stages.values()), 0.0):.1f} |")
    print(f"| **Tally, whole request** | **{total_us:.1f}** |")
    print(f"| Flask with no session, whole request | {ceiling_us:.1f} |")


if __name__ == "__main__":
    main()
