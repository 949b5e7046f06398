"""Tokens the gateway issues to its own clients: the client side of NBIA's token protocol.

Clients written against the NBIA guide (and the NBIA Data Retriever) first POST to
``/nbia-api/oauth/token`` and then send ``Authorization: Bearer <token>``. The gateway answers
that endpoint itself, in NBIA's (Keycloak's) JSON shape, with tokens of its own; the client's
credentials never travel upstream. Who may log in is the :class:`LoginAuthority`'s decision:
anyone in open mode, lab accounts in accounts mode.

Tokens are signed (HMAC-SHA256), not looked up: any worker process or replica that shares the
signing secret accepts them without a database read. The signing key is derived from that secret
for one access mode and one deployment (:func:`signing_key`), so a token an open-mode gateway
hands anyone is worthless to an accounts-mode gateway on the same database. Logout and refresh
end a token's session; ended sessions are remembered until their tokens would have expired anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cachetools import LRUCache

_ACCESS, _REFRESH = "a", "r"
_MEMO_LIMIT = 10_000
#: Shortest secret accepted from a ``token_secret_file`` (32 characters: 128 bits as hex).
MIN_SECRET_LENGTH = 32


def signing_key(secret: bytes, mode: str, deployment: str) -> bytes:
    """The key that signs the tokens of one access ``mode`` of one ``deployment``.

    Replicas of a deployment share ``secret`` and ``deployment`` and so accept each other's
    tokens; a gateway in another mode, or of another deployment that reuses the secret, does not.
    """
    label = f"nbia-proxy tokens/{mode}/{deployment}".encode()
    return hmac.new(secret, label, hashlib.sha256).digest()


def read_secret_file(path: Path) -> bytes:
    """The signing secret kept in ``path`` (surrounding white space dropped)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token_secret_file {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"the token_secret_file {path} must hold at least {MIN_SECRET_LENGTH} characters "
            f"(make one with: openssl rand -hex 32 > {path})"
        )
    return secret


class LoginAuthority(Protocol):
    """Decides who may log in, and whether a token's account is still allowed in."""

    def check_login(self, username: str, password: str) -> str | None:
        """The account name for these credentials, or None."""

    def still_valid(self, subject: str, issued_at: float) -> bool:
        """Whether a token issued to ``subject`` at ``issued_at`` may still be used."""


class AnyLogin:
    """Open mode: any non-empty user name logs in (the shape matters, not the check)."""

    def check_login(self, username: str, password: str) -> str | None:
        return username or None

    def still_valid(self, subject: str, issued_at: float) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """An HTTP answer for the token or logout endpoint."""

    status: int
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Claims:
    kind: str
    session: str
    issued_at: float
    expires_at: float
    subject: str


class ClientTokens:
    """Issues, verifies, refreshes and ends gateway tokens."""

    def __init__(
        self,
        lifetime_seconds: int,
        clock: Callable[[], float] = time.time,
        authority: LoginAuthority | None = None,
        secret: bytes | None = None,
    ) -> None:
        self._lifetime = lifetime_seconds
        self.clock = clock
        self.authority: LoginAuthority = authority or AnyLogin()
        self._secret = secret or secrets.token_bytes(32)
        self._ended: dict[str, float] = {}  # session id -> when its tokens expire anyway
        self._newly_ended: list[tuple[str, float]] = []
        # Verified tokens: skip the HMAC next time. Only the signature check is saved: expiry,
        # ended sessions and the account are checked on every use.
        self._memo: LRUCache[str, _Claims] = LRUCache(_MEMO_LIMIT)
        self.version = 0  # moves whenever a session ends: answers derived before may be stale

    def use_secret(self, secret: bytes) -> None:
        """Sign with ``secret`` (a :func:`signing_key` shared by replicas); tokens signed
        before stop working."""
        self._secret = secret
        self._memo = LRUCache(_MEMO_LIMIT)
        self.version += 1

    def learn_ended(self, ended: dict[str, float]) -> None:
        """Sessions other replicas ended (logout, refresh), read from the database."""
        if not ended.keys() <= self._ended.keys():
            self._ended.update(ended)
            self.version += 1

    def take_newly_ended(self) -> list[tuple[str, float]]:
        """Sessions ended here since the last call, for the database."""
        taken, self._newly_ended = self._newly_ended, []
        return taken

    def keep_unwritten(self, ended: list[tuple[str, float]]) -> None:
        """Give back sessions the database did not take, for the next call to return."""
        self._newly_ended = ended + self._newly_ended

    def answer_token_request(self, form: dict[str, str]) -> TokenAnswer:
        """Answer a token request (password or refresh_token grant) in NBIA's shape."""
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
        if grant_type == "password":
            subject = self.authority.check_login(form.get("username", ""), form.get("password", ""))
            if subject is None:
                return _oauth_error(401, "invalid_grant", "Invalid user credentials")
            return TokenAnswer(200, self._issue(subject))
        if grant_type == "refresh_token":
            claims = self._valid_claims(form.get("refresh_token", ""), _REFRESH)
            if claims is None:
                return _oauth_error(400, "invalid_grant", "Token is not active")
            self._end(claims)
            return TokenAnswer(200, self._issue(claims.subject))
        return _oauth_error(
            400,
            "unsupported_grant_type",
            "Wrong grant_type entered. Valid grant_type is password or refresh_token.",
        )

    def answer_logout(self, authorization: str | None) -> TokenAnswer:
        """End the session of a logout request's bearer token."""
        token = bearer_of(authorization)
        claims = self._valid_claims(token, _ACCESS) if token else None
        if claims is None:
            return TokenAnswer(401, {"error": "No valid token."})
        self._end(claims)
        return TokenAnswer(204, None)

    def subject_of(self, authorization: str | None) -> str | None:
        """The account behind a valid gateway access token, or None."""
        found = self.session_of(authorization)
        return found[0] if found else None

    def session_of(self, authorization: str | None) -> tuple[str, float] | None:
        """The account behind a valid gateway access token and when the token expires."""
        token = bearer_of(authorization)
        claims = self._valid_claims(token, _ACCESS) if token else None
        return (claims.subject, claims.expires_at) if claims else None

    def genuine(self, authorization: str | None) -> bool:
        """Whether a bearer token carries this gateway's signature, valid or not (expired,
        ended, of a revoked user): presenting one is a stale credential, not a guess."""
        token = bearer_of(authorization)
        return token is not None and (token in self._memo or self._verify(token) is not None)

    def _valid_claims(self, token: str, kind: str) -> _Claims | None:
        claims = self._memo.get(token)
        if claims is None:
            claims = self._verify(token)
            if claims is None:
                return None
            self._memo[token] = claims
        if (
            claims.kind != kind
            or self.clock() >= claims.expires_at
            or claims.session in self._ended
            or not self.authority.still_valid(claims.subject, claims.issued_at)
        ):
            return None
        return claims

    def _verify(self, token: str) -> _Claims | None:
        encoded, _, signature = token.partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        # Bytes, not str: compare_digest refuses non-ASCII strings, and headers may hold any.
        if not hmac.compare_digest(
            signature.encode("utf-8", "replace"), self._sign(payload).encode()
        ):
            return None
        kind, session, issued, expires, subject = payload.decode().split("|", 4)
        return _Claims(kind, session, float(issued), float(expires), subject)

    def _sign(self, payload: bytes) -> str:
        digest = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _token(self, kind: str, session: str, issued: float, expires: float, subject: str) -> str:
        payload = f"{kind}|{session}|{issued!r}|{expires!r}|{subject}".encode()
        return base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + self._sign(payload)

    def _issue(self, subject: str) -> dict[str, Any]:
        self._sweep()
        now = self.clock()
        session = uuid.uuid4()
        expires = now + self._lifetime
        return {
            "access_token": self._token(_ACCESS, session.hex, now, expires, subject),
            "expires_in": self._lifetime,
            "refresh_expires_in": self._lifetime,
            "refresh_token": self._token(_REFRESH, session.hex, now, expires, subject),
            "token_type": "Bearer",
            "id_token": secrets.token_urlsafe(24),
            "not-before-policy": 0,
            "session_state": str(session),
            "scope": "openid profile email",
        }

    def _end(self, claims: _Claims) -> None:
        self.version += 1
        self._ended[claims.session] = claims.expires_at
        self._newly_ended.append((claims.session, claims.expires_at))

    def _sweep(self) -> None:
        """Forget ended sessions whose tokens have expired, so memory stays bounded."""
        now = self.clock()
        for session in [s for s, expires in self._ended.items() if now >= expires]:
            del self._ended[session]


def bearer_of(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer ...`` header (scheme case-insensitive)."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def _oauth_error(status: int, error: str, description: str) -> TokenAnswer:
    return TokenAnswer(status, {"error": error, "error_description": description})
