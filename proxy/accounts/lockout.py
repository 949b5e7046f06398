"""Slowing down credential guessing: an address that keeps presenting wrong credentials is
locked out for a while, growing with each further failure.

A lockout holds back failures only: while it lasts, wrong credentials from that address get
429 (with ``Retry-After``) instead of 401, and each one extends it; a valid credential from the
same address is admitted as ever (:class:`proxy.access.Access`), so a client that keeps failing
slows down itself and nobody else behind its address.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from proxy.shield.shared import SharedAccounts, StoreDown

_FORGET_AFTER_SECONDS = 600.0  # failures older than this (with none since) are forgotten
_MAX_ADDRESSES = 65_536


class Lockout:
    """Failure counts and lockouts per client address."""

    def __init__(
        self,
        free_failures: int,
        max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.max_seconds = max_seconds
        self._clock = clock
        self._failures: TTLCache[str, int] = TTLCache(
            _MAX_ADDRESSES, _FORGET_AFTER_SECONDS, timer=clock
        )
        self._until: dict[str, float] = {}
        self.refused = 0  # wrong credentials answered 429 because their address was locked out
        self.lockouts = 0  # times an address was locked out (not counting extensions)
        #: The deployment's counts and lockouts (Redis); None, or the store down: this process's.
        self.shared: SharedAccounts | None = None

    async def record_failure(self, address: str) -> tuple[float, float]:
        """:meth:`failed`, for the whole deployment when lockouts are shared: the seconds
        ``address`` was still locked out before this failure, and the seconds it is now."""
        if self.shared is not None:
            try:
                before, after, new = await self.shared.failed(
                    address, self.free_failures, self.max_seconds, _FORGET_AFTER_SECONDS
                )
            except StoreDown:
                pass
            else:
                self.lockouts += new
                return before, after
        before = self.locked_for(address)
        self.failed(address)
        return before, self.locked_for(address)

    def locked_for(self, address: str) -> float:
        """Seconds left of ``address``'s lockout (0 when it may try)."""
        if not self._until:
            return 0.0  # the usual case: nobody is locked out
        until = self._until.get(address)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._until[address]
            return 0.0
        return left

    def failed(self, address: str) -> None:
        """Record wrong credentials from ``address``; lock it out past the free failures."""
        count = self._failures.get(address, 0) + 1
        self._failures[address] = count
        beyond = count - self.free_failures
        if beyond > 0 and self.max_seconds > 0:
            seconds = min(self.max_seconds, 2.0 ** (beyond - 1))
            now = self._clock()
            if self._until.get(address, now) <= now:  # not already locked out: a new lockout
                self.lockouts += 1
            self._until[address] = now + seconds
        if len(self._until) > _MAX_ADDRESSES:
            now = self._clock()
            self._until = {a: u for a, u in self._until.items() if u > now}
