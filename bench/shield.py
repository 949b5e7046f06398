"""Shield figures: coalescing, 429s reaching clients, warm keys while the upstream is down.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.shield

The fake NBIA upstream runs in this process (so its request log and faults are at hand), the
gateway as its own process. Three measurements:

1. 200 concurrent identical cold requests (upstream slowed to 1 s): upstream requests seen.
2. The upstream allows 5 requests/s (429 + Retry-After beyond that); 50 clients each fire a
   distinct request at once: 429s passed on to clients, and how long the burst took.
3. 100 warm keys whose entries have expired; the upstream goes down; 1,000 requests over those
   keys: answer latency p50/p99 (target p99 under 50 ms) and how many came back STALE.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.fake_nbia import FakeNBIA, FakeServer
from tests.gateway_server import GatewayProcess

S = "/nbia-api/services"


def burst(count: int, call: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))


def coalescing(fake: FakeNBIA, gateway: str) -> None:
    fake.reset()
    fake.slow(seconds_before_headers=1.0, path_contains="getSeries")
    path = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
    answers = burst(200, lambda _: httpx.get(gateway + path, timeout=60))
    bodies = {a.content for a in answers}
    statuses = sorted({a.status_code for a in answers})
    print(
        f"1. 200 concurrent identical cold requests: {len(fake.requests_to('/v4/getSeries'))} "
        f"upstream request(s); statuses {statuses}; {len(bodies)} distinct body"
    )


def rate_limited(fake: FakeNBIA, gateway: str) -> None:
    fake.reset()
    fake.rate_limit(5, retry_after=1)
    started = time.monotonic()
    answers = burst(
        50, lambda i: httpx.get(gateway + f"{S}/v4/getSeries?Collection=R{i:02d}", timeout=120)
    )
    elapsed = time.monotonic() - started
    passed_on = sum(a.status_code == 429 for a in answers)
    ok = sum(a.status_code == 200 for a in answers)
    print(
        f"2. upstream at 5 req/s, 50 distinct concurrent requests: {passed_on} 429s reached "
        f"clients, {ok}/50 answered 200, in {elapsed:.1f} s; the upstream sent "
        f"{fake.rate_limited} 429s to the gateway"
    )
    fake.rate_limit(0)


def outage(fake: FakeNBIA, server: FakeServer, gateway: str) -> None:
    fake.reset()
    paths = [f"{S}/v4/getSeries?Collection=W{i:03d}" for i in range(100)]
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for path in paths:
            client.get(path)
        time.sleep(1.5)  # the gateway runs with a 1 s lifetime: every entry is now expired
        server.stop()
        timings, kinds = [], []
        for i in range(1000):
            started = time.perf_counter()
            answer = client.get(paths[i % len(paths)])
            timings.append((time.perf_counter() - started) * 1000)
            kinds.append(answer.headers.get("x-cache", str(answer.status_code)))
    server.start()
    ordered = sorted(timings)
    print(
        f"3. upstream down, 1000 requests over 100 expired warm keys: p50 "
        f"{statistics.median(ordered):.2f} ms, p99 {ordered[int(0.99 * len(ordered))]:.2f} ms, "
        f"max {ordered[-1]:.2f} ms; {kinds.count('STALE')} STALE, "
        f"{len(kinds) - kinds.count('STALE')} other"
    )


def main() -> int:
    fake = FakeNBIA(name="nbia")
    with FakeServer(fake) as server, tempfile.TemporaryDirectory() as tmp:
        common = ["--log-level", "error"]
        with GatewayProcess(server.url, Path(tmp) / "a", *common) as gateway:
            coalescing(fake, gateway.url)
            rate_limited(fake, gateway.url)
        with GatewayProcess(
            server.url, Path(tmp) / "b", *common, "--cache-ttl", '{"*": 1}'
        ) as gateway:
            outage(fake, server, gateway.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
