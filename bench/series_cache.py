"""Series cache benchmark: kept zips against nginx sendfile, cold fills against an nginx relay.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.series_cache --size-mb 1024 --rounds 3

It starts the fake NBIA upstream with a large series, the gateway, and nginx (one worker), and
measures, interleaved so that machine noise hits both sides alike:

* hits: the kept zip through the gateway vs nginx serving the same file (``sendfile on``),
  with the file in the page cache (read once before each download) and, as ``*-disk``, without
  it (its pages dropped before each: fills write past the page cache, so the first hit after a
  fill reads the disk);
* cold: a download that fills the cache (``Cache-Control: no-cache``: fetched, checked, kept
  again), as the client sees it, vs nginx relaying the upstream with ``proxy_buffering off``;
  ``cold-kept``: the same download until the file is kept (its commit, which reads the sha256
  back from the disk, ends after the client's last byte; the next path waits for it, and the
  cold path's CPU includes it);
* the same download through a gateway without the series cache (``relay-only``: what relaying
  alone costs here);
* the CPU seconds each gateway (and the fake upstream) spent per GB on each path: on a small
  machine the upstream, curl and the gateway share the cores, so these show where the floor is;
* the gateway's peak RSS (VmHWM) over both, its schema migrated beforehand as
  ``deploy/nbia-proxy.service`` does (a start that migrates loads Alembic: about 8 MB more);
* 20 concurrent cold requests (``--concurrent``) for one series through a second gateway whose
  upstream is an nginx relay that logs each request: how many reached the upstream.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common
from bench.common import Process
from bench.stream import cpu_seconds, download, peak_rss_mb

# The kept files are 0600 in 0700 directories: the worker must be the gateway's user
# (when nginx does not run as root, the directive is ignored and it already is).
KEPT_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}")

NGINX_CONF = """
user {user};
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {tmp}/access.log;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    location = /kept.zip {{
      alias {kept};
      default_type application/octet-stream;
    }}
    location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_buffering off;
    }}
  }}
}}
"""


def curl(url: str, *headers: str) -> tuple[float, int]:
    """Download with curl to /dev/null; return (MB/s, bytes)."""
    command = ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}"]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run([*command, url], check=True, capture_output=True, text=True)
    speed, size = out.stdout.split()
    return float(speed) / 1e6, int(size)


def kept_file(data_dir: Path) -> Path:
    """The published file (the client's download may end while its fsync and row are due)."""
    while True:
        files = [p for p in (data_dir / "binaries").rglob("*") if KEPT_NAME.fullmatch(p.name)]
        if files:
            return max(files, key=lambda p: p.stat().st_size)
        time.sleep(0.1)


def until_kept(data_dir: Path) -> None:
    """Wait until no fill's temporary file is left: a fill's commit (its fsync, the sha256
    read back from the disk, the rename) goes on after the client's last byte, and must
    neither overlap the next path measured nor be left out of the cold path's CPU. (Watched
    on the disk: polling the gateway's stats would cost the gateway CPU.)"""
    while any(".part-" in p.name for p in (data_dir / "binaries").rglob("*")):
        time.sleep(0.005)


def in_page_cache(path: Path) -> None:
    """Read ``path`` once, so that the next download finds it in the page cache."""
    with path.open("rb", buffering=0) as file:
        while file.read(8 * 1024 * 1024):
            pass


def out_of_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: any user may)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def migrate(data_dir: Path) -> None:
    """``nbia-proxy migrate``: the serving process then never loads Alembic (as deployed)."""
    command = [sys.executable, "-m", "proxy", "migrate", "--data-dir", str(data_dir)]
    subprocess.run(command, check=True, capture_output=True)


def start_nginx(binary: str, tmp: Path, upstream: str, kept: Path) -> tuple[Process, str]:
    """nginx (:data:`NGINX_CONF`): the kept file by ``sendfile``, the rest relayed unbuffered
    (its own configuration: :func:`bench.common.start_nginx` has one ``location`` only)."""
    port = common.free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=getpass.getuser(), tmp=tmp, port=port, upstream=upstream, kept=kept
        )  # fmt: skip
    )
    process = common.launch([binary, "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    common.wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the series zip")
    parser.add_argument("--rounds", type=int, default=3, help="downloads per path")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=20,
        help="cold requests at once for the upstream count (0: skip; 20 GB of transfer at 1 GB)",
    )
    args = parser.parse_args(argv)
    nginx_binary = common.find_nginx()
    if nginx_binary is None:
        print("nginx is required (apt-get install nginx-light)", file=sys.stderr)
        return 2
    processes: list[Process] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            print(f"building a {args.size_mb} MB series zip in the fake upstream ...", flush=True)
            fake, values = common.start_fake_upstream(["--big-zip-mb", str(args.size_mb)])
            processes.append(fake)
            upstream, uid = values["url"], values["big_series_uid"]
            data = tmp / "data"
            migrate(data)
            migrate(tmp / "data-relay")
            gateway, gateway_url = common.start_gateway(upstream, data)
            processes.append(gateway)
            rss_start, _ = peak_rss_mb(gateway.pid)
            path = f"/nbia-api/services/v4/getImage?SeriesInstanceUID={uid}"
            _, size = curl(gateway_url + path)  # the first fill: keeps the zip
            kept = kept_file(data)
            assert kept.stat().st_size == size, "the zip was not kept (see the gateway's log)"
            nginx, nginx_url = start_nginx(nginx_binary, tmp, upstream, kept)
            processes.append(nginx)
            # The gateway without the series cache: what relaying alone costs (the baseline).
            relay, relay_url = common.start_gateway(
                upstream, tmp / "data-relay", ["--no-binary-cache-enabled"]
            )
            processes.append(relay)
            speeds: dict[str, list[float]] = {
                "hit": [],
                "nginx-sendfile": [],
                "hit-disk": [],
                "nginx-disk": [],
                "cold": [],
                "cold-kept": [],
                "nginx-relay": [],
                "relay-only": [],
            }
            # CPU seconds per path: of the process that answers it, and of the fake upstream.
            cpu: dict[str, list[float]] = {n: [0.0, 0.0] for n in speeds if n != "cold-kept"}
            runs = {
                "hit": (gateway.pid, gateway_url + path, ()),
                "nginx-sendfile": (nginx.pid, nginx_url + "/kept.zip", ()),
                "hit-disk": (gateway.pid, gateway_url + path, ()),
                "nginx-disk": (nginx.pid, nginx_url + "/kept.zip", ()),
                "cold": (gateway.pid, gateway_url + path, ("Cache-Control: no-cache",)),
                "nginx-relay": (nginx.pid, nginx_url + path, ()),
                "relay-only": (relay.pid, relay_url + path, ()),
            }
            for _ in range(args.rounds):
                for name, (pid, url, headers) in runs.items():
                    if name in ("hit", "nginx-sendfile"):
                        in_page_cache(kept)
                    elif name.endswith("-disk"):
                        out_of_page_cache(kept)
                    before = cpu_seconds(pid), cpu_seconds(fake.pid)
                    started = time.monotonic()
                    speeds[name].append(curl(url, *headers)[0])
                    if name == "cold":
                        until_kept(data)
                        speeds["cold-kept"].append(size / 1e6 / (time.monotonic() - started))
                    cpu[name][0] += cpu_seconds(pid) - before[0]
                    cpu[name][1] += cpu_seconds(fake.pid) - before[1]
            _, rss_peak = peak_rss_mb(gateway.pid)
            _, relay_peak = peak_rss_mb(relay.pid)
            medians = {name: statistics.median(v) for name, v in speeds.items()}
            print(f"\npayload: {size / 1e6:.0f} MB zip, {args.rounds} rounds, curl to /dev/null")
            for name, values_ in speeds.items():
                rounds = ", ".join(f"{v:.0f}" for v in values_)
                print(f"{name:15s} median {medians[name]:7.0f} MB/s   (rounds: {rounds})")
            gigabytes = args.rounds * size / 2**30
            print("CPU s/GB (answering process, fake upstream): " + ", ".join(
                f"{name} {own / gigabytes:.2f} + {up / gigabytes:.2f}"
                for name, (own, up) in cpu.items()
            ))  # fmt: skip
            print(f"hit  / nginx sendfile = {medians['hit'] / medians['nginx-sendfile']:.2f}")
            print(f"hit from disk / nginx = {medians['hit-disk'] / medians['nginx-disk']:.2f}")
            print(f"cold / nginx relay    = {medians['cold'] / medians['nginx-relay']:.2f}")
            print(f"cold / relay-only     = {medians['cold'] / medians['relay-only']:.2f}")
            kept_ratio = medians["cold-kept"] / medians["nginx-relay"]
            print(f"cold until kept / nginx relay = {kept_ratio:.2f}")
            print(
                f"gateway peak RSS (VmHWM): {rss_peak:.0f} MB "
                f" (at start {rss_start:.0f} MB; relay-only gateway peak: {relay_peak:.0f} MB)"
            )

            if not args.concurrent:
                return 0
            # Concurrent cold requests, counted at an nginx relay in front of the upstream.
            second, second_url = common.start_gateway(nginx_url, tmp / "data2")
            processes.append(second)
            log = tmp / "access.log"
            before = log.read_text().count("getImage") if log.exists() else 0
            n = args.concurrent
            with ThreadPoolExecutor(n) as pool:
                sizes = list(pool.map(lambda _: download(second_url + path)[1], range(n)))
            after = log.read_text().count("getImage")
            print(
                f"{n} concurrent cold requests: {after - before} upstream request(s), "
                f"{sum(s == size for s in sizes)}/{n} complete answers"
            )
        finally:
            common.stop_processes(processes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
