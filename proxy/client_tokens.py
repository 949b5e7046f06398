"""Tokens the gateway issues to its own clients: the client side of NBIA's token protocol.

Clients written against the NBIA guide (and the NBIA Data Retriever) first POST to
``/nbia-api/oauth/token`` and then send ``Authorization: Bearer <token>``. The gateway answers
that endpoint itself, in NBIA's (Keycloak's) JSON shape, with tokens of its own; the client's
credentials never travel upstream. For now any credentials are accepted.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Session:
    subject: str
    access: str
    refresh: str
    expires_at: float
    refresh_expires_at: float


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """An HTTP answer for the token or logout endpoint."""

    status: int
    body: dict[str, Any] | None


class ClientTokens:
    """Issues, refreshes and revokes gateway tokens; kept in memory."""

    def __init__(self, lifetime_seconds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._lifetime = lifetime_seconds
        self._clock = clock
        self._by_access: dict[str, _Session] = {}
        self._by_refresh: dict[str, _Session] = {}

    def answer_token_request(self, form: dict[str, str]) -> TokenAnswer:
        """Answer a token request (password or refresh_token grant) in NBIA's shape."""
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
        if grant_type == "password":
            username = form.get("username", "")
            if not username:
                return _oauth_error(401, "invalid_grant", "Invalid user credentials")
            return TokenAnswer(200, self._issue(username))
        if grant_type == "refresh_token":
            session = self._by_refresh.get(form.get("refresh_token", ""))
            if session is None or self._clock() >= session.refresh_expires_at:
                return _oauth_error(400, "invalid_grant", "Token is not active")
            self._drop(session)
            return TokenAnswer(200, self._issue(session.subject))
        return _oauth_error(
            400,
            "unsupported_grant_type",
            "Wrong grant_type entered. Valid grant_type is password or refresh_token.",
        )

    def answer_logout(self, authorization: str | None) -> TokenAnswer:
        """Revoke the bearer token of a logout request."""
        token = _bearer(authorization)
        session = self._by_access.get(token) if token else None
        if session is None:
            return TokenAnswer(401, {"error": "No valid token."})
        self._drop(session)
        return TokenAnswer(204, None)

    def subject_of(self, authorization: str | None) -> str | None:
        """The account behind a valid gateway token, or None."""
        token = _bearer(authorization)
        session = self._by_access.get(token) if token else None
        if session is None or self._clock() >= session.expires_at:
            return None
        return session.subject

    def _issue(self, subject: str) -> dict[str, Any]:
        self._sweep()
        now = self._clock()
        session = _Session(
            subject=subject,
            access=secrets.token_urlsafe(32),
            refresh=secrets.token_urlsafe(32),
            expires_at=now + self._lifetime,
            refresh_expires_at=now + self._lifetime,
        )
        self._by_access[session.access] = session
        self._by_refresh[session.refresh] = session
        return {
            "access_token": session.access,
            "expires_in": self._lifetime,
            "refresh_expires_in": self._lifetime,
            "refresh_token": session.refresh,
            "token_type": "Bearer",
            "id_token": secrets.token_urlsafe(24),
            "not-before-policy": 0,
            "session_state": str(uuid.uuid4()),
            "scope": "openid profile email",
        }

    def _drop(self, session: _Session) -> None:
        self._by_access.pop(session.access, None)
        self._by_refresh.pop(session.refresh, None)

    def _sweep(self) -> None:
        """Forget sessions whose refresh token has expired, so memory stays bounded."""
        now = self._clock()
        for session in [s for s in self._by_refresh.values() if now >= s.refresh_expires_at]:
            self._drop(session)


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def _oauth_error(status: int, error: str, description: str) -> TokenAnswer:
    return TokenAnswer(status, {"error": error, "error_description": description})
