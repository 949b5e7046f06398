"""Breaker figures: what one client can do to the circuit, and how fast service returns.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.breaker [--trials 8]

The fake NBIA upstream runs in this process (so it can be stopped and started again on the same
port, and its request log is at hand), the gateway as its own process with its default breaker
settings. Four measurements:

1. Five requests whose header value ends in a space: statuses, the circuit afterwards, and what
   another client gets.
2. Five ``getSeriesSize`` calls past the read time-out (endpoint marked slow): the circuit.
3. One read against a persistent 503 (retried): upstream attempts, the circuit.
4. Recovery: the upstream goes down, the circuit opens, the upstream comes back after outages of
   different lengths; seconds from its return to (a) the first 200 of a client polling with
   uncached requests, (b) the circuit closing with no client traffic at all, by the gateway's
   own probes (target 5 s); and what ``/healthz`` said while the circuit was open.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fake_nbia import FakeNBIA, FakeServer
from tests.gateway_server import GatewayProcess, request_line, send_raw

S = "/nbia-api/services"


def circuit(gateway: str) -> str:
    health = httpx.get(gateway + "/healthz", timeout=10).json()
    return str(health["upstreams"]["nbia"].get("circuit", "?"))


def other_client(gateway: str, tag: str) -> int:
    path = f"{S}/v4/getSeries?Collection=OTHER-{tag}"
    return httpx.get(gateway + path, timeout=60).status_code


def trailing_space(fake: FakeNBIA, gateway: str) -> None:
    fake.reset()
    statuses = []
    for i in range(5):
        head = request_line("GET", f"{S}/v4/getSeries?Collection=ATTACK{i}")
        status, _, _ = send_raw(gateway, head.replace(b"Host:", b"X-Lab: value \r\nHost:"))
        statuses.append(status)
    print(
        "1. five requests with a trailing-space header value (trimmed and forwarded): "
        f"statuses {statuses}, "
        f"{len(fake.requests)} reached the upstream, circuit {circuit(gateway)}, "
        f"another client gets {other_client(gateway, 'a')}"
    )


def slow_queries(fake: FakeNBIA, gateway: str) -> None:
    fake.reset()
    fake.slow(seconds_before_headers=3.0, path_contains="getSeriesSize")
    statuses = [
        httpx.get(
            gateway + f"{S}/v4/getSeriesSize?SeriesInstanceUID=1.2.{i}", timeout=60
        ).status_code
        for i in range(5)
    ]
    fake.slow(0)
    print(
        f"2. five getSeriesSize calls past the 1 s read time-out: statuses {statuses}, "
        f"circuit {circuit(gateway)}, another client gets {other_client(gateway, 's')}"
    )


def persistent_503(fake: FakeNBIA, gateway: str) -> None:
    fake.reset()
    fake.fail_next(1000, status=503, retry_after=0, path_contains="getPatient")
    status = httpx.get(gateway + f"{S}/v4/getPatient?Collection=X", timeout=120).status_code
    attempts = len(fake.requests_to("/v4/getPatient"))
    fake.reset()
    print(
        f"3. one read against a persistent 503: status {status} after {attempts} upstream "
        f"attempts, circuit {circuit(gateway)}, another client gets {other_client(gateway, 'p')}"
    )


def recovery(fake: FakeNBIA, server: FakeServer, gateway: str, trials: int, *, quiet: bool) -> None:
    """``quiet``: no client asks while the upstream is back, so only the gateway's own probes
    can close the circuit; else a client polls with uncached requests (one of which may be the
    half-open probe once the cool-down has passed)."""
    figures: list[float] = []
    health: dict[str, Any] = {}
    for trial in range(trials):
        fake.reset()
        server.stop()
        for i in range(6):
            httpx.get(gateway + f"{S}/v4/getSeries?Collection=DOWN-{trial}-{i}", timeout=60)
        assert circuit(gateway) != "closed"
        health = httpx.get(gateway + "/healthz", timeout=10).json()
        time.sleep(0.5 + 1.3 * trial)  # outages of different lengths meet the probes unaligned
        server.start()
        back = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            if quiet:
                if circuit(gateway) == "closed":
                    break
            else:
                path = f"{S}/v4/getSeries?Collection=UP-{trial}-{attempt}"
                if httpx.get(gateway + path, timeout=60).status_code == 200:
                    break
            time.sleep(0.05)
        figures.append(time.monotonic() - back)
    what = "circuit closed by the probes alone" if quiet else "a polling client served again"
    print(
        f"4{'b' if quiet else 'a'}. outages of 0.5 to {0.5 + 1.3 * (trials - 1):.1f} s, {what} "
        f"{', '.join(f'{f:.2f}' for f in figures)} s after the upstream returned (median "
        f"{statistics.median(figures):.2f} s, max {max(figures):.2f} s; target 5 s)"
    )
    if quiet:
        nbia = health["upstreams"]["nbia"]
        print(f"   /healthz while open: status {health['status']!r}, nbia {nbia}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    fake = FakeNBIA(name="nbia")
    with FakeServer(fake) as server, tempfile.TemporaryDirectory() as tmp:
        common = ["--log-level", "error", "--read-timeout-seconds", "1"]
        with GatewayProcess(server.url, Path(tmp) / "a", *common) as gateway:
            trailing_space(fake, gateway.url)
            slow_queries(fake, gateway.url)
            persistent_503(fake, gateway.url)
        with GatewayProcess(server.url, Path(tmp) / "b", *common) as gateway:
            recovery(fake, server, gateway.url, args.trials, quiet=False)
            recovery(fake, server, gateway.url, args.trials, quiet=True)
    fake.images.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
