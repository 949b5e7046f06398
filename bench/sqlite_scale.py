"""SQLite-tier hit latency with a million entries, against a thousand-entry baseline.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.sqlite_scale --entries 1000000

It fills two cache databases directly (1,000 entries as the baseline, then ``--entries``), with
the same keys the gateway computes for ``v4/getSeries?Collection=C<n>``. It then starts a gateway
with its memory tier switched off, so every hit is read from SQLite, and times sequential hits
on random keys with one keep-alive client. It prints p50/p99 per database and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import start_gateway, stop_processes
from proxy.cache.policy import make_key
from proxy.cache.store import CacheStore
from proxy.db import make_engine, migrate
from proxy.endpoints import ENDPOINTS

ENDPOINT = ENDPOINTS["v4/getSeries"]
UPSTREAM = "http://127.0.0.1:9"  # nothing listens: every timed request must be a hit
ORIGIN = UPSTREAM  # the upstream's base URL, as the gateway puts it into keys
BODY = json.dumps([{"SeriesInstanceUID": "1.2.3", "Collection": "X", "Modality": "CT"}] * 8)


def fill(path: Path, count: int) -> None:
    """Create the schema and insert ``count`` fresh entries, in large transactions."""
    migrate(f"sqlite:///{path}")
    now = time.time()
    headers = json.dumps([["content-type", "application/json"]])
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    rows = []
    for n in range(count):
        key = make_key(ORIGIN, "nbia", "anonymous", "GET", ENDPOINT, [("Collection", f"C{n}")])
        rows.append(
            (key.digest, "nbia", "anonymous", "GET", ENDPOINT.path, key.params, 200, headers,
             BODY.encode(), len(BODY) + 300, now, now + 86400, now)
        )  # fmt: skip
        if len(rows) == 20_000 or n == count - 1:
            connection.executemany(
                "INSERT INTO cache_entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )
            connection.commit()
            rows.clear()
    connection.close()


def time_hits(data_dir: Path, count: int, samples: int) -> list[float]:
    """Milliseconds per hit for ``samples`` random keys, through a gateway without memory tier."""
    gateway, url = start_gateway(UPSTREAM, data_dir, ["--cache-memory-bytes", "0"])
    try:
        timings = []
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(samples + 200):
                path = f"/nbia-api/services/v4/getSeries?Collection=C{random.randrange(count)}"
                started = time.perf_counter()
                response = client.get(path)
                elapsed = (time.perf_counter() - started) * 1000
                if response.headers.get("x-cache") != "HIT":
                    raise RuntimeError(f"expected a hit for {path}, got {response.status_code}")
                if i >= 200:  # the first 200 warm connections and the page cache
                    timings.append(elapsed)
        return timings
    finally:
        stop_processes([gateway])


def time_store_reads(path: Path, count: int, samples: int) -> list[float]:
    """Milliseconds per ``CacheStore.get`` on random keys, in this process (no HTTP)."""
    store = CacheStore(make_engine(f"sqlite:///{path}"))
    digests = [
        make_key(
            ORIGIN,
            "nbia",
            "anonymous",
            "GET",
            ENDPOINT,
            [("Collection", f"C{random.randrange(count)}")],
        )
        for _ in range(samples)
    ]
    timings = []
    for key in digests:
        started = time.perf_counter()
        if store.get(key.digest) is None:
            raise RuntimeError("a filled key is missing")
        timings.append((time.perf_counter() - started) * 1000)
    store.engine.dispose()
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {}
    reads: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, count in (("baseline", 1000), ("large", args.entries)):
            data_dir = Path(tmp) / label
            data_dir.mkdir()
            started = time.perf_counter()
            fill(data_dir / "nbia-proxy.sqlite3", count)
            size_mb = (data_dir / "nbia-proxy.sqlite3").stat().st_size / 1e6
            print(f"{label}: {count} entries, {size_mb:.0f} MB, filled in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            reads[label] = time_store_reads(
                data_dir / "nbia-proxy.sqlite3", count, 5 * args.samples
            )
            results[label] = time_hits(data_dir, count, args.samples)
    for title, table in (
        (f"database reads in-process (CacheStore.get), {5 * args.samples} random keys", reads),
        (f"hits through the gateway (memory tier off), {args.samples} random keys", results),
    ):
        print(f"\n{title}:")
        for label, timings in table.items():
            print(
                f"{label:9s} p50 {percentile(timings, 0.5):6.3f} ms   p99 "
                f"{percentile(timings, 0.99):6.3f} ms   mean {statistics.mean(timings):6.3f} ms"
            )
        ratio = percentile(table["large"], 0.5) / percentile(table["baseline"], 0.5)
        print(f"p50 ratio large/baseline = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
