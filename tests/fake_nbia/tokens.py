"""Token state of the fake Keycloak behind /nbia-api/oauth/token."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

GUEST = "nbia_guest"


@dataclass
class Grant:
    user: str
    expires_at: float
    session: str


class TokenStore:
    """Issued access and refresh tokens with their expiry on an injectable clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.access: dict[str, Grant] = {}
            self.refresh: dict[str, Grant] = {}
            self.issued: set[str] = set()  # history since reset, valid or not
        self.token_lifetime_seconds: float = 7200
        self.refresh_lifetime_seconds: float = 7200
        self.users: dict[str, str] = {GUEST: ""}
        self.clock: Callable[[], float] = time.monotonic
        self.password_grants = 0
        self.refresh_grants = 0

    def check_password(self, username: str | None, password: str | None) -> bool:
        """The real server swaps in the guest password, so any password works for the guest."""
        if username is None or username not in self.users:
            return False
        return username == GUEST or self.users[username] == (password or "")

    def issue(self, user: str, session: str | None = None) -> dict[str, object]:
        """A Keycloak-shaped token response; the access+refresh pair share a session."""
        now = self.clock()
        session = session or str(uuid.uuid4())
        access = "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(24)
        refresh = "eyJhbGciOiJIUzI1NiJ9." + secrets.token_urlsafe(24)
        with self._lock:
            self.access[access] = Grant(user, now + self.token_lifetime_seconds, session)
            self.issued.add(access)
            self.refresh[refresh] = Grant(user, now + self.refresh_lifetime_seconds, session)
        return {
            "access_token": access,
            "expires_in": int(self.token_lifetime_seconds),
            "refresh_expires_in": int(self.refresh_lifetime_seconds),
            "refresh_token": refresh,
            "token_type": "Bearer",
            "id_token": "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(16),
            "not-before-policy": 0,
            "session_state": session,
            "scope": "openid profile email",
        }

    def user_for_access(self, token: str) -> str | None:
        """The user a still-valid access token belongs to, else None."""
        with self._lock:
            grant = self.access.get(token)
        if grant is None or self.clock() >= grant.expires_at:
            return None
        return grant.user

    def take_refresh(self, token: str | None) -> Grant | None:
        """A valid refresh grant (Keycloak keeps it usable until it expires)."""
        with self._lock:
            grant = self.refresh.get(token or "")
        if grant is None or self.clock() >= grant.expires_at:
            return None
        return grant

    def logout(self, access_token: str) -> bool:
        """End the session of `access_token`: its access and refresh tokens die."""
        with self._lock:
            grant = self.access.get(access_token)
            if grant is None:
                return False
            for table in (self.access, self.refresh):
                for tok in [t for t, g in table.items() if g.session == grant.session]:
                    del table[tok]
            return True

    def revoke_all(self) -> None:
        with self._lock:
            self.access.clear()
            self.refresh.clear()

    def expire_access(self) -> None:
        with self._lock:
            self.access.clear()

    def valid_access_tokens(self) -> set[str]:
        now = self.clock()
        with self._lock:
            return {t for t, g in self.access.items() if now < g.expires_at}
