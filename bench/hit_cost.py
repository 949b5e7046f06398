"""The Python work of one cache hit, in-process: defaults against metrics off (and audit off).

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.hit_cost --hits 50000 --rounds 9 --socket-us 36.8

``bench.cache_hits`` measures hits over real sockets, where the kernel and wrk share two CPUs
and rounds of one configuration spread by 10-30 %: too coarse to see a cost of a few percent.
This drives the gateway's own protocol (:class:`proxy.hit_protocol.HitProtocol`) with a
transport that only counts bytes, on gateways built with the default settings, and times the
event loop thread's CPU per hit, the configurations interleaved round by round. The cost of
metrics is then the difference per hit, set against a hit's whole cost over a socket as
``bench.cache_hits`` measures it (``--socket-us``: 1e6 / that bench's req/s).

Keep a round of all four gateways shorter than ``cache_recheck_seconds`` (5 s; about 50,000
hits each here): with longer rounds every configuration measured ten times slower after the
first rounds, a cross-gateway effect of this harness not yet explained (one gateway alone,
left idle past the recheck, measured unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from bench import common
from proxy.app import create_app
from proxy.config import Settings
from proxy.hit_protocol import HitProtocol
from proxy.server import uvicorn_options
from tests.transport import CountingTransport

PATH = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
HEAD = f"GET {PATH} HTTP/1.1\r\nHost: gateway\r\nUser-Agent: wrk\r\n\r\n".encode()
#: Hits between two turns of the event loop (wrk's 50 connections give a server about as many
#: reads a turn).
BATCH = 50


class Variant:
    """One gateway app, started, and a connection to its protocol."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.app = create_app(settings)
        options = uvicorn_options(settings) | {"lifespan": "on", "log_level": "error"}
        self.config = uvicorn.Config(self.app, **options)
        self.config.load()
        self.lifespan = LifespanOn(self.config)
        self.per_hit: list[float] = []

    async def start(self) -> None:
        await self.lifespan.startup()
        self.protocol = HitProtocol(config=self.config, server_state=ServerState(), app_state={})
        self.transport = CountingTransport()
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]
        for _ in range(3):  # a miss (ASGI, stored), a shortcut hit (head learnt), a known head
            self.protocol.data_received(HEAD)
            await self.settled()
            await asyncio.sleep(0.05)
        before = self.transport.written
        self.protocol.data_received(HEAD)
        if self.transport.written == before:
            raise RuntimeError(f"{self.name}: a repeated head was not answered at once")

    async def round(self, hits: int) -> None:
        """``hits`` known-head hits; their CPU time per hit (µs) is noted. The loop runs
        between batches, as it does between a server's reads: the timers each request sets
        and cancels, the audit log's flush and the metrics' share are part of the cost."""
        protocol, data = self.protocol, HEAD
        started = time.thread_time()
        for _ in range(hits // BATCH):
            for _ in range(BATCH):
                protocol.data_received(data)
                # Every recheck_seconds a hit goes the full path (the database confirms the
                # memory copy): its answer must be written before the next request, as a
                # client waiting for it would have it.
                if protocol.cycle is not None and not protocol.cycle.response_complete:
                    await self.settled()
            await asyncio.sleep(0)
        self.per_hit.append((time.thread_time() - started) / (hits // BATCH * BATCH) * 1e6)

    async def settled(self) -> None:
        """Until the request on the ASGI path has been answered."""
        while self.protocol.cycle is not None and not self.protocol.cycle.response_complete:
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self.protocol.connection_lost(None)
        await self.lifespan.shutdown()


async def measure(upstream: str, tmp: Path, hits: int, rounds: int) -> list[Variant]:
    def settings(name: str, **extra: Any) -> Settings:
        return Settings(upstream=upstream, nlst_upstream=upstream, data_dir=tmp / name, **extra)

    variants = [
        Variant("defaults", settings("defaults")),
        Variant("metrics off", settings("metrics-off", metrics_enabled=False)),
        Variant("audit off", settings("audit-off", audit_log="")),
        Variant("both off", settings("both-off", audit_log="", metrics_enabled=False)),
    ]
    for variant in variants:
        await variant.start()
    for _ in range(rounds):
        for variant in variants:
            await variant.round(hits)
    for variant in variants:
        await variant.stop()
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hits", type=int, default=50_000, help="hits per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument(
        "--socket-us",
        type=float,
        default=0.0,
        help="a hit's whole cost over a socket, in µs (1e6 / bench.cache_hits' req/s)",
    )
    args = parser.parse_args(argv)
    fake, values = common.start_fake_upstream()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            # uvloop, as uvicorn's loop="auto" picks for the gateway.
            run = measure(values["url"], Path(tmpdir), args.hits, args.rounds)
            variants = uvloop.run(run)
    finally:
        common.stop_processes([fake])
    medians = {v.name: statistics.median(v.per_hit) for v in variants}
    print(f"{args.hits} known-head hits per round, {args.rounds} rounds, CPU µs per hit")
    for variant in variants:
        spread = ", ".join(f"{x:.2f}" for x in variant.per_hit)
        print(f"  {variant.name:12} median {medians[variant.name]:6.2f}   ({spread})")
    metrics = medians["defaults"] - medians["metrics off"]
    audit = medians["defaults"] - medians["audit off"]
    print(f"metrics cost per hit: {metrics:+.2f} µs; audit log cost per hit: {audit:+.2f} µs")
    if args.socket_us:
        print(
            f"of a hit over a socket ({args.socket_us:.1f} µs): metrics "
            f"{100 * metrics / args.socket_us:+.1f} %, audit {100 * audit / args.socket_us:+.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
