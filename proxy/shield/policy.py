"""What the cache's serving path needs of the shield, in one value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.shield.breaker import FAILURE_STATUSES
from proxy.shield.coalescer import Coalescer
from proxy.shield.counters import ShieldCounters
from proxy.shield.retry import OVERLOAD_STATUSES, RetryPolicy

if TYPE_CHECKING:
    # For the annotation only: serving imports this module, so not at run time.
    from proxy.cache.serving import Flight

#: Upstream answers a stale copy may stand in for.
UNHEALTHY_STATUSES = OVERLOAD_STATUSES | FAILURE_STATUSES | {500}


@dataclass(frozen=True, slots=True)
class ShieldPolicy:
    """How the gateway protects the upstream and copes with its failures."""

    coalescer: Coalescer[Flight]
    counters: ShieldCounters
    retry: RetryPolicy
    max_stale_seconds: float
    deadline_seconds: float
    offline: bool
    revalidate_seconds: float = 0.0  # stale-while-revalidate window (0: off)
