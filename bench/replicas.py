"""Replicas benchmark: two gateways behind nginx against one, and what the shared store costs.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.replicas --duration 10 --connections 50 --rounds 2 --misses 300

Needs PostgreSQL (``NBIA_PROXY_TEST_POSTGRES_URL``, default the local ``test`` database: a
schema of its own, dropped afterwards), Redis (``NBIA_PROXY_TEST_REDIS_URL``, a key prefix of
its own), nginx and wrk. Two figures, each a ratio within the same run:

* **cache hits**: req/s of wrk through nginx in front of one replica, and in front of two
  replicas (round robin), all on one PostgreSQL database and one Redis, the answer in every
  replica's memory tier (rounds interleaved). On a 2-core machine the two replicas, nginx and
  wrk share the cores: expect contention rather than twice the rate.
* **miss overhead**: latency of sequential misses (each a new key, one upstream request each)
  through a gateway with ``redis_url`` and through one without, in turns: the difference of
  the p50 and p99 is what the shared cap, rate, pause and fetch lease add per upstream request.

Exit code 1 when a check fails, 2 when wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import uuid
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

from bench import common
from bench.common import CheckFailed, Load, Process, print_table

HIT = "/nbia-api/services/v1/getCollectionValues"
MISS = "/nbia-api/services/v4/getUpdatedSeries?fromDate={:02d}-{:02d}-{:04d}"
POSTGRES = os.environ.get(
    "NBIA_PROXY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS = os.environ.get("NBIA_PROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _schema() -> tuple[str, str]:
    """A new schema in the PostgreSQL database: (its name, a URL that uses it)."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    separator = "&" if "?" in POSTGRES else "?"
    return schema, f"{POSTGRES}{separator}options=-csearch_path%3D{schema}"


def _drop(schema: str) -> None:
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _nginx(nginx: str, ports: list[int], tmp: Path, processes: list[Process]) -> str:
    servers = " ".join(f"server 127.0.0.1:{port};" for port in ports)
    process, url = common.start_nginx(
        nginx,
        "http://gateways",
        tmp,
        http=f"upstream gateways {{ {servers} keepalive 64; }}",
        location='proxy_set_header Connection "";',
    )
    processes.append(process)
    return url


def _misses(url: str, start: int, count: int) -> list[float]:
    """Milliseconds of ``count`` sequential misses, keys counted up from ``start``."""
    took = []
    with httpx.Client(timeout=60) as client:
        for n in range(start, start + count):
            began = time.perf_counter()
            # A date nobody asked before (as bench.cache_misses counts them): a new key.
            answer = client.get(url + MISS.format(n // 28 % 12 + 1, n % 28 + 1, 1000 + n // 336))
            took.append((time.perf_counter() - began) * 1000)
            if answer.status_code != 200 or answer.headers.get("x-cache") != "MISS":
                raise CheckFailed(f"{url}: a miss answered {answer.status_code}")
    return took


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def benchmark(args: argparse.Namespace, nginx: str, tmp: Path, processes: list[Process]) -> int:
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    upstream = values["url"]
    schema, database = _schema()
    prefix = f"nbia-proxy-bench-{uuid.uuid4().hex[:12]}:"
    try:
        shared = ["--database-url", database, "--redis-url", REDIS, "--redis-prefix", prefix]
        quiet = ["--audit-log", ""]
        first, first_url = common.start_gateway(upstream, tmp / "data", [*shared, *quiet])
        processes.append(first)
        second, second_url = common.start_gateway(upstream, tmp / "data", [*shared, *quiet])
        processes.append(second)
        ports = [int(u.rsplit(":", 1)[1]) for u in (first_url, second_url)]
        one = _nginx(nginx, ports[:1], tmp / "nginx-one", processes)
        two = _nginx(nginx, ports, tmp / "nginx-two", processes)
        for url in (first_url, second_url):
            for _ in range(3):  # stored, then in each replica's memory tier
                common.fetch(url + HIT)
        status, headers, _ = common.fetch(two + HIT)
        if status != 200 or headers.get("x-cache") != "HIT":
            raise CheckFailed(f"the warmed answer is not a hit ({status})")
        targets = {"1 replica": one + HIT, "2 replicas": two + HIT}
        hits = common.interleave(
            list(targets),
            args.rounds,
            lambda name: common.run_wrk(targets[name], args.connections, args.duration),
        )
        print_table(
            f"cache hits through nginx, {args.connections} connections, {args.duration} s",
            hits,
        )
        ratio = hits["2 replicas"].rps / hits["1 replica"].rps
        print(f"2 replicas / 1 replica: {ratio:.2f}x req/s")

        # Misses: a gateway on its own database without redis_url, the shared one in turns.
        plain_schema, plain_database = _schema()
        try:
            plain, plain_url = common.start_gateway(
                upstream, tmp / "plain", ["--database-url", plain_database, *quiet]
            )
            processes.append(plain)
            took: dict[str, list[float]] = {"without redis": [], "with redis": []}
            urls = {"without redis": plain_url, "with redis": first_url}
            _misses(plain_url, 10**6, 20)  # connections and caches of both warmed
            _misses(first_url, 10**6, 20)
            step = args.misses // args.rounds
            for round_ in range(args.rounds):
                for name, url in urls.items():
                    took[name] += _misses(url, round_ * step, step)
            loads = {
                name: Load(len(ms) / (sum(ms) / 1000), _percentile(ms, 50), _percentile(ms, 99))
                for name, ms in took.items()
            }
            print_table(f"sequential misses, {step * args.rounds} each (one client)", loads)
            added = [
                loads["with redis"].p50_ms - loads["without redis"].p50_ms,
                loads["with redis"].p99_ms - loads["without redis"].p99_ms,
            ]
            print(
                f"added per miss by the shared store: p50 {added[0]:+.2f} ms, "
                f"p99 {added[1]:+.2f} ms"
            )
        finally:
            common.stop_processes(processes)
            processes.clear()
            _drop(plain_schema)
    finally:
        common.stop_processes(processes)
        processes.clear()
        _drop(schema)
        client = redis.Redis.from_url(REDIS)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--misses", type=int, default=300, help="misses per target in all")
    args = parser.parse_args(argv)
    measured = common.run_measured(functools.partial(benchmark, args))
    return measured


if __name__ == "__main__":
    raise SystemExit(main())
