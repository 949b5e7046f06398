"""The upstream's queue: a concurrency cap, an optional rate, and a pause after overload."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from proxy.errors import Overloaded
from proxy.shield.bucket import TokenBucket
from proxy.shield.counters import ShieldCounters
from proxy.shield.shared import SharedLimits

_CALM_SECONDS = 30.0  # no overload for this long: forget the learned rate
_ADDITIVE_STEP = 0.1  # requests/second gained per successful upstream request


@dataclass
class Limiter:
    """Concurrency cap, optional token bucket and a gateway-wide pause after upstream overload."""

    upstream: str
    max_concurrency: int
    rate_per_second: float
    queue_timeout: float
    counters: ShieldCounters
    clock: Callable[[], float] = time.monotonic
    _slots: asyncio.Semaphore = field(init=False)
    _bucket: TokenBucket = field(init=False)
    paused_until: float = 0.0
    waiting: int = 0
    #: Learned after upstream 429/503s: halved on overload (at most once a second), raised a
    #: little on every success, forgotten after a calm spell (AIMD, as TCP does).
    adaptive_rate: float | None = None
    _overloaded_at: float = field(init=False, default=-1e9)
    _starts: deque[float] = field(init=False, default_factory=deque)
    #: The deployment's cap, rate and pause (Redis); None: this process's alone. While the
    #: store is down, the per-process ones apply.
    shared: SharedLimits | None = None

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._bucket = TokenBucket(self.rate_per_second, self.clock())

    @property
    def rate(self) -> float:
        """Requests per second allowed now (0: unlimited)."""
        rates = [r for r in (self.rate_per_second, self.adaptive_rate) if r]
        return min(rates) if rates else 0.0

    def pause(self, seconds: float) -> None:
        """Hold every upstream request for ``seconds`` (the upstream asked us to slow down)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        if self.shared is not None:
            self.shared.pause(seconds)

    def overloaded(self) -> None:
        """The upstream said 429/503: slow the whole gateway down."""
        now = self.clock()
        if now - self._overloaded_at < 1.0:
            return  # one decision per second, however many answers said so
        self._overloaded_at = now
        recent = sum(1 for t in self._starts if now - t < 1.0)
        current = self.adaptive_rate or float(max(recent, 2))
        self.adaptive_rate = max(1.0, min(current, float(max(recent, 2))) / 2)
        self._bucket.cap(1.0)

    def succeeded(self) -> None:
        """The upstream answered without overload: win back some of the learned rate."""
        if self.adaptive_rate is None:
            return
        if self.clock() - self._overloaded_at > _CALM_SECONDS:
            self.adaptive_rate = None
        else:
            self.adaptive_rate += _ADDITIVE_STEP

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot (bounded by the queue time-out), then hold it."""
        deadline = self.clock() + self.queue_timeout
        self.waiting += 1
        try:
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                self.counters.rejected_queue_full += 1
                raise Overloaded(
                    "too many requests waiting for the upstream",
                    upstream=self.upstream,
                    retry_after=max(1.0, self.queue_timeout),
                ) from None
        finally:
            self.waiting -= 1
        token = None
        try:
            if self.shared is not None:
                token = await self._enter_shared(deadline)
            if token is None:
                await self._wait_for_pause_and_rate(deadline)
            yield
        finally:
            self._slots.release()
            if token is not None:
                assert self.shared is not None
                self.shared.leave(token)

    async def _enter_shared(self, deadline: float) -> str | None:
        """A slot of the deployment's (its token), or None when the store is down."""
        assert self.shared is not None
        self.waiting += 1
        try:
            # The shared deadline is on the monotonic clock, whatever clock this one reads.
            left = deadline - self.clock()
            token = await self.shared.enter(self.rate, time.monotonic() + left)
        except TimeoutError as exc:
            self.counters.rejected_queue_full += 1
            what, wait = exc.args
            message, retry_after = "too many requests waiting for the upstream", self.queue_timeout
            if what == "pause":
                message, retry_after = "the upstream asked the gateway to slow down", wait
            raise Overloaded(
                message, upstream=self.upstream, retry_after=max(1.0, retry_after)
            ) from None
        finally:
            self.waiting -= 1
        if token is not None:
            self._starts.append(self.clock())  # for the learned rate, as the local path does
        return token

    async def _wait_for_pause_and_rate(self, deadline: float) -> None:
        bucket = self._bucket
        while True:
            now = self.clock()
            wait = self.paused_until - now
            rate = self.rate
            if rate > 0:  # unlimited leaves the bucket as it is, for when a rate returns
                bucket.rate = rate
                bucket.refill(now)
                wait = max(wait, bucket.wait())
            if wait <= 0:
                if rate > 0:
                    bucket.take()
                self._starts.append(now)
                while self._starts and now - self._starts[0] > 1.0:
                    self._starts.popleft()
                return
            if now + wait > deadline:
                self.counters.rejected_queue_full += 1
                raise Overloaded(
                    "the upstream asked the gateway to slow down",
                    upstream=self.upstream,
                    retry_after=max(1.0, wait),
                )
            await asyncio.sleep(wait)
