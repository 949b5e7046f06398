"""Shielding the upstream: one request per key, a concurrency cap, backoff on 429/503, a breaker.

* :class:`Coalescer` runs one fetch per cache key; concurrent identical misses wait for it and
  share its outcome, error included, with no time-out that would send them upstream anyway.
* :class:`Limiter` caps concurrent upstream requests (and optionally their rate); a request that
  waits longer than the queue time-out is refused with 503 and ``Retry-After``. When the upstream
  says it is overloaded (429/503 with ``Retry-After``), every upstream request of the gateway
  waits until then, not only the one that was told.
* :class:`Breaker` opens after repeated upstream failures, refuses at once during a cool-down,
  then lets one probe through and closes again when it succeeds. Only evidence that the
  upstream is unwell counts (:func:`counts_against_upstream`), once per client request.
* :class:`Prober` asks the upstream a cheap question while the circuit is open, soon and then
  less often, and closes the circuit as soon as it answers.

All of this is per gateway process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

from proxy.errors import ServiceTokenError, UpstreamError, UpstreamTimeout, UpstreamUnreachable

T = TypeVar("T")
log = logging.getLogger("nbia_proxy.shield")

_CALM_SECONDS = 30.0  # no overload for this long: forget the learned rate
_ADDITIVE_STEP = 0.1  # requests/second gained per successful upstream request

#: Upstream answers that mean "not now": retried for reads, and stale copies may stand in.
OVERLOAD_STATUSES = frozenset({429, 503})
#: Upstream answers that count against the breaker. Not 500: NBIA answers 500 to malformed
#: parameters (format=bogus, a missing field), and a client must not open the circuit for all.
FAILURE_STATUSES = frozenset({502, 503, 504})
#: Upstream answers a stale copy may stand in for.
UNHEALTHY_STATUSES = OVERLOAD_STATUSES | FAILURE_STATUSES | {500}


class Overloaded(UpstreamError):
    """The gateway's own upstream queue is full (503 with Retry-After)."""

    status = 503

    def __init__(self, message: str, *, upstream: str, retry_after: float) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = retry_after


class CircuitOpen(UpstreamError):
    """The breaker is open: the upstream failed repeatedly and is resting (503)."""

    status = 503

    def __init__(self, message: str, *, upstream: str, retry_after: float) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = retry_after


@dataclass
class ShieldCounters:
    """What the shield did, for the stats endpoint."""

    coalesced: int = 0
    stale_served: int = 0
    retries: int = 0
    upstream_429: int = 0
    upstream_503: int = 0
    rejected_queue_full: int = 0
    rejected_circuit_open: int = 0
    circuit_probes: int = 0  # the gateway's own probes of an open circuit, not client traffic


class Coalescer(Generic[T]):
    """Single flight per key: the first caller fetches, concurrent callers share the outcome."""

    def __init__(self, counters: ShieldCounters) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}
        self._counters = counters

    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """Join the flight for ``key`` (starting it if there is none) and return its outcome."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self.start(key, fetch)
        else:
            self._counters.coalesced += 1
        return await asyncio.shield(flight)

    def start(self, key: str, fetch: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Start a flight for ``key`` unless one is running; nobody has to wait for it."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight
        # A task of its own: the first client hanging up must not cancel it for the others.
        flight = asyncio.ensure_future(fetch())
        self._flights[key] = flight
        flight.add_done_callback(lambda done: self._land(key, done))
        return flight

    def _land(self, key: str, flight: asyncio.Future[T]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: a background flight's failure is not an error here


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
    _tokens: float = field(init=False, default=0.0)
    _refilled_at: float = field(init=False, default=0.0)
    paused_until: float = 0.0
    waiting: int = 0
    #: Learned after upstream 429/503s: halved on overload (at most once a second), raised a
    #: little on every success, forgotten after a calm spell (AIMD, as TCP does).
    adaptive_rate: float | None = None
    _overloaded_at: float = field(init=False, default=-1e9)
    _starts: deque[float] = field(init=False, default_factory=deque)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._tokens = max(1.0, self.rate_per_second)
        self._refilled_at = self.clock()

    @property
    def rate(self) -> float:
        """Requests per second allowed now (0: unlimited)."""
        rates = [r for r in (self.rate_per_second, self.adaptive_rate) if r]
        return min(rates) if rates else 0.0

    def pause(self, seconds: float) -> None:
        """Hold every upstream request for ``seconds`` (the upstream asked us to slow down)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def overloaded(self) -> None:
        """The upstream said 429/503: slow the whole gateway down."""
        now = self.clock()
        if now - self._overloaded_at < 1.0:
            return  # one decision per second, however many answers said so
        self._overloaded_at = now
        recent = sum(1 for t in self._starts if now - t < 1.0)
        current = self.adaptive_rate or float(max(recent, 2))
        self.adaptive_rate = max(1.0, min(current, float(max(recent, 2))) / 2)
        self._tokens = min(self._tokens, 1.0)

    def succeeded(self) -> None:
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
        try:
            await self._wait_for_pause_and_rate(deadline)
            yield
        finally:
            self._slots.release()

    async def _wait_for_pause_and_rate(self, deadline: float) -> None:
        while True:
            now = self.clock()
            wait = self.paused_until - now
            rate = self.rate
            if rate > 0:
                self._tokens = min(max(rate, 1.0), self._tokens + (now - self._refilled_at) * rate)
                self._refilled_at = now
                if self._tokens < 1:
                    wait = max(wait, (1 - self._tokens) / rate)
            if wait <= 0:
                if rate > 0:
                    self._tokens -= 1
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


def counts_against_upstream(error: UpstreamError, *, slow: bool) -> bool:
    """Whether ``error`` is evidence that the upstream is unwell (and so counts for the breaker).

    Connection failures (refused, reset, DNS, TLS, connect time-out) count; so does a request
    the upstream received but did not answer in time, unless the endpoint is marked slow. The
    gateway's own limits (a full queue or pool, the request deadline) and a login the upstream
    refused (wrong password: a configuration error) do not.
    """
    if isinstance(error, UpstreamTimeout):
        return error.phase == "connect" or (error.phase in ("read", "write") and not slow)
    if isinstance(error, ServiceTokenError):
        return error.upstream_status in FAILURE_STATUSES
    return isinstance(error, UpstreamUnreachable)


def is_failure_status(status: int, *, slow: bool) -> bool:
    """Whether an upstream answer counts against the breaker (a 504 of a slow query does not)."""
    return status in FAILURE_STATUSES and not (slow and status == 504)


@dataclass
class Breaker:
    """Closed → open after ``threshold`` failures in a row → half-open probe after the cool-down.

    ``listener`` is called whenever a failure leaves the circuit open (the :class:`Prober`).
    """

    upstream: str
    threshold: int
    cooldown: float
    counters: ShieldCounters
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    listener: Callable[[], None] | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    @property
    def is_open(self) -> bool:
        """Open or half-open: the upstream has not yet shown that it is back."""
        return self.opened_at is not None

    def before(self) -> None:
        """Raise :class:`CircuitOpen` unless a request may go upstream now."""
        if self.opened_at is None:
            return
        remaining = self.cooldown - (self.clock() - self.opened_at)
        if remaining > 0 or self.probing:
            self.counters.rejected_circuit_open += 1
            raise CircuitOpen(
                "upstream failing; circuit open",
                upstream=self.upstream,
                retry_after=max(1.0, remaining),
            )
        self.probing = True  # this request is the probe

    def abandon(self) -> None:
        """No verdict on the upstream (never reached, or not its fault): another may probe."""
        self.probing = False

    def success(self) -> None:
        if self.opened_at is not None:
            log.info("upstream %s answers again; circuit closed", self.upstream)
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            if self.opened_at is None:
                log.warning(
                    "upstream %s failed %d times in a row; circuit open",
                    self.upstream,
                    self.failures,
                )
            self.opened_at = self.clock()
        self.probing = False
        if self.opened_at is not None and self.listener is not None:
            self.listener()


class Prober:
    """While ``breaker`` is open, ``probe`` the upstream: after ``first`` seconds, then doubling
    the pause after each failed probe up to the breaker's cool-down. A healthy answer closes
    the circuit at once, so service returns within seconds of the upstream (not after a whole
    cool-down, and without waiting for a client request to be the probe).

    One task per breaker, started lazily by :meth:`wake` (from :attr:`Breaker.listener`) and
    ending when the circuit closes; :meth:`aclose` stops it with the app. ``first`` = 0: off.
    """

    def __init__(
        self,
        breaker: Breaker,
        probe: Callable[[], Awaitable[bool]],
        *,
        first: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.breaker = breaker
        self.first = first
        self._probe = probe
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Start probing unless a round is already running (or probing is off)."""
        if self.first <= 0 or self.running:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a breaker driven by hand): nothing to probe with
        self._task = loop.create_task(self._run(), name=f"probe-{self.breaker.upstream}")

    async def wait(self) -> None:
        """Until the current round of probing has ended."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        pause = self.first
        longest = max(self.breaker.cooldown, self.first)
        while self.breaker.is_open:
            await self._sleep(pause)
            if not self.breaker.is_open:
                return  # a client request (the half-open probe) closed it meanwhile
            self.breaker.counters.circuit_probes += 1
            try:
                healthy = await self._probe()
            except Exception:
                log.exception("probing upstream %s failed unexpectedly", self.breaker.upstream)
                healthy = False
            if healthy:
                self.breaker.success()
                return
            pause = min(pause * 2, longest)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter: somewhere in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))
