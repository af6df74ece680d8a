"""TLS and a password in each of Tally's three Redis URL forms, against real servers.

One server (``rediss://``), a Sentinel set-up (``rediss+sentinel://``) and a Cluster
(``rediss+cluster://``), each listening with TLS only (``port 0``) on a certificate of a CA
made for the test by ``trustme``, and each requiring ``topologies.PASSWORD``, a password that a
URL must percent-encode. Every test runs on each form; the topology is the test's own.

* The right URL counts, and the keys are where they should be, as read by a client of our own.
* A wrong password is a 503 that says the credentials were refused, never a 500.
* A server that cannot be trusted (the system's CAs do not know the test's CA), or a plain
  ``redis://`` client on the TLS-only port, is a 503, never a 500.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import redis
from flask import Flask
from werkzeug.test import TestResponse

from tally import create_app
from tally.sessions import TallySessionInterface
from tally.store.redis import RedisStore
from topologies import ClusterSetup, RedisNode, SentinelSetup

PREFIX = "t:"
WRONG_PASSWORD = "not-the-password"
REFUSED = "Redis refused our credentials"
#: The routes a refusal is checked on: writes of both kinds, a read, and the health check.
ROUTES = ("/inc", "/global/inc", "/global", "/healthz")


@dataclass
class Secured:
    """One secured topology, seen the same way whatever its form."""

    form: str
    #: ``url_with`` of the node or set-up: its URL with another password, without TLS, or without the CA.
    url_with: Callable[..., str]
    #: The data nodes that serve writes now.
    primaries: Callable[[], list[RedisNode]]
    #: Every process a client may reach: data nodes, and Sentinels.
    processes: list[RedisNode]

    @property
    def url(self) -> str:
        """The right URL: TLS, this CA, the password."""
        return self.url_with()


@pytest.fixture(params=["rediss", "rediss+sentinel", "rediss+cluster"])
def secured(request: pytest.FixtureRequest) -> Secured:
    """Each URL form in turn, on its own TLS-only, password-protected topology."""
    form = str(request.param)
    if form == "rediss":
        node: RedisNode = request.getfixturevalue("secure_redis")
        return Secured(form, node.url_with, lambda: [node], [node])
    if form == "rediss+sentinel":
        sentinels: SentinelSetup = request.getfixturevalue("secure_sentinel_setup")
        return Secured(
            form, sentinels.url_with, lambda: [sentinels.current_primary()], [*sentinels.nodes, *sentinels.sentinels]
        )
    cluster: ClusterSetup = request.getfixturevalue("secure_redis_cluster")
    return Secured(form, cluster.url_with, cluster.primaries, list(cluster.nodes))


def make_app(url: str, tmp_path: Path, **settings: object) -> Flask:
    # A short timeout: nothing here should wait, and a hang would show as a 503 within a second.
    config = {"REDIS_URL": url, "SECRET_KEY": "k", "REDIS_PREFIX": PREFIX, "REDIS_TIMEOUT": 1.0, **settings}
    return create_app(config, instance_path=str(tmp_path / "i"))


def close(app: Flask) -> None:
    """Close the app's Redis connections (create_app leaves that to the process's end)."""
    interface = app.session_interface
    assert isinstance(interface, TallySessionInterface) and isinstance(interface.store, RedisStore)
    interface.store.close()


def describe(response: TestResponse) -> str:
    return f"{response.status_code} {response.headers.get('Retry-After')!r} {response.get_data(as_text=True)!r}"


def answers(url: str, tmp_path: Path) -> dict[str, TestResponse]:
    """What a fresh app on ``url`` answers on each of ``ROUTES``."""
    app = make_app(url, tmp_path)
    try:
        client = app.test_client()
        return {route: client.get(route) for route in ROUTES}
    finally:
        close(app)


def all_keys(secured: Secured) -> dict[str, Any]:
    """Every key under ``PREFIX`` on the primaries, with its value, read by a TLS client of our own."""
    found: dict[str, Any] = {}
    for node in secured.primaries():
        with node.client() as direct:  # TLS, trusting the test's CA, with the password
            for key in direct.scan_iter(match=PREFIX + "*", count=1000):
                found[key] = direct.hgetall(key) if direct.type(key) == "hash" else direct.get(key)
    return found


def test_tally_counts_over_tls_with_a_password(secured: Secured, tmp_path: Path) -> None:
    # First, that the servers really ask for both: no password, or no TLS, and they refuse.
    for process in secured.processes:
        with process.client(password=None) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with process.client(ssl=False) as plain, pytest.raises(redis.ConnectionError):
            plain.ping()

    app = make_app(secured.url, tmp_path)
    try:
        client = app.test_client()
        assert client.get("/inc").text == "counter is 1"
        assert client.get("/inc?by=4").text == "counter is 5"
        assert client.get("/global/inc").text == "global counter is 1"
        assert client.get("/counter").text == "counter is 5"
        health = client.get("/healthz")
        assert health.status_code == 200, describe(health)
        cookie = client.get_cookie("session")
        assert cookie is not None
    finally:
        close(app)

    session_key = PREFIX + "session:" + hashlib.sha256(f"session:{cookie.value}".encode()).hexdigest()
    keys = all_keys(secured)
    keys.pop(PREFIX + "healthz", None)  # /healthz's own write
    assert keys == {PREFIX + "global": "1", session_key: {"counter": "5", "_v": "2", "_w": ANY}}


def test_the_new_session_quota_is_kept_in_the_same_secured_redis(secured: Secured, tmp_path: Path) -> None:
    """The quota is on by default in production (the suite turns it off elsewhere): it reads the same URL."""
    app = make_app(secured.url, tmp_path, NEW_SESSIONS_PER_MINUTE=2)
    try:
        assert [app.test_client().get("/inc").text for _ in range(2)] == ["counter is 1"] * 2
        refused = app.test_client().get("/inc")
        assert refused.status_code == 429 and "2 new sessions in the last minute" in refused.text
    finally:
        close(app)
    written: list[bytes] = []
    for node in secured.primaries():
        with node.client() as direct:
            written += direct.keys(PREFIX + "quota*")
    assert written, "the count is in Redis, over TLS with the password"


def test_a_wrong_password_is_a_503_saying_the_credentials_were_refused(secured: Secured, tmp_path: Path) -> None:
    # On Sentinel the sentinels refuse it first (they take the URL's password too), and Tally
    # never learns where the primary is: what the user must read is still that the credentials
    # were refused, not that there is no primary, for no failover will ever end this.
    got = answers(secured.url_with(password=WRONG_PASSWORD), tmp_path)
    assert all(response.status_code == 503 for response in got.values()), {r: describe(a) for r, a in got.items()}
    assert all(response.headers.get("Retry-After") for response in got.values())
    texts = {route: got[route].text for route in ROUTES if route != "/healthz"}
    assert texts == dict.fromkeys(texts, REFUSED)
    health = got["/healthz"].get_json()
    assert (health["kind"], health["reason"]) == ("permission", REFUSED), health


def test_tls_without_our_ca_or_without_tls_is_a_503(secured: Secured, tmp_path: Path) -> None:
    # ssl_cert_reqs=required with no ssl_ca_certs: the system's CAs, which do not know the test's.
    untrusted = secured.url_with(ca=False, query="ssl_cert_reqs=required")
    plain = secured.url_with(tls=False)  # redis://, redis+sentinel://, redis+cluster:// to TLS-only ports
    assert untrusted.startswith("rediss") and "ssl_ca_certs" not in untrusted
    assert plain.startswith("redis") and not plain.startswith("rediss")
    # Both are tried before anything is asserted, so that one failing does not hide the other.
    got = {
        f"{name} {route}": response
        for name, url in (("no CA", untrusted), ("plain", plain))
        for route, response in answers(url, tmp_path / name.replace(" ", "-")).items()
    }
    seen = {case: describe(response) for case, response in got.items()}
    assert all(response.status_code == 503 for response in got.values()), seen
    assert all(response.headers.get("Retry-After") for response in got.values()), seen
    assert not any(REFUSED in response.text for response in got.values()), seen
