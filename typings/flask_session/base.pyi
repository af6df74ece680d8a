"""The part of Flask-Session 0.8's ``flask_session.base`` that Tally uses, typed."""

from datetime import timedelta
from typing import Any

from flask import Flask
from flask.sessions import SecureCookieSession, SessionInterface

class ServerSideSession(SecureCookieSession):
    sid: str
    modified: bool
    accessed: bool
    def __init__(
        self, initial: dict[str, Any] | None = None, sid: str | None = None, permanent: bool | None = None
    ) -> None: ...

class ServerSideSessionInterface(SessionInterface):
    key_prefix: str
    sid_length: int
    def __init__(
        self,
        app: Flask | None,
        key_prefix: str = ...,
        use_signer: bool = ...,
        permanent: bool = ...,
        sid_length: int = ...,
        serialization_format: str = ...,
        cleanup_n_requests: int | None = ...,
    ) -> None: ...
    def _generate_sid(self, session_id_length: int) -> str: ...
    def _get_store_id(self, sid: str) -> str: ...
    def _upsert_session(self, session_lifetime: timedelta, session: ServerSideSession, store_id: str) -> None: ...
    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None: ...
    def _delete_session(self, store_id: str) -> None: ...
