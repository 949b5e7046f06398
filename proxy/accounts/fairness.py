"""Per-user fairness: a request rate and a number of concurrent downloads per lab user, so one
user's many-threaded bulk download cannot starve everyone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from cachetools import TTLCache

from proxy.shield.bucket import TokenBucket
from proxy.shield.shared import SharedAccounts, StoreDown

#: Users whose buckets are held at once; past it the least recently seen one starts afresh.
_MAX_USERS = 10_000


class UserLimits:
    """A token bucket per user for requests, and a queue per user for binary downloads."""

    def __init__(
        self,
        rate_per_second: float,
        max_downloads: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_second
        self.max_downloads = max_downloads
        self._clock = clock
        # A bucket left alone for burst/rate seconds is full again, the same as a new one: so
        # it is forgotten then, and the buckets held are those of users active just now.
        refill_seconds = max(1.0, rate_per_second) / rate_per_second if rate_per_second > 0 else 1
        self._buckets: TTLCache[str, TokenBucket] = TTLCache(
            _MAX_USERS, refill_seconds, timer=clock
        )
        self._downloads: dict[str, asyncio.Semaphore] = {}
        self.refused = 0  # requests refused for going over the rate
        self.queued = 0  # downloads that waited for one of their user's slots
        #: The deployment's buckets and slots (Redis); None, or the store down: this process's.
        self.shared: SharedAccounts | None = None

    async def check(self, user: str) -> float:
        """:meth:`admit` for the whole deployment when the limits are shared."""
        if self.rate <= 0:
            return 0.0
        if self.shared is not None:
            try:
                wait = await self.shared.admit(user, self.rate)
            except StoreDown:
                return self.admit(user)
            if wait:
                self.refused += 1
            return wait
        return self.admit(user)

    def admit(self, user: str, *, count: bool = True) -> float:
        """0 when ``user`` may make a request now, else the seconds until they may.

        ``count=False`` leaves a refusal out of ``refused`` (the caller will ask again, with
        :meth:`check`): with shared limits, it answers "ask again" whenever there is a rate,
        since only the shared store knows.
        """
        if self.rate <= 0:
            return 0.0
        if self.shared is not None and not count:
            return 1.0
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = TokenBucket(self.rate, now)
        wait = bucket.admit(now)
        self._buckets[user] = bucket  # set again: its time to live starts over
        if wait and count:
            self.refused += 1
        return wait

    @asynccontextmanager
    async def download(self, user: str) -> AsyncIterator[None]:
        """Hold one of ``user``'s download slots for the body of the ``async with``."""
        if self.max_downloads <= 0:
            yield
            return
        if self.shared is not None:
            async with self.shared.download(user, self.max_downloads) as held:
                if held:
                    yield
                    return
        slots = self._downloads.setdefault(user, asyncio.Semaphore(self.max_downloads))
        if slots.locked():
            self.queued += 1
        async with slots:
            yield
