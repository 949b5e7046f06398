"""Cache-miss benchmark: every request a new key, gateway against nginx proxy_cache and the fake.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.cache_misses --duration 10 --connections 10 --rounds 3

Every request asks ``v4/getUpdatedSeries`` with a ``fromDate`` it is the first to ask (a wrk Lua
script counts the dates up, and each run of a target goes on where its last one stopped), so
every answer is a miss that the cache then stores: what a lab's first questions, its notebooks
and a ``warm`` run pay. The targets take turns round by round: the fake NBIA upstream direct
(the ceiling), nginx ``proxy_cache`` in front of it (the reference), and the gateway with its
default settings (SQLite cache, audit log on, written to a file). ``--baseline-src DIR`` adds
the gateway of another checkout (e.g. ``main``) as a further target, for a before/after in
the same run.

Checked, per target: every gateway and nginx answer said MISS, every gateway miss is stored
(the cache's entry count, once the writer is done), and the non-2xx answers are counted.
Exit code 1 when a check fails, 2 when wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import common
from bench.common import CheckFailed, Load, Process, print_table

PATH = "/nbia-api/services/v4/getUpdatedSeries"
# fromDate as NBIA takes it (MM-DD-YYYY), counted up from the first argument after the URL's
# path: 28 days a month, years from 1000 (before every release, so every answer is the same
# full list). The counts are globals so that `done` can read them from the thread.
SCRIPT = """
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  start = tonumber(args[2])
  counter = start
  marked = 0
  misses = 0
end

function request()
  local n = counter
  counter = counter + 1
  local month = math.floor(n / 28) % 12 + 1
  local year = 1000 + math.floor(n / 336)
  local query = string.format("?fromDate=%02d-%02d-%04d", month, n % 28 + 1, year)
  return wrk.format("GET", path .. query)
end

function response(status, headers, body)
  for name, value in pairs(headers) do
    local lowered = string.lower(name)
    if lowered == "x-cache" or lowered == "x-cache-status" then
      marked = marked + 1
      if value == "MISS" then
        misses = misses + 1
      end
    end
  end
end

function done(summary, latency, requests)
  local sent, seen, missed = 0, 0, 0
  for _, thread in ipairs(threads) do
    sent = sent + thread:get("counter") - thread:get("start")
    seen = seen + thread:get("marked")
    missed = missed + thread:get("misses")
  end
  io.write(string.format("bench: sent=%d marked=%d misses=%d\\n", sent, seen, missed))
end
"""
_MARKS = re.compile(r"^bench: sent=(\d+) marked=(\d+) misses=(\d+)$", re.M)
LAST_DAY = 900 * 336  # 12-28-1899: the script's dates stay before 1900


@dataclass
class Target:
    """One server under load, and what has been asked of it so far."""

    url: str
    caches: bool  # answers carry X-Cache (gateway) or X-Cache-Status (nginx)
    stats_url: str | None = None  # the gateway's /_proxy/cache/stats
    next_day: int = 0  # where the next run's dates start
    answered: int = 0  # responses wrk counted, all runs
    sent: int = 0  # requests wrk sent (some may be cut off when a run ends)
    non_2xx: int = 0
    not_miss: int = 0
    loads: list[Load] = field(default_factory=list)


def run(target: Target, script: Path, connections: int, seconds: int) -> Load:
    """One wrk run on fresh dates; count what it saw into ``target``."""
    if target.next_day >= LAST_DAY:
        raise CheckFailed("out of fresh dates: fewer rounds or shorter runs")
    path = target.url + PATH
    out = common.wrk(
        path, connections, seconds, script=script, script_args=(PATH, str(target.next_day))
    )
    marks = _MARKS.search(out.output)
    if marks is None:
        raise CheckFailed(f"the wrk script printed no counts:\n{out.output}")
    sent, marked, misses = (int(value) for value in marks.groups())
    target.next_day += sent
    target.sent += sent
    target.answered += out.requests
    target.non_2xx += out.non_2xx
    if target.caches:
        target.not_miss += out.requests - misses
        if marked != out.requests:
            raise CheckFailed(f"{marked} of {out.requests} answers of {path} had a cache mark")
    return out.load


def stored_entries(stats_url: str, settle_seconds: float = 60.0) -> int:
    """The gateway's entry count once it stops growing (the writer has caught up)."""
    deadline = time.monotonic() + settle_seconds
    last = -1
    while True:
        entries = int(httpx.get(stats_url, timeout=30).json()["entries"])
        if entries == last or time.monotonic() > deadline:
            return entries
        last = entries
        time.sleep(0.5)


def check_stored(name: str, target: Target) -> None:
    """Every answer the gateway gave is an entry now (at most the cut-off requests more)."""
    assert target.stats_url is not None
    entries = stored_entries(target.stats_url)
    print(f"  {name}: {entries} entries stored, {target.answered} misses answered", flush=True)
    if not target.answered <= entries <= target.sent:
        raise CheckFailed(
            f"{name} stored {entries} entries for {target.answered} misses "
            f"({target.sent} requests sent)"
        )


def start_targets(
    args: argparse.Namespace, nginx: str, tmp: Path, processes: list[Process]
) -> dict[str, Target]:
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    upstream = values["url"]
    proxy, nginx_url = common.start_nginx_cache(nginx, upstream, tmp / "nginx", keys_zone="64m")
    processes.append(proxy)
    targets = {"fake": Target(upstream, caches=False), "nginx": Target(nginx_url, caches=True)}
    sources = {"gateway": None} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    for name, source in sources.items():
        gateway, url = common.start_gateway(
            upstream, tmp / name, log_level=None, log_file=tmp / f"{name}.log", source=source
        )
        processes.append(gateway)
        targets[name] = Target(url, caches=True, stats_url=url + "/_proxy/cache/stats")
    return targets


def benchmark(
    args: argparse.Namespace, nginx: str, tmp: Path, processes: list[Process]
) -> tuple[dict[str, Load], dict[str, Target]]:
    targets = start_targets(args, nginx, tmp, processes)
    script = tmp / "fresh_dates.lua"
    script.write_text(SCRIPT)
    status, _, body = common.fetch(targets["fake"].url + PATH + "?fromDate=01-01-1000")
    if status != 200:
        raise CheckFailed(f"the fake upstream answered {status} to {PATH}")
    print(f"GET {PATH}?fromDate=<new each time>: {len(body)} B body")
    print(f"load: wrk -t1 -c{args.connections} -d{args.duration}s --latency", flush=True)
    for target in targets.values():  # unmeasured: connections and first-use costs
        run(target, script, args.connections, 1)

    def measured(name: str) -> Load:
        return run(targets[name], script, args.connections, args.duration)

    loads = common.interleave(list(targets), args.rounds, measured)
    for name, target in targets.items():
        if target.stats_url is not None:
            check_stored(name, target)
    return loads, targets


def report(args: argparse.Namespace, loads: dict[str, Load], targets: dict[str, Target]) -> None:
    print_table(f"every request a miss, 1 worker each, median of {args.rounds} rounds", loads)
    print(f"\n{'':10s} {'non-2xx':>8s} {'not MISS':>9s}")
    for name, target in targets.items():
        not_miss = f"{target.not_miss:9d}" if target.caches else f"{'-':>9s}"
        print(f"{name:10s} {target.non_2xx:8d} {not_miss}")

    def ratio(a: str, b: str) -> str:
        return f"{loads[a].rps / loads[b].rps:.2f}"

    print(f"\ngateway / nginx  = {ratio('gateway', 'nginx')}")
    print(f"gateway / fake   = {ratio('gateway', 'fake')}")
    print(f"nginx   / fake   = {ratio('nginx', 'fake')}")
    if "baseline" in loads:
        print(f"baseline / nginx = {ratio('baseline', 'nginx')}")
        print(f"gateway / baseline = {ratio('gateway', 'baseline')}")
    cpus = os.cpu_count() or 1
    print(f"\nnote: wrk and the fake upstream share this machine's {cpus} CPUs with the target.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=10, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--baseline-src", type=Path, help="another checkout whose gateway is measured too"
    )
    args = parser.parse_args(argv)
    measured = common.run_measured(functools.partial(benchmark, args))
    if isinstance(measured, int):
        return measured
    loads, targets = measured
    report(args, loads, targets)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
