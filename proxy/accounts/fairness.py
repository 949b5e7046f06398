"""Per-user fairness: a request rate and a number of concurrent downloads per lab user, so one
user's many-threaded bulk download cannot starve everyone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class UserLimits:
    """A token bucket per user for requests, and a queue per user for binary downloads."""

    def __init__(
        self,
        rate_per_second: float,
        max_downloads: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_second
        self.burst = max(1.0, rate_per_second)  # one second's worth of requests at once
        self.max_downloads = max_downloads
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, when)
        self._downloads: dict[str, asyncio.Semaphore] = {}
        self.refused = 0  # requests refused for going over the rate
        self.queued = 0  # downloads that waited for one of their user's slots

    def admit(self, user: str, *, count: bool = True) -> float:
        """0 when ``user`` may make a request now, else the seconds until they may.

        ``count=False`` leaves a refusal out of ``refused`` (the caller will ask again).
        """
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, then = self._buckets.get(user, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            if count:
                self.refused += 1
            return (1.0 - tokens) / self.rate
        self._buckets[user] = (tokens - 1.0, now)
        return 0.0

    @asynccontextmanager
    async def download(self, user: str) -> AsyncIterator[None]:
        """Hold one of ``user``'s download slots for the body of the ``async with``."""
        if self.max_downloads <= 0:
            yield
            return
        slots = self._downloads.setdefault(user, asyncio.Semaphore(self.max_downloads))
        if slots.locked():
            self.queued += 1
        async with slots:
            yield
