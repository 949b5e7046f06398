"""Cache hits of two replicas behind deploy/nginx.conf against one gateway, on one PostgreSQL.

Run on purpose (not part of the test suite; needs nginx, wrk and PostgreSQL)::

    .venv/bin/python -m bench.department --duration 5 --rounds 2

It starts the fake NBIA upstream, a scratch database on the PostgreSQL of
``NBIA_PROXY_TEST_POSTGRES_URL`` (default: the local ``test`` database; dropped afterwards),
two gateways on it and nginx running ``deploy/nginx.conf`` in front of them (as
``deploy/compose.yaml`` does), then the same wrk load on one gateway directly, on nginx in
front of that one alone, and on nginx in front of both, interleaved. On a small machine the
replicas, nginx and wrk share the CPUs: the figures show that contention, not a cluster's
scaling. Exit code 1 when a check fails, 2 when wrk, nginx or PostgreSQL is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench import common
from bench.cache_hits import PATH, warm
from bench.common import CheckFailed, Process, fetch, print_table, run_wrk
from tests.deploy_nginx import local_nginx_conf

POSTGRES = os.environ.get(
    "NBIA_PROXY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _database(action: str, name: str) -> None:
    import psycopg

    url = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as connection:
        if action == "create":
            connection.execute(f'CREATE DATABASE "{name}"')
        else:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _nginx(binary: str, servers: list[str], directory: Path) -> tuple[Process, str]:
    directory.mkdir(parents=True)
    port = common.free_port()
    conf = local_nginx_conf(directory, servers, port)
    process = common.launch(
        [binary, "-c", str(conf), "-e", str(directory / "error.log"), "-g", "daemon off;"]
    )
    common.wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    args = parser.parse_args(argv)
    nginx = common.find_nginx()
    if nginx is None or shutil.which("wrk") is None:
        print("needs nginx and wrk: apt-get install nginx-light wrk", file=sys.stderr)
        return 2
    name = f"nbia_bench_{uuid.uuid4().hex[:12]}"
    try:
        _database("create", name)
    except Exception as exc:  # noqa: BLE001 -- any failure: no PostgreSQL to measure on
        print(f"needs PostgreSQL ({POSTGRES}): {exc}", file=sys.stderr)
        return 2
    processes: list[Process] = []
    try:
        with tempfile.TemporaryDirectory(prefix="nbia-bench-department-") as scratch:
            tmp = Path(scratch)
            try:
                measure(args, nginx, tmp, name, processes)
            finally:
                common.stop_processes(processes)  # before their files go
    except CheckFailed as exc:
        print(f"check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _database("drop", name)
    return 0


def measure(
    args: argparse.Namespace, nginx: str, tmp: Path, name: str, processes: list[Process]
) -> None:
    """Start everything (into ``processes``) on database ``name``, warm, measure, print."""
    fake, values = common.start_fake_upstream()
    processes.append(fake)
    status, _, body = fetch(values["url"] + PATH)
    if status != 200:
        raise CheckFailed(f"the fake upstream answered {status} to {PATH}")
    database = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "--database-url", database,
         "--data-dir", str(tmp / "migrate")],
        check=True,
    )  # fmt: skip
    replicas = []
    for index in (1, 2):
        extra = ["--database-url", database, "--no-auto-migrate", "--audit-log="]
        extra += ["--binary-dir", str(tmp / "series-cache")]
        gateway, url = common.start_gateway(values["url"], tmp / f"data{index}", extra)
        processes.append(gateway)
        replicas.append(url)
    hosts = [url.removeprefix("http://") for url in replicas]
    # nginx in front of one replica: the same config with both entries naming it.
    alone, alone_url = _nginx(nginx, [hosts[0], hosts[0]], tmp / "nginx-one")
    both, both_url = _nginx(nginx, hosts, tmp / "nginx-two")
    processes += [alone, both]
    urls = {
        "1 gateway": replicas[0] + PATH,
        "nginx+1": alone_url + PATH,
        "nginx+2": both_url + PATH,
    }
    for url in [*(r + PATH for r in replicas), *urls.values()]:
        warm(url, "X-Cache", body)
    print(f"GET {PATH}: {len(body)} B body; one PostgreSQL database, two replicas")
    print(f"load: wrk -t1 -c{args.connections} -d{args.duration}s --latency", flush=True)
    for url in urls.values():
        run_wrk(url, args.connections, 1)  # unmeasured: connections and first hits
    loads = common.interleave(
        list(urls),
        args.rounds,
        lambda target: run_wrk(urls[target], args.connections, args.duration),
    )
    print_table(f"median of {args.rounds} rounds", loads)
    base = loads["1 gateway"].rps
    print(f"nginx+2 / 1 gateway = {loads['nginx+2'].rps / base:.2f}")
    print(f"nginx+2 / nginx+1   = {loads['nginx+2'].rps / loads['nginx+1'].rps:.2f}")
    print(f"\nnote: {os.cpu_count()} CPUs shared by wrk, nginx and the replicas.")


if __name__ == "__main__":
    raise SystemExit(main())
