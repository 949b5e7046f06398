"""A token bucket: a request rate with a burst of one second's worth.

Pure arithmetic on the times it is given (no clock, no sleeping): the caller says when "now"
is, so the upstream :class:`~proxy.shield.limiter.Limiter` and the per-user limits of
:mod:`proxy.accounts.fairness` share one rule, and tests drive it with plain numbers.
"""

from __future__ import annotations

import math


class TokenBucket:
    """Tokens refill at ``rate`` per second up to :attr:`burst`; a request takes a whole one.

    A new bucket is full. ``rate`` may change between calls (the limiter's adaptive rate): the
    tokens gathered so far stay, capped by the new burst at the next :meth:`refill`.
    """

    __slots__ = ("rate", "refilled_at", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = self.burst
        self.refilled_at = now

    @property
    def burst(self) -> float:
        """Most tokens held: one second's worth of requests at once, and at least one."""
        return max(1.0, self.rate)

    def refill(self, now: float) -> None:
        """Add what ``rate`` earned since the last refill, up to :attr:`burst`."""
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now

    def wait(self) -> float:
        """Seconds until a whole token is there at ``rate`` (0: one is there now)."""
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf

    def take(self) -> bool:
        """Take a whole token if there is one (never leaving the bucket below empty)."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def cap(self, tokens: float) -> None:
        """Hold at most ``tokens`` (after an overload: no burst right after it)."""
        self.tokens = min(self.tokens, tokens)

    def admit(self, now: float) -> float:
        """Refill, then take a token: 0 when one was taken, else the seconds until one is there."""
        self.refill(now)
        wait = self.wait()
        if not wait:
            self.take()
        return wait
