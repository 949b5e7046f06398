"""Warm benchmark: ``nbia-proxy warm`` of a fake collection of many big series, run twice.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.warm --series 52 --series-mb 21

The fake NBIA runs in this process (its request log is counted here) with a ``Bulk-CT``
collection whose zips are generated while they are sent; ``nbia-proxy warm --collection
Bulk-CT`` runs as its own process with its in-process gateway on a fresh data dir, as a user
runs it. Figures per run: wall time, upstream bytes and throughput, upstream requests per
series (all, and image downloads alone). The second run should make no image request at all.
The baseline, in the same run: the same zips downloaded straight from the fake, as many at
once, by a process of its own as the warm is (the fake holds this one's GIL), without gateway
or cache: what the fake's generation and the loopback allow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.fake_nbia import FakeNBIA, FakeServer

ROOT = Path(__file__).resolve().parent.parent


def warm_once(url: str, data_dir: Path, record: Path, concurrency: int) -> tuple[float, int]:
    """One ``nbia-proxy warm`` run; its wall time and exit status."""
    command = [
        sys.executable, "-m", "proxy", "warm", "--collection", "Bulk-CT",
        "--upstream", url, "--nlst-upstream", url, "--data-dir", str(data_dir),
        "--record", str(record), "--concurrency", str(concurrency), "--log-level", "warning",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.monotonic() - started
    print("\n".join(done.stdout.splitlines()[-6:]))
    return seconds, done.returncode


def direct(url: str, series: list[str], concurrency: int) -> tuple[float, int]:
    """The baseline: every zip straight from the fake, by another process; wall time, bytes."""
    command = [sys.executable, "-m", "bench.warm", "--direct-from", url,
               "--concurrency", str(concurrency)]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, input="\n".join(series), capture_output=True, text=True, check=True
    )
    size, seconds = done.stdout.split()  # timed there: the process's start-up is left out
    return float(seconds), int(size)


def download_all(url: str, series: list[str], concurrency: int) -> int:
    """Every zip of ``series`` from ``url``, ``concurrency`` at once; the bytes."""

    def one(uid: str) -> int:
        size = 0
        query = {"NewFileNames": "Yes", "SeriesInstanceUID": uid}
        with httpx.stream(
            "GET", f"{url}/nbia-api/services/v4/getImage", params=query, timeout=300
        ) as answer:
            for chunk in answer.iter_bytes(256 * 1024):
                size += len(chunk)
        return size

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, series))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=52, help="series in the collection")
    parser.add_argument("--series-mb", type=float, default=21.0, help="MiB per series zip")
    parser.add_argument("--concurrency", type=int, default=2, help="warm --concurrency")
    parser.add_argument("--direct-from", metavar="URL", help=argparse.SUPPRESS)  # the baseline
    args = parser.parse_args(argv)
    if args.direct_from:
        series = sys.stdin.read().split()
        started = time.monotonic()
        size = download_all(args.direct_from, series, args.concurrency)
        print(size, time.monotonic() - started)
        return 0

    started = time.monotonic()
    fake = FakeNBIA(bulk_series=args.series, bulk_series_bytes=int(args.series_mb * 1024**2))
    bulk = [s.uid for s in fake.dataset.series if s.collection == "Bulk-CT"]
    total = sum(fake.images.series_size(uid)[0] for uid in bulk)
    print(
        f"fake collection Bulk-CT: {len(bulk)} series, {total / 1e9:.2f} GB of DICOM "
        f"(sizes and MD5s made in {time.monotonic() - started:.1f} s)"
    )
    figures = []
    with FakeServer(fake) as server, tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        seconds, size = direct(server.url, bulk, args.concurrency)
        baseline = {
            "run": "direct from the fake (baseline)",
            "wall_s": round(seconds, 1),
            "fetched_GB": round(size / 1e9, 3),
            "MB_per_s": round(size / seconds / 1e6, 1),
        }
        print(json.dumps(baseline))
        for run in (1, 2):
            fake.reset()
            record = Path(tmp) / f"record-{run}.json"
            print(f"\n--- run {run}")
            seconds, code = warm_once(server.url, data_dir, record, args.concurrency)
            document = json.loads(record.read_text())
            fetched = sum(
                z.get("size", 0)
                for s in document["series"]
                for z in s["zips"]
                if z["status"] == "ready"
            )
            by_endpoint = Counter(r.path.rpartition("/")[2] for r in fake.requests)
            images = by_endpoint["getImage"]
            figures.append(
                {
                    "run": run,
                    "exit": code,
                    "wall_s": round(seconds, 1),  # the whole command, start-up included
                    "run_s": document["seconds"],  # the command's own account: lists and zips
                    "fetched_GB": round(fetched / 1e9, 3),
                    "MB_per_s": round(fetched / document["seconds"] / 1e6, 1),
                    "upstream_requests": len(fake.requests),
                    "per_series": round(len(fake.requests) / len(bulk), 2),
                    "image_requests": images,
                    "by_endpoint": dict(sorted(by_endpoint.items())),
                }
            )
    print()
    print(json.dumps(baseline))
    for figure in figures:
        print(json.dumps(figure))
    ratio = figures[0]["MB_per_s"] / baseline["MB_per_s"]
    print(f"run 1 throughput (run_s) / baseline: {ratio:.2f}")
    return 0 if all(f["exit"] == 0 for f in figures) and figures[1]["image_requests"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
