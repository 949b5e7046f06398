"""Shared by the benchmarks: free ports, starting the fake upstream, gateway and nginx, wrk
runs and their figures, cleanup."""

from __future__ import annotations

import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

Process = subprocess.Popen[bytes] | subprocess.Popen[str]
T = TypeVar("T")

#: nginx in front of ``{upstream}``; ``{http}`` and ``{location}`` add directives.
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
  {http}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      {location}
    }}
  }}
}}
"""
#: ``proxy_cache``: the reference for the gateway's cache.
NGINX_CACHE_HTTP = "proxy_cache_path {tmp}/cache keys_zone=bench:{keys_zone};"
NGINX_CACHE_LOCATION = """proxy_cache bench;
      proxy_cache_valid 200 1h;
      add_header X-Cache-Status $upstream_cache_status;"""
FIGURES = ("rps", "p50_ms", "p99_ms")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class CheckFailed(Exception):
    """A precondition of a fair comparison does not hold; the message says which."""


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: its figures, what it counted, and its whole output (for a Lua ``done``)."""

    load: Load
    requests: int
    non_2xx: int
    output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 600.0, process: Process | None = None) -> None:
    """Wait until ``port`` accepts; if ``process`` is given, stop it when it will not."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on port {port}")
    except BaseException:
        # The caller never gets the process, so it could not clean it up.
        if process is not None:
            stop_processes([process])
        raise


def launch(command: Sequence[str], **kwargs: Any) -> Process:
    """Start ``command`` in its own process group, so that cleanup also reaches its workers."""
    return subprocess.Popen(command, start_new_session=True, **kwargs)


def start_fake_upstream(extra_args: Sequence[str] = ()) -> tuple[Process, dict[str, str]]:
    """Start ``tests.fake_nbia``; return it and the ``key=value`` lines it printed (url, ...)."""
    port = free_port()
    process = launch(
        [sys.executable, "-m", "tests.fake_nbia", "--port", str(port), *extra_args],
        stdout=subprocess.PIPE,
        text=True,
    )
    values: dict[str, str] = {}
    assert process.stdout is not None
    while "big_series_uid" not in values or "url" not in values:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the fake upstream exited before printing its URL")
        key, _, value = line.strip().partition("=")
        values[key] = value
    wait_for_port(port, process=process)
    return process, values


def start_gateway(
    upstream: str,
    data_dir: Path,
    extra_args: Sequence[str] = (),
    *,
    log_level: str | None = "warning",
    log_file: Path | None = None,
    source: Path | None = None,
) -> tuple[Process, str]:
    """The gateway at ``log_level`` (None: its default, which writes the audit log) with its
    log in ``log_file`` (else on this stderr); ``source``: another checkout to run, with the
    packages of its own ``.venv`` when it has one (what it depends on may differ)."""
    port = free_port()
    python = sys.executable
    if source is not None and (source / ".venv/bin/python").exists():
        python = str(source / ".venv/bin/python")
    command = [
        python, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream,
        "--data-dir", str(data_dir), *extra_args,
    ]  # fmt: skip
    if log_level is not None:
        command += ["--log-level", log_level]
    stderr = log_file.open("ab") if log_file is not None else None
    try:
        # `python -m` puts the working directory first on the path: its `proxy` is the one run.
        process = launch(command, stderr=stderr, cwd=source)
    finally:
        if stderr is not None:
            stderr.close()
    wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def start_nginx(
    binary: str,
    upstream: str,
    tmp: Path,
    workers: int = 1,
    http: str = "",
    location: str = "",
    access_log: str = "off",
) -> tuple[Process, str]:
    """Run nginx (:data:`NGINX_CONF`) in the foreground, its files in ``tmp`` (created);
    ``access_log``: a file for its default access log, or ``off``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Started by root, nginx workers would run as `nobody`, who cannot enter the 0700 temp dir.
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp,
            port=port,
            upstream=upstream,
            workers=workers,
            user=user,
            http=http,
            location=location,
            access_log=access_log,
        )  # fmt: skip
    )
    process = launch([binary, "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def start_nginx_cache(
    binary: str,
    upstream: str,
    tmp: Path,
    workers: int = 1,
    keys_zone: str = "1m",
    access_log: str = "off",
) -> tuple[Process, str]:
    """nginx with ``proxy_cache`` (valid 1 h, ``X-Cache-Status``) in front of ``upstream``."""
    http = NGINX_CACHE_HTTP.format(tmp=tmp, keys_zone=keys_zone)
    return start_nginx(binary, upstream, tmp, workers, http, NGINX_CACHE_LOCATION, access_log)


def run_measured(measure: Callable[[str, Path, list[Process]], T]) -> T | int:
    """``measure(nginx, tmp, processes)`` in a temporary directory, then stop the processes it
    recorded; an exit code when it could not measure (2: no wrk or nginx, 1: a check failed)."""
    nginx = find_nginx()
    if shutil.which("wrk") is None or nginx is None:
        print("wrk and nginx are required (apt-get install wrk nginx-light)", file=sys.stderr)
        return 2
    processes: list[Process] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            try:
                return measure(nginx, Path(tmpdir), processes)
            finally:
                stop_processes(processes)
    except CheckFailed as exc:
        print(f"\nnot measured: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; processes stopped", file=sys.stderr)
        return 130


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


def wrk(
    url: str,
    connections: int,
    seconds: int,
    headers: Sequence[str] = (),
    script: Path | None = None,
    script_args: Sequence[str] = (),
) -> WrkRun:
    """One wrk run (one thread; extra ``Name: value`` headers; a Lua ``script`` with args)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += [arg for header in headers for arg in ("-H", header)]
    command += ["-s", str(script), url, "--", *script_args] if script else [url]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    if match := re.search(r"Socket errors: (.*)", out):
        print(f"  warning: wrk socket errors on {url}: {match[1]}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"^\s*(\d+) requests in", out, re.M)
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    if not (rps and count and p50 and p99):
        raise CheckFailed(f"cannot parse wrk output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    load = Load(float(rps[1]), *(float(m[1]) * _UNIT_MS[m[2]] for m in (p50, p99)))
    return WrkRun(load, int(count[1]), int(errors[1]) if errors else 0, out)


def run_wrk(url: str, connections: int, seconds: int, headers: Sequence[str] = ()) -> Load:
    """One wrk run (with extra ``Name: value`` headers); refuse figures with error responses."""
    run = wrk(url, connections, seconds, headers)
    if run.non_2xx:
        raise CheckFailed(f"wrk got {run.non_2xx} error responses from {url}:\n{run.output}")
    return run.load


def interleave(targets: Sequence[str], rounds: int, run: Callable[[str], Load]) -> dict[str, Load]:
    """``run`` each target once a round, rounds in turn; the median of each figure."""
    runs: dict[str, list[Load]] = {name: [] for name in targets}
    for round_ in range(1, rounds + 1):
        for name in targets:
            runs[name].append(run(name))
            print(f"  round {round_} {name:10s} {runs[name][-1].rps:9.0f} req/s", flush=True)
    return {
        name: Load(*(statistics.median(getattr(load, f) for load in loads) for f in FIGURES))
        for name, loads in runs.items()
    }


def print_table(title: str, loads: dict[str, Load]) -> None:
    print(f"\n{title}\n{'':10s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, load in loads.items():
        print(f"{name:10s} {load.rps:9.0f} {load.p50_ms:8.2f} {load.p99_ms:8.2f}")


def stop_processes(processes: Iterable[Process]) -> None:
    """Terminate each process group (newest first), then kill what has not exited in 10 s."""
    processes = list(processes)
    for process in reversed(processes):
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=10)


def _signal_group(process: Process, sig: signal.Signals) -> None:
    # The group outlives a leader that already exited (e.g. uvicorn workers), so signal anyway.
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
