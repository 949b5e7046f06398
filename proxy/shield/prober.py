"""Probing an open circuit, so service returns within seconds of the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from proxy.shield.breaker import Breaker

log = logging.getLogger("nbia_proxy.shield")


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
        """Whether a round of probing is under way."""
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
        """Stop probing (the app is shutting down)."""
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
