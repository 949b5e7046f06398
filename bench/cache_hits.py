"""Cache-hit benchmark: the gateway's metadata cache against nginx proxy_cache and bare uvicorn.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.cache_hits --duration 10 --connections 50 --rounds 2

``--logs``: nginx writes its default access log to a file (one write per request, as nginx does
unless told to buffer) and the gateway its default audit log; without it both are off.
``--baseline-tree DIR`` adds a gateway run from another checkout (old code), measured in the
same interleaved rounds, with ``--baseline-arg`` flags of its own (e.g. ``--log-level=info``,
which switched the audit log on before it had a setting).

It starts the fake NBIA upstream, the gateway and nginx (``proxy_cache``) in front of it, and a
bare uvicorn app that answers the same bytes (the ceiling for Python on this machine). Once both
caches answer HIT it runs the same wrk load on each, interleaved so that machine noise hits them
alike, then repeats gateway and nginx with two workers each. Exit code 1 when a check fails
(e.g. the gateway has no cache yet), 2 when wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import common
from bench.common import Process

PATH = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
NGINX_CONF = """
worker_processes {workers};
user {user};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {access_log};
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  proxy_cache_path {tmp}/cache keys_zone=bench:1m;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      add_header X-Cache-Status $upstream_cache_status;
    }}
  }}
}}
"""
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
FIGURES = ("rps", "p50_ms", "p99_ms")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class CheckFailed(Exception):
    """A precondition of a fair comparison does not hold; the message says which."""


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float


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


def fetch(url: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET on a fresh connection: (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


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


def run_wrk(url: str, connections: int, seconds: int, headers: Sequence[str] = ()) -> Load:
    """One wrk run (with extra ``Name: value`` headers); refuse figures with error responses."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    command += [arg for header in headers for arg in ("-H", header)]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        raise CheckFailed(f"wrk got {match[1]} error responses from {url}:\n{out}")
    if match := re.search(r"Socket errors: (.*)", out):
        print(f"  warning: wrk socket errors on {url}: {match[1]}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    if not (rps and p50 and p99):
        raise CheckFailed(f"cannot parse wrk output:\n{out}")
    return Load(float(rps[1]), *(float(m[1]) * _UNIT_MS[m[2]] for m in (p50, p99)))


def start_baseline(
    tree: Path, upstream: str, data_dir: Path, args: Sequence[str]
) -> tuple[Process, str]:
    """The gateway of another checkout (``python -m proxy`` run from ``tree``)."""
    port = common.free_port()
    command = [
        sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream,
        "--data-dir", str(data_dir), "--log-level", "warning", *args,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(tree)}
    process = common.launch(command, cwd=tree, env=env)
    common.wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def start_pair(
    nginx: str,
    upstream: str,
    tmp: Path,
    workers: int,
    body: bytes,
    processes: list[Process],
    args: argparse.Namespace,
) -> dict[str, str]:
    """Start gateway and nginx with ``workers`` workers each (into ``processes``); warm both."""
    sub = tmp / f"{workers}w"
    (sub / "nginx").mkdir(parents=True)
    # The default flag (1 worker) is left out so the script also runs before --workers exists.
    extra = ["--workers", str(workers)] if workers > 1 else []
    if not args.logs:
        extra.append("--audit-log=")
    gateway, gateway_url = common.start_gateway(upstream, sub / "data", extra)
    processes.append(gateway)
    # Started by root, nginx workers would run as `nobody`, who cannot enter the 0700 temp dir.
    user = pwd.getpwuid(os.getuid()).pw_name
    access_log = f"{sub / 'nginx' / 'access.log'}" if args.logs else "off"
    proxy, nginx_url = common.start_nginx(
        nginx,
        NGINX_CONF,
        sub / "nginx",
        upstream=upstream,
        workers=workers,
        user=user,
        access_log=access_log,
    )
    processes.append(proxy)
    urls = {"gateway": gateway_url + PATH, "nginx": nginx_url + PATH}
    if args.baseline_tree is not None and workers == 1:
        old, old_url = start_baseline(
            args.baseline_tree, upstream, sub / "baseline-data", args.baseline_arg
        )
        processes.append(old)
        urls["baseline"] = old_url + PATH
        warm(urls["baseline"], "X-Cache", body)
    warm(urls["gateway"], "X-Cache", body)
    warm(urls["nginx"], "X-Cache-Status", body)
    return urls


def measure(urls: dict[str, str], rounds: int, connections: int, seconds: int) -> dict[str, Load]:
    """Interleave the targets round by round; median of each figure over the rounds."""
    for url in urls.values():
        run_wrk(url, connections, 1)  # unmeasured: every worker gets its first hit and connects
    runs: dict[str, list[Load]] = {name: [] for name in urls}
    for round_ in range(1, rounds + 1):
        for name, url in urls.items():
            runs[name].append(run_wrk(url, connections, seconds))
            print(f"  round {round_} {name:10s} {runs[name][-1].rps:9.0f} req/s", flush=True)
    return {
        name: Load(*(statistics.median(getattr(load, f) for load in loads) for f in FIGURES))
        for name, loads in runs.items()
    }


def print_table(title: str, loads: dict[str, Load]) -> None:
    print(f"\n{title}\n{'':10s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, load in loads.items():
        print(f"{name:10s} {load.rps:9.0f} {load.p50_ms:8.2f} {load.p99_ms:8.2f}")


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
    pair = 3 if args.baseline_tree is not None else 2
    common.stop_processes(processes[-pair:])  # the 1-worker pair: free the CPUs for the next
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
        "--logs",
        action="store_true",
        help="nginx writes its access log to a file, the gateway its default audit log "
        "(default: both off)",
    )
    parser.add_argument(
        "--baseline-tree", type=Path, help="also measure the gateway of this checkout"
    )
    parser.add_argument(
        "--baseline-arg", action="append", default=[], help="a flag for the baseline gateway"
    )
    args = parser.parse_args(argv)
    nginx = common.find_nginx()
    if shutil.which("wrk") is None or nginx is None:
        print("wrk and nginx are required (apt-get install wrk nginx-light)", file=sys.stderr)
        return 2

    processes: list[Process] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            try:
                one, two = benchmark(args, nginx, Path(tmpdir), processes)
            finally:
                common.stop_processes(processes)
    except CheckFailed as exc:
        print(f"\nnot measured: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; processes stopped", file=sys.stderr)
        return 130

    print_table(f"1 worker each, median of {args.rounds} rounds", one)
    print(f"gateway / nginx (1 worker)  = {one['gateway'].rps / one['nginx'].rps:.2f}")
    print(f"gateway / bare ASGI         = {one['gateway'].rps / one['bare ASGI'].rps:.2f}")
    if "baseline" in one:
        print(f"baseline / nginx (1 worker) = {one['baseline'].rps / one['nginx'].rps:.2f}")
        print(f"gateway / baseline          = {one['gateway'].rps / one['baseline'].rps:.2f}")
    print(f"logs: {'nginx access log and gateway audit log on' if args.logs else 'both off'}")
    if two:
        print_table("2 workers each, 1 round", two)
        print(f"gateway / nginx (2 workers) = {two['gateway'].rps / two['nginx'].rps:.2f}")
    cpus = os.cpu_count() or 1
    print(f"\nnote: wrk (one thread) shares this machine and keeps one of its {cpus} CPUs busy.")
    if two and cpus <= 2:
        print("With 2 workers the servers and wrk contend for the CPUs: contention, not scaling.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
