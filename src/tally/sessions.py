"""Flask-Session's server-side sessions, on a :class:`~tally.store.Store`, without lost updates.

Stock Flask-Session loads the whole session when a request starts and writes
the whole session back when it ends; two overlapping requests each write what
they read, and one of the updates is lost.  It also rewrites the session on
every request, so a slow read undoes a concurrent write.  Here:

* a session is loaded only when the request reads it, and a read never writes;
* a change to the counter is one atomic operation in the store
  (:meth:`TallySessionInterface.add`), with no load before it;
* anything else a view sets on ``session`` is merged at the end of the request
  as a diff against what was loaded, in one atomic read-modify-write, so it
  cannot undo concurrent updates to keys the view did not touch.

A cookie's id is used only while the store has that session: writes to it are
made with ``create=False``, and an unknown id is replaced by a fresh one (a
client never chooses its session id).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response
from flask_session.base import ServerSideSession, ServerSideSessionInterface
from werkzeug.http import dump_cookie, parse_cookie

from .store import Record, Store

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: Flask-Session's ids are ``secrets.token_urlsafe(32)``: 43 URL-safe chars.
#: Anything else (huge, odd charset, path-looking) is treated as no cookie.
_SID = re.compile(r"[A-Za-z0-9_-]{43}")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")

Loader = Callable[[], Record | None]


def _cookie_value(header: str, name: str) -> str:
    """The value of cookie ``name`` in a Cookie header, as werkzeug reads it ("" if none)."""
    # A script's header is its session cookie alone.  Then the value is what
    # follows "name=", which is all werkzeug's parser (3% of a whole request:
    # a regex over every pair, unquoting, a multi-dict) would find.
    # Any other header, a browser's with other cookies or a quoted value, goes
    # to the parser, straight from the header: request.cookies would also
    # build the header map and an immutable multi-dict.
    start = len(name) + 1
    if header.startswith(name) and header[start - 1 : start] == "=" and _SID.fullmatch(header, start):
        return header[start:]
    try:
        return parse_cookie(header).get(name, "")
    except UnicodeError:
        # werkzeug reads the header's bytes as UTF-8 and raises on any other
        # (a 500, before any view).  An id is ASCII: any other character need
        # only stay out of it, and "?" is no character of an id.
        return parse_cookie(_NON_ASCII.sub("?", header)).get(name, "")


def lifetime_seconds(app: Flask) -> int:
    """Return the app's session lifetime in whole seconds, as the stores take it."""
    # From the config itself: app.permanent_session_lifetime converts it anew
    # on every read, and this runs on every write.  Flask takes seconds or a timedelta.
    lifetime = app.config["PERMANENT_SESSION_LIFETIME"]
    return int(lifetime.total_seconds() if isinstance(lifetime, timedelta) else lifetime)


class TallySession(ServerSideSession):
    """A session that loads on first use and knows what it stored."""

    def __init__(self, sid: str, loader: Loader | None = None) -> None:
        self._loader: Loader | None = None
        # Every Tally session is permanent (its cookie expires with it), so the
        # "_permanent" key that Flask keeps in the mapping is not stored.
        super().__init__(None, sid)
        #: The record as the store last had it during this request.
        self.loaded: Record = {}
        #: True once this request stored the session, so the cookie is sent.
        self.stored = False
        #: True when the id is ours, not yet stored; False while it is the cookie's.
        self.new = loader is None
        #: True once a load found nothing stored under the cookie's id.
        self.unknown = False
        self._loader = loader

    def _ensure_loaded(self) -> None:
        loader, self._loader = self._loader, None
        if loader is None:
            return
        record = loader()
        if record is None:
            # The cookie's id is not stored (unknown or expired): never adopt it.
            # The interface gives the session a fresh id before it stores anything.
            self.unknown = True
            return
        dict.update(self, record)
        self.loaded = dict(self)

    def renew(self, sid: str) -> None:
        """Drop the cookie's unknown id for a fresh one of ours."""
        self.sid = sid
        self.new = True
        self.unknown = False
        self._loader = None

    def known(self, record: Record) -> None:
        """Record values the store now holds, without marking the session modified."""
        # dict's own methods bypass CallbackDict's "modified" callback: the
        # values are already stored, and writing them back could undo newer ones.
        dict.update(self, record)
        self.loaded.update(record)
        self.stored = True
        self.accessed = True


def _loading(name: str) -> Callable[..., Any]:
    inherited = getattr(ServerSideSession, name)

    def method(self: TallySession, *args: Any, **kwargs: Any) -> Any:
        self._ensure_loaded()
        return inherited(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = inherited.__doc__
    return method


# Every way of looking into or changing the mapping loads it first.  Listed,
# not discovered, so that a new dict method cannot silently skip the load.
for _name in (
    "__getitem__", "get", "__contains__", "__iter__", "__len__", "__bool__", "__eq__", "__repr__", "keys", "values",
    "items", "copy", "setdefault", "pop", "popitem", "update", "clear", "__setitem__", "__delitem__",
):  # fmt: skip
    setattr(TallySession, _name, _loading(_name))


class TallySessionInterface(ServerSideSessionInterface):
    """Flask-Session's interface, storing through a :class:`Store`."""

    session_class = TallySession

    def __init__(self, store: Store, key_prefix: str) -> None:
        # No app is kept on the interface: it serves whichever app calls it.
        super().__init__(None, key_prefix=key_prefix, permanent=True, sid_length=32)
        self.store = store
        #: Called before a new session is stored; raises to refuse it (a quota).
        self.before_create: Callable[[], None] = lambda: None
        #: Called when a new session is first stored.
        self.on_created: Callable[[], None] = lambda: None
        #: (second, app, the header before the id, the header after it): see cookie_header.
        self._cookie_parts: tuple[int, Flask, str, str] | None = None

    def cookie_sid(self, app: Flask, environ: WSGIEnvironment) -> str | None:
        """The session id in the request's cookie, or None if it has none that could be one."""
        sid = _cookie_value(environ.get("HTTP_COOKIE", ""), self.get_cookie_name(app))
        return sid if _SID.fullmatch(sid) else None

    def open_session(self, app: Flask, request: Request) -> TallySession:
        """Take the client's session id, to be loaded when first needed."""
        sid = self.cookie_sid(app, request.environ)
        if sid is not None:
            store_id = self._get_store_id(sid)
            return TallySession(sid, lambda: self.store.load(store_id))
        return TallySession(self._generate_sid(self.sid_length))

    def _write(self, session: TallySession, write: Callable[[str, bool], Any]) -> Any:
        """Run ``write(store_id, create)`` on the client's session, or else on a fresh one."""
        if session.unknown:
            session.renew(self._generate_sid(self.sid_length))
        if not session.new:
            result = write(self._get_store_id(session.sid), False)
            if result is not None:
                return result
            session.renew(self._generate_sid(self.sid_length))  # unknown or expired: never adopt it
        self.before_create()
        result = write(self._get_store_id(session.sid), True)
        self.on_created()
        return result

    def add_to_stored(self, app: Flask, sid: str, field: str, by: int) -> int | None:
        """Atomically add ``by`` to an integer field of the stored session ``sid`` and return it.

        None, having written nothing, when no session is stored under ``sid``.
        """
        return self.store.add(self._get_store_id(sid), field, by, lifetime_seconds(app), False)

    def add(self, app: Flask, session: TallySession, field: str, by: int) -> int:
        """Atomically add ``by`` to an integer field of the session and return it."""
        ttl = lifetime_seconds(app)
        value: int = self._write(session, lambda key, create: self.store.add(key, field, by, ttl, create))
        session.known({field: value})
        return value

    def update(self, app: Flask, session: TallySession, change: Callable[[Record], Record]) -> None:
        """Atomically apply ``change`` to the stored session, creating it if it is not stored."""
        self._update(session, change, lifetime_seconds(app))

    def _update(self, session: TallySession, change: Callable[[Record], Record], ttl: int) -> None:
        session.known(self._write(session, lambda key, create: self.store.update(key, change, ttl, create)))

    def save_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:  # type: ignore[override]
        """Merge what the view set on the session, and send the cookie if it was stored."""
        assert isinstance(session, TallySession)
        if session.modified:
            self._upsert_session(app.permanent_session_lifetime, session, self._get_store_id(session.sid))
        # Vary: Cookie is on every answer already (security.with_headers).
        if session.stored:
            response.headers.add("Set-Cookie", self.cookie_header(app, session.sid))

    def cookie_header(self, app: Flask, sid: str) -> str:
        """The Set-Cookie header for ``sid``, always permanent (reading session.permanent would load it)."""
        # werkzeug's dump_cookie cost a tenth of a request, and all it makes
        # but the id is the same for a whole second: the expiry is in whole
        # seconds.  So it is called once a second, with an empty value, and the
        # id goes in after the name (an id is URL-safe, which needs no quoting).
        # The cookie settings are read from the app's config then too.
        now = int(time.time())
        cached = self._cookie_parts
        if cached is None or cached[0] != now or cached[1] is not app:
            name, lifetime, domain, path, secure, httponly, samesite = (
                self.get_cookie_name(app), app.permanent_session_lifetime, self.get_cookie_domain(app),
                self.get_cookie_path(app), self.get_cookie_secure(app), self.get_cookie_httponly(app),
                self.get_cookie_samesite(app),
            )  # fmt: skip
            expires = datetime.fromtimestamp(now, UTC) + lifetime
            header = dump_cookie(name, "", expires=expires, path=path, domain=domain, secure=secure,
                                 httponly=httponly, samesite=samesite)  # fmt: skip
            split = header.index("=") + 1
            cached = self._cookie_parts = (now, app, header[:split], header[split:])
        return cached[2] + sid + cached[3]

    def _upsert_session(self, session_lifetime: timedelta, session: ServerSideSession, store_id: str) -> None:
        assert isinstance(session, TallySession)
        loaded = session.loaded
        changed = {k: v for k, v in session.items() if k not in loaded or loaded[k] != v}
        removed = loaded.keys() - session.keys()
        if not changed and not removed:
            return

        def merge(record: Record) -> Record:
            return {k: v for k, v in record.items() if k not in removed} | changed

        self._update(session, merge, int(session_lifetime.total_seconds()))

    def _retrieve_session_data(self, store_id: str) -> Record | None:
        return self.store.load(store_id)

    def _delete_session(self, store_id: str) -> None:
        self.store.delete(store_id)
