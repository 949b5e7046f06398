"""The circuit breaker, and what counts against the upstream: failures, not the client's faults.

Only evidence that the upstream is unwell opens the circuit: connection failures, time-outs
of requests it received (unless the endpoint is marked slow), and 502/503/504 answers. Not
500, which NBIA answers to malformed parameters, and not the gateway's own limits.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from proxy.endpoints import lookup
from proxy.errors import (
    CircuitOpen,
    ServiceTokenError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.shield.counters import ShieldCounters

log = logging.getLogger("nbia_proxy.shield")

#: Upstream answers that count against the breaker. Not 500: NBIA answers 500 to malformed
#: parameters (format=bogus, a missing field), and a client must not open the circuit for all.
FAILURE_STATUSES = frozenset({502, 503, 504})

_SLASHES = re.compile(rb"/+")


def is_slow(raw_path: bytes) -> bool:
    """Whether the catalog marks the endpoint slow (the path decoded as the upstream will)."""
    path = _SLASHES.sub(b"/", unquote_to_bytes(raw_path)).decode("utf-8", "replace")
    endpoint = lookup(path)
    return endpoint is not None and endpoint.slow


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


def is_connection_failure(error: UpstreamError) -> bool:
    """Whether ``error`` says the upstream could not be reached at all (for /healthz)."""
    if isinstance(error, UpstreamTimeout):
        return error.phase == "connect"
    return isinstance(error, UpstreamUnreachable)


def is_failure_status(status: int, *, slow: bool) -> bool:
    """Whether an upstream answer counts against the breaker (a 504 of a slow query does not)."""
    return status in FAILURE_STATUSES and not (slow and status == 504)


@dataclass
class Breaker:
    """Closed → open after ``threshold`` failures in a row → half-open probe after the cool-down.

    ``listener`` is called whenever a failure leaves the circuit open (the
    :class:`~proxy.shield.prober.Prober`).
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
    #: The last failure in a row (for /healthz), and whether it was a failure to connect.
    last_error: str | None = None
    unreachable: bool = False
    #: Told ``True`` when this breaker opens and ``False`` when it closes on its own evidence
    #: (:class:`~proxy.shield.shared.BreakerSync`: the other replicas adopt it).
    on_change: Callable[[bool], None] | None = None
    #: The last failure ever and its wall-clock time (for the status page; kept after recovery).
    last_failure: str | None = None
    last_failure_at: float | None = None

    @property
    def state(self) -> str:
        """``closed``, ``open`` (cooling down) or ``half-open`` (the next request probes)."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    @property
    def is_open(self) -> bool:
        """Open or half-open: the upstream has not yet shown that it is back."""
        return self.opened_at is not None

    @property
    def refusing(self) -> bool:
        """Whether :meth:`before` would refuse a request now: open and cooling down, or
        half-open with its probe already out."""
        if self.opened_at is None:
            return False
        return self.probing or self.clock() - self.opened_at < self.cooldown

    def before(self) -> None:
        """Raise :class:`~proxy.errors.CircuitOpen` unless a request may go upstream now."""
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
        """The upstream answered: close the circuit."""
        if self.opened_at is not None:
            log.info("upstream %s answers again; circuit closed", self.upstream)
            if self.on_change is not None:
                self.on_change(False)
        self.failures = 0
        self.opened_at = None
        self.probing = False
        self.last_error = None
        self.unreachable = False

    def failure(self, reason: str | None = None, *, unreachable: bool = False) -> None:
        """The upstream failed: one more in a row, opening the circuit at the threshold."""
        self.failures += 1
        self.last_error = reason
        self.last_failure, self.last_failure_at = reason, time.time()
        self.unreachable = unreachable
        if self.probing or self.failures >= self.threshold:
            opening = self.opened_at is None
            if opening:
                log.warning(
                    "upstream %s failed %d times in a row; circuit open",
                    self.upstream,
                    self.failures,
                )
            self.opened_at = self.clock()
            if opening and self.on_change is not None:
                self.on_change(True)
        self.probing = False
        if self.opened_at is not None and self.listener is not None:
            self.listener()

    def adopt(self, shared_open: bool) -> None:
        """Take on the deployment's circuit state (another replica opened or closed it)."""
        if shared_open and self.opened_at is None:
            log.warning("upstream %s: circuit opened by another replica", self.upstream)
            self.failures = self.threshold
            self.opened_at = self.clock()
            self.probing = False
            self.last_error = self.last_error or "circuit opened by another replica"
            if self.listener is not None:
                self.listener()  # probe too: whoever sees the upstream back closes it for all
        elif not shared_open and self.opened_at is not None:
            log.info("upstream %s: circuit closed by another replica", self.upstream)
            self.failures = 0
            self.opened_at = None
            self.probing = False
            self.last_error = None
            self.unreachable = False
