"""The upstream service token: login, refresh, re-login, renewal on 401, no leaks.

The gateway and the fake upstream share one injected clock, so expiry is reached by advancing it,
never by sleeping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import Clock, GatewayServer, make_settings

ROOT = "/nbia-api/services/getCollectionValuesAndCounts"
V2 = "/nbia-api/services/v2/getCollectionValues"
V4 = "/nbia-api/services/v4/getCollectionValues"
V1 = "/nbia-api/services/v1/getCollectionValues"


@pytest.fixture
def clock(nbia_upstream: FakeServer, nlst_upstream: FakeServer) -> Clock:
    shared = Clock(1_000.0)
    nbia_upstream.app.clock = shared
    nlst_upstream.app.clock = shared
    return shared


def _gateway(
    tmp_path: Path, nbia: FakeServer, nlst: FakeServer, clock: Clock, **extra: Any
) -> GatewayServer:
    # Token behaviour is about forwarding: the cache would answer repeated calls itself.
    settings = make_settings(tmp_path, nbia.url, nlst.url, cache_enabled=False, **extra)
    return GatewayServer(settings, clock=clock)


@pytest.fixture
def timed_gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer, clock: Clock
) -> Iterator[GatewayServer]:
    with _gateway(tmp_path, nbia_upstream, nlst_upstream, clock) as server:
        yield server


def _auth_headers(fake: FakeServer, path: str) -> list[str | None]:
    return [r.headers.get("authorization") for r in fake.app.requests_to(path)]


def test_root_and_v2_calls_carry_the_service_token(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """One login serves many calls; the upstream sees a token it issued, as `Bearer <t>`."""
    for path in (ROOT, V2, ROOT):
        assert httpx.get(timed_gateway.url + path).status_code == 200
    fake = nbia_upstream.app
    assert fake.password_grants == 1
    sent = _auth_headers(nbia_upstream, ROOT) + _auth_headers(nbia_upstream, V2)
    assert len(sent) == 3
    for header in sent:
        assert header is not None and header.startswith("Bearer ")
        assert header.removeprefix("Bearer ") in fake.issued_access_tokens


def test_v4_and_v1_go_anonymous_by_default(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """v4 works as the guest without a token and v1 never reads one: no login happens."""
    for path in (V4, V1):
        assert httpx.get(timed_gateway.url + path).status_code == 200
    assert _auth_headers(nbia_upstream, V4) == [None]
    assert _auth_headers(nbia_upstream, V1) == [None]
    assert nbia_upstream.app.password_grants == 0


def test_token_on_v4_setting_sends_it_on_v4(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer, clock: Clock
) -> None:
    with _gateway(tmp_path, nbia_upstream, nlst_upstream, clock, token_on_v4=True) as gateway:
        assert httpx.get(gateway.url + V4).status_code == 200
    (header,) = _auth_headers(nbia_upstream, V4)
    assert header is not None and header.removeprefix("Bearer ") in (
        nbia_upstream.app.issued_access_tokens
    )


def test_token_is_refreshed_shortly_before_expiry(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    """Inside the refresh margin the gateway uses the refresh grant, not a new login."""
    fake = nbia_upstream.app
    fake.token_lifetime_seconds = 300
    httpx.get(timed_gateway.url + ROOT)
    clock.advance(300 - 30)  # still valid upstream, but within the default 60 s margin
    assert httpx.get(timed_gateway.url + ROOT).status_code == 200
    assert (fake.password_grants, fake.refresh_grants) == (1, 1)
    first, second = _auth_headers(nbia_upstream, ROOT)
    assert first != second


def test_login_again_when_the_refresh_token_has_expired(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    fake = nbia_upstream.app
    fake.token_lifetime_seconds = 300
    fake.refresh_lifetime_seconds = 600
    httpx.get(timed_gateway.url + ROOT)
    clock.advance(1_000)
    assert httpx.get(timed_gateway.url + ROOT).status_code == 200
    assert (fake.password_grants, fake.refresh_grants) == (2, 0)


def test_revoked_token_is_renewed_once_and_the_request_retried(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """An upstream 401 (token revoked early) costs one renewal and one retry, unseen by clients."""
    fake = nbia_upstream.app
    assert httpx.get(timed_gateway.url + ROOT).status_code == 200
    fake.revoke_tokens()
    response = httpx.get(timed_gateway.url + ROOT)
    assert response.status_code == 200
    assert fake.password_grants == 2  # the refresh token was revoked too: a fresh login
    assert len(fake.requests_to(ROOT)) == 3  # ok, 401, retried ok


def test_a_persistent_401_is_returned_after_one_retry(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """The gateway retries once, not forever: a second 401 goes to the client."""
    fake = nbia_upstream.app
    fake.fail_next(10, status=401, path_contains="getCollectionValuesAndCounts")
    assert httpx.get(timed_gateway.url + ROOT).status_code == 401
    assert len(fake.requests_to(ROOT)) == 2


def test_concurrent_requests_share_one_login_and_one_refresh(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    fake = nbia_upstream.app
    fake.token_lifetime_seconds = 300

    def burst() -> list[int]:
        with ThreadPoolExecutor(max_workers=30) as pool:
            return list(
                pool.map(lambda _: httpx.get(timed_gateway.url + ROOT).status_code, range(30))
            )

    assert burst() == [200] * 30
    assert (fake.password_grants, fake.refresh_grants) == (1, 0)
    clock.advance(290)
    assert burst() == [200] * 30
    assert (fake.password_grants, fake.refresh_grants) == (1, 1)


def test_client_authorization_is_never_forwarded(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """A client's own bearer token stays at the gateway, on anonymous and token paths alike."""
    headers = {"Authorization": "Bearer client-own-token-123"}
    httpx.get(timed_gateway.url + V4, headers=headers)
    httpx.get(timed_gateway.url + ROOT, headers=headers)
    assert _auth_headers(nbia_upstream, V4) == [None]
    (root_header,) = _auth_headers(nbia_upstream, ROOT)
    assert root_header is not None and "client-own-token-123" not in root_header


def test_nlst_has_its_own_service_token(
    timed_gateway: GatewayServer, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    assert httpx.get(timed_gateway.url + "/nlst" + ROOT).status_code == 200
    assert nlst_upstream.app.password_grants == 1
    assert nbia_upstream.app.password_grants == 0
    (header,) = _auth_headers(nlst_upstream, ROOT)
    assert header is not None and header.removeprefix("Bearer ") in (
        nlst_upstream.app.issued_access_tokens
    )


def test_failed_login_is_a_502_that_names_no_secret(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer, clock: Clock
) -> None:
    nbia_upstream.app.users = {"lab-svc": "the-right-one"}
    with _gateway(
        tmp_path, nbia_upstream, nlst_upstream, clock, username="lab-svc", password="wrong-pw-42"
    ) as gateway:
        response = httpx.get(gateway.url + ROOT)
    assert response.status_code == 502
    body = response.json()
    assert body["upstream"] == "nbia" and "login" in body["error"]
    assert "wrong-pw-42" not in response.text
    assert nbia_upstream.app.requests_to(ROOT) == []  # nothing was sent without a token


def test_no_token_or_password_in_responses_or_logs(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exercise login, refresh, revocation and errors at DEBUG; no secret shows up anywhere."""
    caplog.set_level(logging.DEBUG)
    fake = nbia_upstream.app
    password = "pw-Sup3r-S3cret-9"
    fake.users = {"lab-svc": password}
    fake.token_lifetime_seconds = 300
    seen: list[httpx.Response] = []
    refresh_tokens: set[str] = set()
    with _gateway(
        tmp_path, nbia_upstream, nlst_upstream, clock, username="lab-svc", password=password
    ) as gateway:
        for step in range(4):
            for path in (ROOT, V2, V4, "/nbia-api/services/v2/getNoSuchThing"):
                seen.append(httpx.get(gateway.url + path))
            refresh_tokens |= set(fake.tokens.refresh)
            if step == 1:
                fake.revoke_tokens()
            clock.advance(280)
        fake.fail_next(1, status=500, include_token=True)
        fake.revoke_tokens()
        seen.append(httpx.get(gateway.url + ROOT))
    secrets = {password} | fake.issued_access_tokens | refresh_tokens
    assert len(fake.issued_access_tokens) >= 3
    captured = caplog.text
    for response in seen:
        text = response.text + repr(dict(response.headers))
        for secret in secrets:
            assert secret not in text
    for secret in secrets:
        assert secret not in captured
