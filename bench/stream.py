"""Streaming benchmark: a large series zip direct, through the gateway, and through nginx.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.stream --size-mb 1024 --rounds 3

It starts the fake NBIA upstream (tests/fake_nbia) with a large series, the gateway, and nginx
(Debian package ``nginx-light`` or ``nginx``; ``proxy_buffering off``, one worker) in front of
the same upstream, then downloads the zip with curl from each, interleaving the three so that
machine noise hits them alike. It prints MB/s per path (median of the rounds), the ratios from
this one run, and the gateway's peak RSS (VmHWM) during the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common
from bench.common import Process


def start_fake_upstream(size_mb: int) -> tuple[Process, str, str]:
    process, values = common.start_fake_upstream(["--big-zip-mb", str(size_mb)])
    return process, values["url"], values["big_series_uid"]


def start_nginx(upstream: str, tmp: Path) -> tuple[Process | None, str | None]:
    binary = common.find_nginx()
    if binary is None:
        print("nginx not found (apt-get install nginx-light); skipping the nginx row")
        return None, None
    return common.start_nginx(binary, upstream, tmp, location="proxy_buffering off;")


def download(url: str) -> tuple[float, int]:
    """Download with curl to /dev/null; return (MB/s, bytes)."""
    out = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]) / 1e6, int(out[1])


def digest(url: str) -> str:
    md5 = hashlib.md5()
    with subprocess.Popen(["curl", "-s", "-f", url], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        for block in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
            md5.update(block)
    return md5.hexdigest()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of a process (all its threads) and of its live
    children (nginx's workers), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the series zip")
    parser.add_argument("--rounds", type=int, default=3, help="downloads per path")
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2

    processes: list[Process] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            print(f"building a {args.size_mb} MB series zip in the fake upstream ...", flush=True)
            fake, upstream, uid = start_fake_upstream(args.size_mb)
            processes.append(fake)
            gateway, gateway_url = common.start_gateway(upstream, tmp / "data")
            processes.append(gateway)
            nginx, nginx_url = start_nginx(upstream, tmp)
            if nginx is not None:
                processes.append(nginx)
            path = f"/nbia-api/services/v4/getImage?SeriesInstanceUID={uid}"
            targets = {"direct": upstream + path, "gateway": gateway_url + path}
            if nginx_url:
                targets["nginx"] = nginx_url + path

            rss_before, _ = peak_rss_mb(gateway.pid)
            expected = digest(targets["direct"])
            identical = digest(targets["gateway"]) == expected
            speeds: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    mbps, size = download(url)
                    speeds[name].append(mbps)
            _, rss_peak = peak_rss_mb(gateway.pid)

            print(f"\npayload: {size / 1e6:.0f} MB zip, {args.rounds} rounds, curl to /dev/null")
            medians = {name: statistics.median(values) for name, values in speeds.items()}
            for name, values in speeds.items():
                rounds = ", ".join(f"{v:.0f}" for v in values)
                print(f"{name:8s} median {medians[name]:7.0f} MB/s   (rounds: {rounds})")
            print(f"gateway / direct = {medians['gateway'] / medians['direct']:.2f}")
            if "nginx" in medians:
                print(f"nginx   / direct = {medians['nginx'] / medians['direct']:.2f}")
                print(f"gateway / nginx  = {medians['gateway'] / medians['nginx']:.2f}")
            print(f"gateway RSS: {rss_before:.0f} MB at start, peak {rss_peak:.0f} MB")
            print(f"bytes identical through the gateway: {identical}")
        finally:
            common.stop_processes(processes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
