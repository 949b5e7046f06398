"""Who may use the gateway: open mode (anyone who can reach it) or lab accounts.

In ``accounts`` mode every NBIA path needs a lab credential: an API key sent as
``Authorization: Bearer <key>`` (or as the password of HTTP Basic), or a gateway token obtained
from ``/nbia-api/oauth/token`` with the user name and key. The control endpoints under
``/_proxy/`` need an admin account; ``/healthz`` needs nothing. Wrong credentials count
against the client's address (:mod:`proxy.accounts.lockout`), but a valid credential is always
admitted: a lockout slows down only further failures, so one client cannot lock out everyone
behind the same address (a JupyterHub host, a NAT). Per-user limits come from
:mod:`proxy.accounts.fairness`.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

from cachetools import LRUCache

from proxy.accounts.directory import Directory
from proxy.accounts.fairness import UserLimits
from proxy.accounts.lockout import Lockout
from proxy.accounts.registry import Registry
from proxy.client_tokens import ClientTokens, bearer_of
from proxy.headers import RawHeaders, find


@dataclass(frozen=True, slots=True)
class Principal:
    """The account a request acts for."""

    name: str
    admin: bool


_KNOWN_LIMIT = 10_000

#: Open mode: whoever reaches the gateway (loopback unless told otherwise) may do anything.
ANONYMOUS = Principal("anonymous", admin=True)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is turned away, as the gateway's JSON error."""

    status: int
    message: str
    retry_after: float | None = None

    @property
    def challenge(self) -> bool:
        """Whether the answer carries ``WWW-Authenticate`` (a 401)."""
        return self.status == 401


class Access:
    """The access policy of one gateway process."""

    def __init__(
        self,
        tokens: ClientTokens,
        directory: Directory | None = None,
        registry: Registry | None = None,
        lockout: Lockout | None = None,
        limits: UserLimits | None = None,
    ) -> None:
        self.tokens = tokens
        self.directory = directory
        self.registry = registry  # where the token secret and ended sessions are shared
        self.accounts = directory is not None
        self.lockout = lockout or Lockout(free_failures=5, max_seconds=0)
        self.limits = limits or UserLimits(0, 0)
        self._clock = tokens.clock
        # Raw Authorization header -> (principal, versions it was derived at, valid until).
        # Each answer is checked against the versions and the time when read, so an entry past
        # its token's expiry or a revocation is never used: it waits for eviction, and an LRU
        # (not a TTL cache) keeps the lookup on every request cheap.
        self._known: LRUCache[bytes, tuple[Principal, tuple[int, int], float]] = LRUCache(
            _KNOWN_LIMIT
        )

    def identify(self, headers: RawHeaders) -> Principal | None:
        """The account behind a request's credentials; None in accounts mode when there is
        no valid one. In open mode a gateway token names its account, else anonymous."""
        raw = find(headers, b"authorization")
        if self.directory is None:
            if raw is None:
                return ANONYMOUS
            subject = self.tokens.subject_of(raw.decode("latin-1"))
            return Principal(subject, admin=True) if subject else ANONYMOUS
        if raw is None:
            return None
        # The same header again: skip the hash or signature check while nothing it depends
        # on (the users, the ended sessions, the token's lifetime) has changed.
        versions = (self.directory.version, self.tokens.version)
        known = self._known.get(raw)
        if known is not None and known[1] == versions and self._clock() < known[2]:
            return known[0]
        principal, valid_until = self._verify(raw.decode("latin-1"), self.directory)
        if principal is not None:
            self._known[raw] = (principal, versions, valid_until)
        return principal

    def _verify(self, authorization: str, directory: Directory) -> tuple[Principal | None, float]:
        """Check a credential: the principal, and until when that answer holds at most."""
        forever = math.inf
        if authorization[:6].lower() == "basic ":
            # HTTP Basic with the key as password: what requests sends from ~/.netrc.
            name = directory.check_login(*_basic_pair(authorization[6:]))
            user = directory.user(name) if name else None
        else:
            credential = bearer_of(authorization)
            if credential is None:
                return None, forever
            user = directory.user_for_key(credential)
            if user is None:
                # A gateway token: ClientTokens asks the directory whether its user is valid.
                session = self.tokens.session_of("Bearer " + credential)
                user = directory.user(session[0]) if session else None
                forever = session[1] if session else forever
        return (Principal(user.name, user.admin) if user else None), forever

    async def check(
        self, headers: RawHeaders, address: str, *, admin: bool = False
    ) -> Principal | Refusal:
        """Admit a request that needs an account (an admin one when ``admin``), or refuse it.

        A valid credential is admitted even from a locked-out address; a wrong one counts
        against ``address``, and while it is locked out gets 429 instead of 401.
        """
        if self.directory is None:
            return ANONYMOUS  # open mode admits everyone; audit_name says who it was
        principal = self.identify(headers)
        if principal is None:
            raw = find(headers, b"authorization")
            if raw is None:
                return Refusal(401, "authentication required")
            # A token signed here but expired, ended or of a revoked user is stale, not a guess.
            stale = self.tokens.genuine(raw.decode("latin-1"))
            health = self.directory.health
            if not stale and health.reason is not None:
                # Perhaps a user added since the last snapshot: unknown, not wrong (and not
                # counted against the address).
                return Refusal(
                    503,
                    "the accounts database is unreachable: only credentials this gateway "
                    "already knows are accepted until it answers again",
                    health.retry_seconds,
                )
            refusal = None if stale else await self._failed(address)
            return refusal or Refusal(401, "invalid or expired credentials")
        if admin and not principal.admin:
            return Refusal(403, "an admin account is required")
        if not admin:
            wait = await self.limits.check(principal.name)
            if wait:
                return Refusal(429, "request rate limit of this account reached", wait)
        return principal

    def quick_principal(self, headers: RawHeaders, address: str) -> Principal | None:
        """For an answer from memory: the principal when nothing stands in the way, else None
        (the full path then decides, and writes and counts any refusal). ``address`` does not
        matter: a valid credential gets in from a locked-out address too."""
        if self.directory is None:
            return ANONYMOUS
        return self.identify(headers)

    def audit_name(self, principal: Principal, headers: RawHeaders) -> str:
        """The user for the audit log: the admitted account, or in open mode the account a
        gateway token names (looked up only when auditing, off the hot path)."""
        if self.directory is not None:
            return principal.name
        identified = self.identify(headers)
        return identified.name if identified else ANONYMOUS.name

    async def login_failed(self, address: str) -> Refusal | None:
        """Count a refused login against ``address`` (accounts mode only); the 429 to answer
        instead of the 401 while the address is locked out, else None."""
        return await self._failed(address) if self.accounts else None

    async def _failed(self, address: str) -> Refusal | None:
        """Count wrong credentials; refuse them with 429 if ``address`` was locked out already
        (the same answer whatever was wrong with them), else None."""
        locked, left = await self.lockout.record_failure(address)
        if not locked:
            return None
        self.lockout.refused += 1
        return Refusal(429, "too many failed logins from this address", left)


def _basic_pair(encoded: str) -> tuple[str, str]:
    """User name and password of HTTP Basic credentials ("", "" when malformed)."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), non-ASCII, or not UTF-8 underneath
        return "", ""
    name, _, password = decoded.partition(":")
    return name, password
