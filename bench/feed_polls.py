"""Do update-feed polls disturb cache hits? The same wrk hit load, quiet and while polling.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.feed_polls --duration 10 --rounds 3 --entries 3000

It starts the fake NBIA upstream and a gateway with the update feeds on, fills the cache with
``--entries`` distinct metadata answers (over every collection of the fake, so each poll also
asks the collection feeds), and makes the hit path answer HIT. Then, interleaved round by
round, the same wrk load on one cached answer runs ``quiet`` and ``polling``: while a thread
calls ``POST /_proxy/feeds/poll`` back to back (each poll: getUpdatedSeries, two collection
feeds per cached collection, the position and the purge in the database). The figure is the
ratio of the two, measured in the same run. Exit code 1 when a check fails, 2 when wrk or
nginx (common's precondition) is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.request
from pathlib import Path

from bench import common
from bench.cache_hits import PATH, warm
from bench.common import CheckFailed, Load, Process, print_table, run_wrk

COLLECTIONS = ("4D-Lung", "TCGA-KIRC", "Soft-tissue-Sarcoma")


def fill(base_url: str, entries: int) -> None:
    """``entries`` distinct cached answers naming the fake's collections."""
    for i in range(entries):
        collection = COLLECTIONS[i % len(COLLECTIONS)]
        url = f"{base_url}/nbia-api/services/v4/getSeries?Collection={collection}&Modality=M{i}"
        with urllib.request.urlopen(url) as answer:
            answer.read()


def poll(base_url: str) -> dict[str, object]:
    url = f"{base_url}/_proxy/feeds/poll?upstream=nbia"
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=120) as answer:
        result: dict[str, object] = json.load(answer)["upstreams"]["nbia"]
    return result


def measure(args: argparse.Namespace, tmp: Path, processes: list[Process]) -> dict[str, Load]:
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    gateway, base_url = common.start_gateway(
        values["url"],
        tmp / "gateway",
        [
            "--update-poll-seconds",
            "3600",
            # Back-to-back forced polls are the load measured: no minimum between them.
            "--update-forced-poll-seconds",
            "0",
            "--nlst-upstream",
            values["url"],
        ],
    )
    processes.append(gateway)
    fill(base_url, args.entries)
    _, _, expected = common.fetch(values["url"] + PATH)
    warm(base_url + PATH, "X-Cache", expected)
    first = poll(base_url)
    if first.get("outcome") != "ok":
        raise CheckFailed(f"a poll did not go through: {first}")
    print(f"  one poll: {first}", flush=True)
    polls = {"count": 0}

    def run(name: str) -> Load:
        if name == "quiet":
            return run_wrk(base_url + PATH, args.connections, args.duration)
        stop = threading.Event()

        def keep_polling() -> None:
            while not stop.is_set():
                poll(base_url)
                polls["count"] += 1

        poller = threading.Thread(target=keep_polling, daemon=True)
        poller.start()
        try:
            return run_wrk(base_url + PATH, args.connections, args.duration)
        finally:
            stop.set()
            poller.join(120)

    loads = common.interleave(["quiet", "polling"], args.rounds, run)
    seconds = args.rounds * args.duration
    print(f"\npolls during the polling rounds: {polls['count']} ({polls['count'] / seconds:.1f}/s)")
    return loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--entries", type=int, default=3000, help="cached answers to hold")
    args = parser.parse_args(argv)
    result = common.run_measured(lambda _nginx, tmp, processes: measure(args, tmp, processes))
    if isinstance(result, int):
        return result
    print_table(f"cache hits, {args.entries} entries cached, quiet and while polling", result)
    quiet, polling = result["quiet"], result["polling"]
    print(
        f"\npolling/quiet: req/s {polling.rps / quiet.rps:.2f}, "
        f"p50 {polling.p50_ms / quiet.p50_ms:.2f}, p99 {polling.p99_ms / quiet.p99_ms:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
