"""Configuration: defaults, ``instance/config.py`` and ``TALLY_*`` variables, each setting checked at start.

Flask's ``from_prefixed_env`` parses values as JSON and checks nothing, so
``TALLY_SESSION_FSYNC=no`` was the truthy string ``'no'`` (fsync on), and
``TALLY_PERMANENT_SESSION_LIFETIME=-5`` made every request a new session.
Here each setting Tally reads has its own parser, which takes the
environment's text and the Python values of ``instance/config.py`` alike.  A
value it cannot use stops the process before it serves, with one line per
bad setting that names it and says what it accepts, and no traceback.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any
from urllib.parse import urlsplit

from flask import Config, Flask

log = logging.getLogger(__name__)

#: The environment variables' prefix: ``TALLY_SESSION_DIR`` sets ``SESSION_DIR``.
PREFIX = "TALLY_"
#: ``TALLY_*`` variables read by something else than the app's configuration.
OTHER_VARIABLES = frozenset({"INSTANCE_PATH", "BIND", "THREADS", "REQUIRE_ALL"})
#: The exit status when a setting is bad.  It is gunicorn's "App failed to
#: load": a worker that exits with it makes gunicorn stop, where any other
#: status would have it start the worker again, and fail again, forever.
EXIT_STATUS = 4

Network = IPv4Network | IPv6Network


def defaults() -> dict[str, Any]:
    """The built-in configuration; instance/config.py and TALLY_* override it."""
    return {
        # Nothing in Tally signs anything: the session cookie is a random
        # 256-bit id looked up on the server (Flask's signed cookie sessions
        # are replaced, and Flask-Session's signer is deprecated and off).
        # Flask keeps the setting for extensions that sign; set one then.
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
        # New sessions one client address may create per minute (429 past it),
        # across all workers and instances; 0 turns the limit off.  A session
        # is made once per browser, so no office behind one NAT comes near.
        "NEW_SESSIONS_PER_MINUTE": 300,
        # The most sessions the store may hold (507 for new ones at the cap); 0: no cap.
        "MAX_SESSIONS": 0,
        # Where the per-address counts live; unset: the sessions' Redis, or files beside them.
        "RATELIMIT_STORAGE_URI": None,
        # Who may read /metrics: loopback and private networks (judged by the
        # real client address behind PROXY_COUNT proxies).  Checked and turned
        # into a tuple of ipaddress networks at start.
        "METRICS_ALLOW": ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
    }


class ConfigError(SystemExit):
    """Settings Tally cannot use: the process stops before it serves.

    A SystemExit, so that neither gunicorn's worker nor the ``flask`` command
    prints a traceback over the lines that say what is wrong (:func:`load`
    prints them); its status is :data:`EXIT_STATUS`.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__(EXIT_STATUS)
        #: One line per bad setting, naming it and what it accepts.
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


# -- parsers: each takes the environment's text or a Python value, and
# -- returns the value to use or raises ValueError (whose text, if any,
# -- says what is wrong beyond "not what the setting accepts").

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def boolean(value: object) -> bool:
    """true/false, yes/no, on/off, 1/0 in any case, or a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError


def boolean_or_none(value: object) -> bool | None:
    """A boolean, or None (Flask's "decide from DEBUG") when unset or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return boolean(value)


def whole(value: object) -> int:
    """A whole number: an int, or ASCII digits (a sign would be a typo or a negative)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    raise ValueError


def at_least(low: int) -> Callable[[object], int]:
    """A whole number no less than ``low``."""

    def parse(value: object) -> int:
        number = whole(value)
        if number < low:
            raise ValueError
        return number

    return parse


def lifetime(value: object) -> timedelta:
    """A positive whole number of seconds, or a timedelta of whole seconds (as Flask allows)."""
    if isinstance(value, timedelta):
        if value.microseconds:
            raise ValueError
        value = int(value.total_seconds())
    return timedelta(seconds=at_least(1)(value))


def seconds_above_zero(value: object) -> float:
    """A finite number above 0."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError from None  # float's own text would hide what the setting accepts
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError


def text(value: object) -> str:
    """Any string."""
    if isinstance(value, str):
        return value
    raise ValueError


def folder(value: object) -> str:
    """A path that is not empty."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError


def secret(value: object) -> str | bytes | None:
    """A string or bytes; unset (None) when empty."""
    if value is None or value in ("", b""):
        return None
    if isinstance(value, str | bytes):
        return value
    raise ValueError


def same_site(value: object) -> str | None:
    """Lax, Strict or None (as text, in any case), or Python's None for no attribute."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().capitalize() in ("Lax", "Strict", "None"):
        return value.strip().capitalize()
    raise ValueError


def redis_url(value: object) -> str | None:
    """A URL the Redis store accepts, checked without connecting; unset when empty."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError
    try:
        # Imported here: the file store needs no Redis client.
        from .store.redis_connect import connect
    except ImportError:
        raise ValueError("the Redis client is not installed: pip install -e '.[redis]'") from None
    try:
        # connect() only builds the client (redis-py connects on first use),
        # and raises ValueError naming what is wrong with the URL.
        connect(value, 1.0).close()
    except ValueError as exc:
        password = urlsplit(value).password if "://" in value else None
        fault = str(exc).replace(password, "***") if password else str(exc)
        raise ValueError(fault) from None
    return value


def storage_uri(value: object) -> str | None:
    """A storage URI of the ``limits`` library (Flask-Limiter's); unset when empty."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "://" not in value:
        raise ValueError
    if value.lower().startswith("async+"):
        raise ValueError("an async storage cannot serve Tally's synchronous requests")
    return value


def networks(value: object) -> tuple[Network, ...]:
    """CIDR networks: comma-separated or a JSON list in the environment, a list in Python."""
    items: Iterable[object]
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except ValueError:
                raise ValueError("not a JSON list") from None
            if not isinstance(items, list):
                raise ValueError("not a JSON list")
        else:
            items = [part for part in stripped.split(",") if part.strip()]
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        raise ValueError
    parsed: list[Network] = []
    for item in items:
        if isinstance(item, IPv4Network | IPv6Network):
            parsed.append(item)
        elif isinstance(item, str):
            # strict: "10.0.0.1/8" is refused rather than widened to 10.0.0.0/8 unsaid.
            parsed.append(ip_network(item.strip()))  # its ValueError names the fault
        else:
            raise ValueError(f"{item!r} is not a network")
    return tuple(parsed)


@dataclass(frozen=True)
class Setting:
    """How one setting is read, and how to say what it accepts."""

    parse: Callable[[object], Any]
    #: Completes "TALLY_X must be ...".
    accepts: str
    #: Whether its value may be shown when refused (not a password or a key).
    shown: bool = True


_BOOLEAN = Setting(boolean, "true or false (also yes/no, on/off, 1/0)")
_BOOLEAN_OR_NONE = Setting(boolean_or_none, "true or false (also yes/no, on/off, 1/0), or empty for Flask's default")

#: Every setting checked at start.  Flask's other settings pass as Flask reads them.
SETTINGS: dict[str, Setting] = {
    "SECRET_KEY": Setting(secret, "a string", shown=False),
    "SESSION_DIR": Setting(folder, "a folder's path"),
    "SESSION_FSYNC": _BOOLEAN,
    "REDIS_URL": Setting(
        redis_url,
        "a Redis URL: redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// (rediss+... for TLS)",
        shown=False,  # it may carry a password
    ),
    "REDIS_TIMEOUT": Setting(seconds_above_zero, "a number of seconds above 0"),
    "REDIS_REPLICAS": Setting(at_least(0), "a whole number, 0 or more"),
    "REDIS_PREFIX": Setting(text, "a string"),
    "PERMANENT_SESSION_LIFETIME": Setting(lifetime, "a positive whole number of seconds"),
    "SESSION_REFRESH_EACH_REQUEST": _BOOLEAN,
    "SESSION_KEY_PREFIX": Setting(text, "a string"),
    "SESSION_COOKIE_HTTPONLY": _BOOLEAN,
    "SESSION_COOKIE_SAMESITE": Setting(same_site, "Lax, Strict or None"),
    "SESSION_COOKIE_SECURE": _BOOLEAN,
    "SESSION_COOKIE_PARTITIONED": _BOOLEAN,
    "PROXY_COUNT": Setting(at_least(0), "a whole number, 0 or more"),
    "MAX_CONTENT_LENGTH": Setting(at_least(1), "a positive whole number of bytes"),
    "NEW_SESSIONS_PER_MINUTE": Setting(at_least(0), "a whole number, 0 or more (0: no limit)"),
    "MAX_SESSIONS": Setting(at_least(0), "a whole number, 0 or more (0: no cap)"),
    "RATELIMIT_STORAGE_URI": Setting(storage_uri, "a storage URI such as memory:// or redis://host:6379, or empty"),
    "METRICS_ALLOW": Setting(networks, "CIDR networks (like 10.0.0.0/8), comma-separated or a JSON list"),
    # Flask's own booleans: its JSON parsing would make "False" or "no" true.
    "DEBUG": _BOOLEAN_OR_NONE,
    "TESTING": _BOOLEAN,
    "PROPAGATE_EXCEPTIONS": _BOOLEAN_OR_NONE,
    "TRAP_HTTP_EXCEPTIONS": _BOOLEAN,
    "TRAP_BAD_REQUEST_ERRORS": _BOOLEAN_OR_NONE,
    "TEMPLATES_AUTO_RELOAD": _BOOLEAN_OR_NONE,
    "EXPLAIN_TEMPLATE_LOADING": _BOOLEAN,
    "USE_X_SENDFILE": _BOOLEAN,
    "PROVIDE_AUTOMATIC_OPTIONS": _BOOLEAN,
}


# -- loading -----------------------------------------------------------------


def load(app: Flask, overrides: dict[str, Any] | None) -> None:
    """Layer the configuration (defaults, instance/config.py, TALLY_*, then overrides) and check it.

    Raises :class:`ConfigError`, having printed its lines on stderr, when a
    setting cannot be used.
    """
    # Where each setting that is not a default came from, to name it when refused.
    origins: dict[str, str] = {}
    problems: list[str] = []
    app.config.from_mapping(defaults())

    path = os.path.join(app.instance_path, "config.py")
    from_file = Config(app.instance_path)
    try:
        from_file.from_pyfile("config.py", silent=True)
    except Exception as exc:  # a syntax error or a failing line: one line, as for a bad value
        problems.append(f"tally: {path} cannot be loaded: {type(exc).__name__}: {exc}")
    app.config.update(from_file)
    origins.update((key, f"{key} in {path}") for key in from_file)

    # Flask's reading first, for its settings Tally does not check (JSON where
    # it parses); then Tally's own from the raw text, which their parsers read.
    app.config.from_prefixed_env(PREFIX.rstrip("_"))
    for variable, raw in os.environ.items():
        key = variable.removeprefix(PREFIX)
        if variable.startswith(PREFIX) and key in SETTINGS:
            app.config[key] = raw
            origins[key] = variable
    _warn_of_typos(os.environ)

    app.config.update(overrides or {})
    origins.update((key, f"{key} (given to create_app)") for key in overrides or {})

    problems += parse_all(app.config, origins)
    if problems:
        # One write: gunicorn's workers print at the same moment, and must not interleave.
        sys.stderr.write("".join(f"{line}\n" for line in problems))
        sys.stderr.flush()
        raise ConfigError(problems)
    app.config["SESSION_DIR"] = os.path.join(app.instance_path, app.config["SESSION_DIR"])


def parse_all(settings: MutableMapping[str, Any], origins: dict[str, str]) -> list[str]:
    """Parse every setting in place; return a line for each that cannot be used."""
    problems = []
    for key, setting in SETTINGS.items():
        if key not in settings:
            continue
        value = settings[key]
        try:
            settings[key] = setting.parse(value)
        except ValueError as exc:
            where = origins.get(key, key)
            if str(exc):
                why = f"; {exc}"
            elif setting.shown:
                why = f", not {_show(value)}"
            else:
                why = ""
            problems.append(f"tally: {where} must be {setting.accepts}{why}")
    return problems


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _warn_of_typos(environ: Mapping[str, str]) -> None:
    """Warn of a TALLY_* variable that nothing reads but that is close to one that is read."""
    known = set(SETTINGS) | set(Flask.default_config) | OTHER_VARIABLES
    for variable in environ:
        key = variable.removeprefix(PREFIX)
        if not variable.startswith(PREFIX) or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            log.warning("%s is not a Tally setting and is ignored; did you mean %s%s?", variable, PREFIX, close[0])


def check_settings(instance_path: str) -> None:
    """Load the settings as the app would, to refuse bad ones before any worker starts.

    For gunicorn.conf.py's ``on_starting`` hook, which runs it in a child of
    the master: when several workers fail to load the app at once, gunicorn
    prints a traceback of its own; refused here, there is only the line that
    says what is wrong.
    """
    load(Flask(__name__, instance_path=instance_path, instance_relative_config=True), None)
