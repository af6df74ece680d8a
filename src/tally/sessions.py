"""Flask-Session's server-side sessions, on a :class:`~tally.store.Store`, without lost updates.

Stock Flask-Session loads the whole session when a request starts and writes
the whole session back when it ends; two overlapping requests each write
what they read, and one of the updates is lost.  It also rewrites the session
on every request, so a slow read undoes a concurrent write.  Here:

* a read never writes;
* a change that depends on the stored value goes through :meth:`update`, one
  atomic read-modify-write in the store, and the request's session is then
  brought in line with what was stored;
* anything else a view sets on ``session`` is merged at the end of the request
  as a diff against what was loaded, so it cannot undo concurrent updates to
  keys the view did not touch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask, Request, session
from flask_session.base import ServerSideSession, ServerSideSessionInterface

from .store import Record, StorageError, Store

#: Flask-Session's ids are ``secrets.token_urlsafe(32)``: 43 URL-safe chars.
#: Anything else (huge, odd charset, path-looking) is treated as no cookie.
_SID = re.compile(r"[A-Za-z0-9_-]{43}")


class TallySession(ServerSideSession):
    """A session that knows what the store held and whether it wrote it."""

    def __init__(self, initial: Record | None = None, sid: str | None = None, permanent: bool | None = None) -> None:
        super().__init__(initial, sid, permanent)
        #: The record as the store last had it during this request.
        self.loaded: Record = dict(self)
        #: True once this request stored the session, so the cookie is sent.
        self.stored = False
        #: Why the stored session could not be loaded, raised again by
        #: :func:`raise_load_failure` where Flask's error handlers apply.
        self.failure: StorageError | None = None

    def replace(self, record: Record) -> None:
        """Show ``record`` as the session without marking it modified."""
        # dict's own methods bypass CallbackDict's "modified" callback: the
        # record is already stored, and writing it back could undo a newer one.
        dict.clear(self)
        dict.update(self, record)
        self.loaded = dict(record)
        self.stored = True
        self.accessed = True


class TallySessionInterface(ServerSideSessionInterface):
    """Flask-Session's interface, storing through a :class:`Store`."""

    session_class = TallySession

    def __init__(self, store: Store, key_prefix: str) -> None:
        # No app is kept on the interface: it serves whichever app calls it.
        super().__init__(None, key_prefix=key_prefix, permanent=True, sid_length=32)  # type: ignore[arg-type]
        self.store = store
        #: Called when a new session is first stored.
        self.on_created: Callable[[], None] = lambda: None

    @staticmethod
    def _ttl(app: Flask) -> int:
        return int(app.permanent_session_lifetime.total_seconds())

    def open_session(self, app: Flask, request: Request) -> TallySession:
        """Load the client's session, or start a new one under a fresh id."""
        sid = request.cookies.get(self.get_cookie_name(app), "")
        failure = None
        if _SID.fullmatch(sid):
            try:
                record = self.store.load(self._get_store_id(sid))
            except StorageError as exc:
                failure = exc
            else:
                if record is not None:
                    return self.session_class(record, sid=sid)
        # An unknown id is never adopted: that would allow session fixation.
        fresh = self.session_class(sid=self._generate_sid(self.sid_length), permanent=self.permanent)
        fresh.failure = failure
        fresh.new = True
        return fresh

    def update(self, app: Flask, session: TallySession, change: Callable[[Record], Record]) -> Record:
        """Atomically apply ``change`` to the stored session and return the result."""

        def stamped(record: Record) -> Record:
            record = change(record)
            if session.permanent:
                record["_permanent"] = True
            return record

        if session.failure:
            raise session.failure  # never write over a session we could not read
        record = self.store.update(self._get_store_id(session.sid), stamped, self._ttl(app))
        if session.new and not session.stored:
            self.on_created()
        session.replace(record)
        return record

    def should_set_storage(self, app: Flask, session: ServerSideSession) -> bool:
        """Store only what the request changed; never refresh on a read."""
        return bool(session.modified or getattr(session, "stored", False))

    def should_set_cookie(self, app: Flask, session: Any) -> bool:
        """Send the cookie when the session was written during this request."""
        return bool(session.modified or session.stored)

    def _upsert_session(self, session_lifetime: timedelta, session: ServerSideSession, store_id: str) -> None:
        assert isinstance(session, TallySession)
        loaded = session.loaded
        changed = {k: v for k, v in session.items() if k not in loaded or loaded[k] != v}
        removed = loaded.keys() - session.keys()
        if not changed and not removed:
            return
        ttl = int(session_lifetime.total_seconds())
        record = self.store.update(store_id, lambda r: {k: v for k, v in r.items() if k not in removed} | changed, ttl)
        session.replace(record)

    def _retrieve_session_data(self, store_id: str) -> Record | None:
        return self.store.load(store_id)

    def _delete_session(self, store_id: str) -> None:
        self.store.delete(store_id)


def raise_load_failure() -> None:
    """Raise the error that kept this request's session from loading.

    Flask opens the session before its error handlers apply, where an
    exception would become a bare 500; raised here, it is answered as a 503.
    """
    failure = getattr(session, "failure", None)
    if failure is not None:
        raise failure
