"""Coalescing trials: 100 concurrent identical cold form POSTs, upstream requests per trial.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.coalescing --trials 50

Each trial starts a fresh gateway (uvicorn in a thread of this process, as the tests run it) on
an empty data dir in front of the fake NBIA, slowed to 1 s, and fires 100 identical
``POST v4/getSeriesMetadata`` at once. The target is one upstream request in every trial.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.fake_nbia import FakeNBIA, FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
CLIENTS = 100


def trial(fake: FakeNBIA, upstream: str, data_dir: Path) -> tuple[int, set[int]]:
    """One cold burst; return (upstream requests, client statuses)."""
    fake.reset()
    uids = [s.uid for s in fake.dataset.series if s.collection == "4D-Lung"][:3]
    fake.slow(seconds_before_headers=1.0, path_contains="getSeriesMetadata")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with GatewayServer(make_settings(data_dir, upstream)) as gateway:

        def post(_: int) -> int:
            answer = httpx.post(
                gateway.url + f"{S}/v4/getSeriesMetadata",
                content="list=" + ",".join(uids),
                headers=headers,
                timeout=60,
            )
            return answer.status_code

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            statuses = set(pool.map(post, range(CLIENTS)))
    return len(fake.requests_to("/v4/getSeriesMetadata")), statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    fake = FakeNBIA(name="nbia")
    counts: list[int] = []
    with FakeServer(fake) as server, tempfile.TemporaryDirectory() as tmp:
        for n in range(args.trials):
            requests, statuses = trial(fake, server.url, Path(tmp) / f"t{n}")
            counts.append(requests)
            print(f"trial {n + 1}: {requests} upstream request(s), statuses {sorted(statuses)}")
    tally = dict(sorted(collections.Counter(counts).items()))
    print(f"{args.trials} trials, upstream requests per trial -> trials: {tally}")
    return 0 if set(counts) == {1} else 1


if __name__ == "__main__":
    raise SystemExit(main())
