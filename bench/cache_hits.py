"""Cache-hit benchmark: the gateway's metadata cache against nginx proxy_cache and bare uvicorn.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.cache_hits --duration 10 --connections 50 --rounds 2 [--misses]

It measures the defaults: the gateway with its default settings (audit log on, metrics on)
against nginx ``proxy_cache`` writing its default access log to a file (one write per request,
as nginx does unless told to buffer). In the same interleaved rounds it measures both with
their logs off (``gw no log``: ``--audit-log=``; ``ngx no log``: ``access_log off``) and
the default gateway with ``--no-metrics-enabled`` (``no metrics``: the cost of metrics alone
on hits); ``--defaults-only`` leaves those two out. ``--baseline-tree DIR`` adds a gateway run
from another checkout (old code), with ``--baseline-arg`` flags of its own (e.g.
``--log-level=info``, which switched the audit log on before it had a setting).

It starts the fake NBIA upstream (every upstream of the gateways points at it, so update-feed
polls reach it instead of the internet), the gateways and nginx in front of it, and a bare
uvicorn app that answers the same bytes. Once every cache answers HIT it runs the same wrk load
on each, interleaved so that machine noise hits them alike, then repeats gateway and nginx with
two workers each. Exit code 1 when a check fails (e.g. the gateway has no cache yet), 2 when wrk
or nginx is missing. ``--misses`` then runs :mod:`bench.cache_misses`, whose table (every
request a new key) stands beside this one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import cache_misses, common
from bench.common import CheckFailed, Load, Process, fetch, print_table, run_wrk

PATH = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def bare_app() -> ASGIApp:
    """``uvicorn --factory`` target: answer every request with the bytes in $BENCH_BODY_FILE."""
    body = Path(os.environ["BENCH_BODY_FILE"]).read_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def start_bare(body_file: Path) -> tuple[Process, str]:
    port = common.free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "bench.cache_hits:bare_app",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    process = common.launch(command, env=os.environ | {"BENCH_BODY_FILE": str(body_file)})
    common.wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def warm(url: str, header: str, expected: bytes, attempts: int = 20) -> None:
    """Request ``url`` until ``header`` says HIT, and check the body is the upstream's bytes."""
    seen: list[str] = []
    for _ in range(attempts):
        status, headers, body = fetch(url)
        seen.append(f"{status} {header}: {headers.get(header, '(absent)')}")
        if status == 200 and headers.get(header, "").upper() == "HIT":
            if body != expected:
                raise CheckFailed(f"{url} answers other bytes than the upstream ({len(body)} B)")
            return
        time.sleep(0.1)  # let a cache write land before asking again
    if all(line.endswith("(absent)") for line in seen):
        raise CheckFailed(f"{url} sends no {header} header: is its cache in place?")
    raise CheckFailed(f"{url} never answered {header}: HIT; saw {' / '.join(seen[:3])} ...")


def start_baseline(
    tree: Path, upstream: str, data_dir: Path, args: Sequence[str]
) -> tuple[Process, str]:
    """The gateway of another checkout, with its own venv when it has one (at log level
    ``warning`` unless ``args`` sets one: older gateways wrote their audit log at ``info``)."""
    chosen = any(arg.startswith("--log-level") for arg in args)
    level = None if chosen else "warning"
    return common.start_gateway(upstream, data_dir, list(args), source=tree, log_level=level)


def start_pair(
    nginx: str,
    upstream: str,
    tmp: Path,
    workers: int,
    body: bytes,
    processes: list[Process],
    args: argparse.Namespace,
) -> dict[str, str]:
    """Start gateway and nginx with ``workers`` workers each (into ``processes``), and with one
    worker the variants measured beside them; warm them all."""
    sub = tmp / f"{workers}w"
    sub.mkdir()
    # Every upstream at the fake one: the update-feed poller polls it, as it would TCIA.
    # The default flag (1 worker) is left out so the script also runs before --workers exists.
    extra = ["--nlst-upstream", upstream]
    extra += ["--workers", str(workers)] if workers > 1 else []
    urls: dict[str, str] = {}
    proxies: set[str] = set()  # the nginx ones, which say X-Cache-Status

    def gateway(name: str, flags: list[str]) -> None:
        process, url = common.start_gateway(upstream, sub / name.replace(" ", "-"), flags)
        processes.append(process)
        urls[name] = url + PATH

    def proxy(name: str, access_log: str) -> None:
        process, url = common.start_nginx_cache(
            nginx, upstream, sub / name.replace(" ", "-"), workers, access_log=access_log
        )
        processes.append(process)
        urls[name] = url + PATH
        proxies.add(name)

    gateway("gateway", extra)
    proxy("nginx", str(sub / "nginx-access.log"))
    if workers == 1 and not args.defaults_only:
        gateway("gw no log", [*extra, "--audit-log="])
        proxy("ngx no log", "off")
        gateway("no metrics", [*extra, "--no-metrics-enabled"])
    if args.baseline_tree is not None and workers == 1:
        old, old_url = start_baseline(
            args.baseline_tree, upstream, sub / "baseline-data", [*extra, *args.baseline_arg]
        )
        processes.append(old)
        urls["baseline"] = old_url + PATH
    for name, url in urls.items():
        warm(url, "X-Cache-Status" if name in proxies else "X-Cache", body)
    return urls


def measure(urls: dict[str, str], rounds: int, connections: int, seconds: int) -> dict[str, Load]:
    """Interleave the targets round by round; median of each figure over the rounds."""
    for url in urls.values():
        run_wrk(url, connections, 1)  # unmeasured: every worker gets its first hit and connects
    return common.interleave(
        list(urls), rounds, lambda name: run_wrk(urls[name], connections, seconds)
    )


def benchmark(
    args: argparse.Namespace, nginx: str, tmp: Path, processes: list[Process]
) -> tuple[dict[str, Load], dict[str, Load]]:
    """Start everything (recorded in ``processes``), check, measure 1 then 2 workers."""
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    status, _, body = fetch(values["url"] + PATH)
    if status != 200:
        raise CheckFailed(f"the fake upstream answered {status} to {PATH}")
    (tmp / "body.json").write_bytes(body)
    bare, bare_url = start_bare(tmp / "body.json")
    processes.append(bare)
    urls = start_pair(nginx, values["url"], tmp, 1, body, processes, args)
    print(f"GET {PATH}: {len(body)} B body, same bytes from upstream, gateway and nginx")
    print(f"load: wrk -t1 -c{args.connections} -d{args.duration}s --latency", flush=True)
    wrk_args = (args.connections, args.duration)
    one = measure(urls | {"bare ASGI": bare_url + PATH}, args.rounds, *wrk_args)
    if args.skip_two_workers:
        return one, {}
    common.stop_processes(processes[-len(urls) :])  # the 1-worker set: free the CPUs

    urls = start_pair(nginx, values["url"], tmp, 2, body, processes, args)
    print("2 workers each:", flush=True)
    return one, measure(urls, 1, *wrk_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (1 worker)")
    parser.add_argument("--skip-two-workers", action="store_true", help="skip the 2-worker part")
    parser.add_argument(
        "--misses",
        action="store_true",
        help="then run bench.cache_misses (every request a new key) for the figures beside these",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="measure only the defaults (not the logs-off pair and the metrics-off gateway)",
    )
    # Kept for older command lines: what they asked for is now measured in every run.
    parser.add_argument("--logs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metrics-cost", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline-tree", type=Path, help="also measure the gateway of this checkout"
    )
    parser.add_argument(
        "--baseline-arg", action="append", default=[], help="a flag for the baseline gateway"
    )
    args = parser.parse_args(argv)
    measured = common.run_measured(functools.partial(benchmark, args))
    if isinstance(measured, int):
        return measured
    one, two = measured
    print_table(f"1 worker each, median of {args.rounds} rounds", one)
    print("defaults: gateway audit log and metrics on, nginx access log to a file")
    print(f"gateway / nginx (1 worker)  = {one['gateway'].rps / one['nginx'].rps:.2f}")
    if "gw no log" in one:
        ratio = one["gw no log"].rps / one["ngx no log"].rps
        print(f"both logs off: gateway / nginx = {ratio:.2f}")
    if "no metrics" in one:
        ratio = one["gateway"].rps / one["no metrics"].rps
        print(f"gateway / no metrics        = {ratio:.3f} (metrics cost {1 - ratio:+.1%})")
    print(f"gateway / bare ASGI         = {one['gateway'].rps / one['bare ASGI'].rps:.2f}")
    if "baseline" in one:
        print(f"baseline / nginx (1 worker) = {one['baseline'].rps / one['nginx'].rps:.2f}")
        print(f"gateway / baseline          = {one['gateway'].rps / one['baseline'].rps:.2f}")
    if two:
        print_table("2 workers each, 1 round", two)
        print(f"gateway / nginx (2 workers) = {two['gateway'].rps / two['nginx'].rps:.2f}")
    cpus = os.cpu_count() or 1
    print(f"\nnote: wrk (one thread) shares this machine and keeps one of its {cpus} CPUs busy.")
    if two and cpus <= 2:
        print("With 2 workers the servers and wrk contend for the CPUs: contention, not scaling.")
    if args.misses:
        print("\nmisses (python -m bench.cache_misses):", flush=True)
        return cache_misses.main(["--duration", str(args.duration), "--rounds", str(args.rounds)])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
