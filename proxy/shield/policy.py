"""What the cache's serving path needs of the shield, in one value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.shield.breaker import FAILURE_STATUSES
from proxy.shield.coalescer import Coalescer
from proxy.shield.counters import ShieldCounters
from proxy.shield.retry import OVERLOAD_STATUSES

if TYPE_CHECKING:
    # For the annotation only: serving imports this module, so not at run time.
    from proxy.cache.serving import Flight

#: Upstream answers a stale copy may stand in for.
UNHEALTHY_STATUSES = OVERLOAD_STATUSES | FAILURE_STATUSES | {500}


@dataclass(frozen=True, slots=True)
class ShieldPolicy:
    """How cached answers shield the upstream: one request per key, and stored copies that
    stand in for it (the retries, deadline and offline rule of every upstream request are in
    :class:`proxy.forwarding.Forwarding`)."""

    coalescer: Coalescer[Flight]
    counters: ShieldCounters
    max_stale_seconds: float  # stale-if-error window past expiry
    revalidate_seconds: float = 0.0  # stale-while-revalidate window (0: off)
