"""What the shield did, counted for the stats endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.metrics import Tally


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

    def __post_init__(self) -> None:
        # Not a field: the stats document (``asdict``) stays as it was.
        self.tally = Tally()  # per request and per upstream call, for /metrics
        #: Calls to the shared store (Redis) that failed or timed out, for /metrics.
        self.shared_store_errors = 0
