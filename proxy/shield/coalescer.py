"""Single flight per key: concurrent identical requests share one upstream fetch (with a shared
store, one across workers and replicas: :class:`~proxy.shield.shared.SharedFlights`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from proxy.audit import JOINED
from proxy.shield.counters import ShieldCounters
from proxy.shield.shared import SharedFlights

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Single flight per key: the first caller fetches, concurrent callers share the outcome."""

    def __init__(self, counters: ShieldCounters) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}
        self._counters = counters
        #: The deployment's flights (None: this process's alone).
        self.across: SharedFlights | None = None

    async def run(
        self,
        key: str,
        fetch: Callable[[], Awaitable[T]],
        recall: Callable[[], Awaitable[T | None]] | None = None,
        stored: Callable[[], bool] | None = None,
    ) -> T:
        """Join the flight for ``key`` (starting it if there is none) and return its outcome.

        With :attr:`across`, a flight another process is running is joined too: ``recall``
        reads the answer it stored, and ``stored`` says whether this process's fetch stored
        its answer (for the others to read).
        """
        flight = self._flights.get(key)
        if flight is None:
            across = self.across
            if across is not None and recall is not None and stored is not None:
                flight = self.start(key, lambda: across.once(key, fetch, recall, stored))
            else:
                flight = self.start(key, fetch)
        else:
            self._counters.coalesced += 1
            JOINED.set(True)  # this request's audit line says JOINED, not MISS
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
