"""What accounts mode costs on the cache-hit path: the same hits, open mode against accounts mode.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.auth_overhead --duration 10 --rounds 3

It starts the fake NBIA upstream and two gateways in front of it: one in open mode, one in
accounts mode with a lab user created by ``nbia-proxy users add``. Once both answer HIT it runs
the same wrk load on each, interleaved round by round: the open gateway without and with (ignored)
credentials, the accounts gateway once with the API key as ``Authorization: Bearer`` and once
with a gateway token from ``/nbia-api/oauth/token``.
Exit code 1 when a check fails, 2 when wrk is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from bench import common
from bench.cache_hits import PATH, warm
from bench.common import FIGURES, CheckFailed, Load, Process, run_wrk


def add_user(data_dir: Path) -> str:
    """Create a lab user with the real command; return the key it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "users", "add", "bench", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


def gateway_token(base_url: str, key: str) -> str:
    form = urllib.parse.urlencode(
        {"grant_type": "password", "username": "bench", "password": key, "client_id": "nbia"}
    ).encode()
    with urllib.request.urlopen(base_url + "/nbia-api/oauth/token", data=form) as answer:
        return str(json.load(answer)["access_token"])


def warm_with(url: str, authorization: str, body: bytes) -> None:
    """Like ``warm``, with credentials: request until the gateway answers HIT."""
    request = urllib.request.Request(url, headers={"Authorization": authorization})
    for _ in range(20):
        with urllib.request.urlopen(request) as answer:
            if answer.headers.get("X-Cache") == "HIT":
                if answer.read() != body:
                    raise CheckFailed("the accounts gateway answers other bytes")
                return
    raise CheckFailed("the accounts gateway never answered HIT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    processes: list[Process] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            try:
                results = measure(args, tmp, processes)
            finally:
                common.stop_processes(processes)
    except CheckFailed as exc:
        print(f"\nnot measured: {exc}", file=sys.stderr)
        return 1
    print(f"\nmedian of {args.rounds} rounds, wrk -t1 -c{args.connections} -d{args.duration}s")
    print(f"{'':22s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs open':>8s}")
    base = results["open"].rps
    for name, load in results.items():
        ratio = load.rps / base
        print(f"{name:22s} {load.rps:9.0f} {load.p50_ms:8.2f} {load.p99_ms:8.2f} {ratio:8.2f}")
    return 0


def measure(args: argparse.Namespace, tmp: Path, processes: list[Process]) -> dict[str, Load]:
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    with urllib.request.urlopen(values["url"] + PATH) as answer:
        body = answer.read()
    open_gw, open_url = common.start_gateway(values["url"], tmp / "open")
    processes.append(open_gw)
    key = add_user(tmp / "accounts")
    accounts_gw, accounts_url = common.start_gateway(
        values["url"], tmp / "accounts", ["--access", "accounts"]
    )
    processes.append(accounts_gw)
    token = gateway_token(accounts_url, key)
    warm(open_url + PATH, "X-Cache", body)
    warm_with(accounts_url + PATH, f"Bearer {key}", body)
    targets = {
        "open": (open_url + PATH, []),
        # The same header bytes, ignored: separates parsing a longer request from checking it.
        "open, key ignored": (open_url + PATH, [f"Authorization: Bearer {key}"]),
        "accounts, API key": (accounts_url + PATH, [f"Authorization: Bearer {key}"]),
        "accounts, token": (accounts_url + PATH, [f"Authorization: Bearer {token}"]),
    }
    runs: dict[str, list[Load]] = {name: [] for name in targets}
    for url, headers in targets.values():
        run_wrk(url, args.connections, 1, headers)  # unmeasured warm-up
    for round_ in range(1, args.rounds + 1):
        for name, (url, headers) in targets.items():
            runs[name].append(run_wrk(url, args.connections, args.duration, headers))
            print(f"  round {round_} {name:18s} {runs[name][-1].rps:9.0f} req/s", flush=True)
    return {
        name: Load(*(statistics.median(getattr(run, f) for run in loads) for f in FIGURES))
        for name, loads in runs.items()
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
