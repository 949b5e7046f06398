"""Per-user fairness: a request rate and a number of concurrent downloads per lab user, so one
user's many-threaded bulk download cannot starve everyone else.

A download slot is held by the request for its duration, or handed over (:meth:`Slot.hand_over`)
to what outlives the request on the user's behalf: a series cache fill that goes on after its
last client hung up holds the slot of that client until it ends, so a user cannot start more
downloads nobody reads than they may make downloads at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cachetools import TTLCache

from proxy.shield.bucket import TokenBucket
from proxy.shield.shared import SharedAccounts, StoreDown

#: Users whose buckets are held at once; past it the least recently seen one starts afresh.
_MAX_USERS = 10_000


def _nothing() -> None:
    return None


@dataclass(slots=True)
class Slot:
    """One of a user's download slots (a slot of nobody's when downloads are not limited)."""

    _release: Callable[[], None] = _nothing
    handed_over: bool = field(default=False, init=False)

    def hand_over(self) -> Callable[[], None]:
        """Keep the slot past the ``async with``; the caller must call what this returns once
        (further calls do nothing) when whatever holds it ends."""
        self.handed_over = True
        release, self._release = self._release, _nothing
        done = False

        def release_once() -> None:
            nonlocal done
            if not done:
                done = True
                release()

        return release_once

    def close(self) -> None:
        """The request is done: free the slot unless it was handed over."""
        if not self.handed_over:
            self._release()
            self._release = _nothing


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
        self._held: Counter[str] = Counter()
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
    async def download(self, user: str) -> AsyncIterator[Slot]:
        """Hold one of ``user``'s download slots for the body of the ``async with`` (or until
        whoever it is handed over to releases it)."""
        if self.max_downloads <= 0:
            yield Slot()
            return
        if self.shared is not None:
            shared_release = await self.shared.take_download(user, self.max_downloads)
            if shared_release is not None:
                shared_slot = Slot(shared_release)
                try:
                    yield shared_slot
                finally:
                    shared_slot.close()
                return
        slots = self._downloads.setdefault(user, asyncio.Semaphore(self.max_downloads))
        if slots.locked():
            self.queued += 1
        await slots.acquire()
        self._held[user] += 1

        def release() -> None:
            self._held[user] -= 1
            if not self._held[user]:
                del self._held[user]
            slots.release()

        slot = Slot(release)
        try:
            yield slot
        finally:
            slot.close()

    def busy(self, user: str) -> int:
        """``user``'s download slots held now (by requests and by what they were handed to)."""
        return self._held.get(user, 0)
