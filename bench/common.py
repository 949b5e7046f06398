"""Shared by the benchmarks: free ports, starting the fake upstream, gateway and nginx, cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Process = subprocess.Popen[bytes] | subprocess.Popen[str]


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
    upstream: str, data_dir: Path, extra_args: Sequence[str] = ()
) -> tuple[Process, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream,
        "--data-dir", str(data_dir), "--log-level", "warning", *extra_args,
    ]  # fmt: skip
    process = launch(command)
    wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def start_nginx(binary: str, template: str, tmp: Path, **fields: object) -> tuple[Process, str]:
    """Run nginx in the foreground with ``template`` formatted with tmp, port and ``fields``."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(template.format(tmp=tmp, port=port, **fields))
    process = launch([binary, "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    wait_for_port(port, timeout=30, process=process)
    return process, f"http://127.0.0.1:{port}"


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
