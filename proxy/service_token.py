"""The upstream service token: obtained, refreshed and renewed by the gateway alone.

One :class:`ServiceToken` per upstream. It logs in with the password grant on first use,
refreshes with the refresh token shortly before expiry, falls back to a fresh login when the
refresh fails, and lets only one coroutine talk to the token endpoint at a time, so a burst
of requests with an expired token causes one login, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from proxy.errors import GatewayError, ServiceTokenError, host_label, transport_error

log = logging.getLogger("nbia_proxy.token")


@dataclass(frozen=True, slots=True)
class _Grant:
    access: str
    refresh: str | None
    expires_at: float
    refresh_expires_at: float


class ServiceToken:
    """Keeps a valid bearer token for one upstream account."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        token_url: str,
        upstream: str,
        username: str,
        password: SecretStr,
        client_id: str,
        refresh_margin_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._upstream = upstream
        self._username = username
        self._password = password
        self._client_id = client_id
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._grant: _Grant | None = None
        self._lock = asyncio.Lock()
        self.logins = 0
        self.renewals = 0  # tokens obtained (refreshed or by logging in)
        self.renewal_failures = 0  # attempts that got no token
        #: Why the last attempt got no token and when (wall clock); None once one succeeds.
        self.last_failure: str | None = None
        self.last_failure_at: float | None = None

    @property
    def username(self) -> str:
        return self._username

    async def get(self) -> str:
        """Return a token that stays valid for at least the refresh margin."""
        grant = self._grant
        if grant is not None and self._is_fresh(grant):
            return grant.access
        async with self._lock:
            # Whoever held the lock before us may already have renewed it.
            if self._grant is not None and self._is_fresh(self._grant):
                return self._grant.access
            self._grant = await self._counted(self._grant)
            return self._grant.access

    async def renew_after_rejection(self, rejected: str) -> str:
        """The upstream answered 401 to ``rejected``: obtain a new token, once for everyone."""
        async with self._lock:
            current = self._grant
            if current is not None and current.access != rejected and self._is_fresh(current):
                return current.access
            self._grant = await self._counted(current)
            return self._grant.access

    async def _counted(self, current: _Grant | None) -> _Grant:
        try:
            grant = await self._obtain(current)
        except Exception as exc:  # not a cancellation
            self.renewal_failures += 1
            # The gateway's own messages name the host and the cause, never a secret.
            reason = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            self.last_failure, self.last_failure_at = reason, time.time()
            raise
        self.renewals += 1
        self.last_failure = self.last_failure_at = None
        return grant

    def expires_in(self) -> float | None:
        """Seconds until the current token expires (negative once it has); None before the
        first login. Never the token itself."""
        grant = self._grant
        return None if grant is None else grant.expires_at - self._clock()

    def state(self) -> str:
        """``none`` (no login yet), ``valid``, ``renewing`` (within the refresh margin),
        ``expired``, or ``failing`` (the last renewal got no token)."""
        if self.last_failure is not None:
            return "failing"
        left = self.expires_in()
        if left is None:
            return "none"
        if left <= 0:
            return "expired"
        return "renewing" if left <= self._margin else "valid"

    def _is_fresh(self, grant: _Grant) -> bool:
        return self._clock() < grant.expires_at - self._margin

    async def _obtain(self, current: _Grant | None) -> _Grant:
        if (
            current is not None
            and current.refresh is not None
            and self._clock() < current.refresh_expires_at
        ):
            try:
                grant = await self._post(
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": current.refresh,
                        "client_id": self._client_id,
                        "username": self._username,
                    }
                )
                log.info("service token refreshed for upstream %s", self._upstream)
                return grant
            except ServiceTokenError:
                log.info("refresh refused by upstream %s; logging in again", self._upstream)
        grant = await self._post(
            {
                "username": self._username,
                "password": self._password.get_secret_value(),
                "client_id": self._client_id,
                "grant_type": "password",
            }
        )
        self.logins += 1
        log.info("service account %s logged in to upstream %s", self._username, self._upstream)
        return grant

    async def _post(self, form: dict[str, str]) -> _Grant:
        # Messages name the host and the cause, never the password, a token or the form.
        try:
            response = await self._client.post(self._token_url, data=form)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, during="service account login") from exc
        host = host_label(response.request.url)
        if response.status_code != 200:
            status = response.status_code
            outcome = (
                "refused the service account login"
                if status in (400, 401, 403)
                else "answered the service account login with an error"
            )
            raise ServiceTokenError(
                f"upstream {host} {outcome} (status {status})",
                upstream=self._upstream,
                upstream_status=response.status_code,
            )
        try:
            body = response.json()
            access = str(body["access_token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceTokenError(
                f"upstream {host} answered the service account login unreadably",
                upstream=self._upstream,
                upstream_status=response.status_code,
            ) from exc
        if not _BEARER_TOKEN.fullmatch(access):
            # It goes into an Authorization header, written by hand on the binary path.
            raise ServiceTokenError(
                f"upstream {host} sent a service token that is not a valid bearer token",
                upstream=self._upstream,
                upstream_status=response.status_code,
            )
        now = self._clock()
        expires_in = _seconds(body.get("expires_in"), 7200.0)
        refresh_in = _seconds(body.get("refresh_expires_in"), expires_in)
        refresh = body.get("refresh_token")
        return _Grant(
            access=access,
            refresh=str(refresh) if refresh else None,
            expires_at=now + expires_in,
            refresh_expires_at=now + refresh_in,
        )


#: RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _seconds(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
