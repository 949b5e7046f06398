"""Run the real gateway under uvicorn in a background thread, on a free loopback port.

httpx's ASGITransport buffers whole bodies and skips the server's connection handling, so
streaming, disconnects and aborted transfers are only observable over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn
import uvloop

from proxy.app import create_app
from proxy.config import Settings
from proxy.gateway import Gateway
from proxy.server import Server, uvicorn_options

#: How long a gateway may take to start before a test gives up on it: generous, since the
#: machine may be loaded (a CI run beside other work); a start that hangs still fails here.
START_SECONDS = 90.0


def make_settings(
    data_dir: Path, upstream: str, nlst_upstream: str | None = None, **extra: Any
) -> Settings:
    """Settings for a test gateway: loopback upstreams and a private data dir."""
    return Settings(
        upstream=upstream,
        nlst_upstream=nlst_upstream or upstream,
        data_dir=data_dir,
        # Also the wait for a pooled upstream connection: generous, for a loaded CI machine.
        connect_timeout_seconds=extra.pop("connect_timeout_seconds", 10.0),
        read_timeout_seconds=extra.pop("read_timeout_seconds", 5.0),
        # The tests' caches are tiny: they must not stop writing on a machine whose disk is
        # nearly full (the default reserve is 256 MiB; its own tests set it).
        cache_min_free_disk_bytes=extra.pop("cache_min_free_disk_bytes", 1024 * 1024),
        # No update-feed polls unless a test asks: they would show in the fakes' request logs.
        update_poll_seconds=extra.pop("update_poll_seconds", 0),
        # The tests force polls back to back: no minimum between them unless a test sets one.
        update_forced_poll_seconds=extra.pop("update_forced_poll_seconds", 0),
        **extra,
    )


class GatewayServer:
    """The gateway app served by uvicorn in a thread; ``url`` is its base URL."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_keep_alive: int = 5,
        loop: str = "asyncio",
        uvicorn_extra: dict[str, Any] | None = None,
        **create_kwargs: Any,
    ) -> None:
        """``loop``: ``asyncio`` (its default loop) or ``uvloop`` (what ``nbia-proxy serve``
        runs on); ``uvicorn_extra``: more uvicorn options (TLS, say)."""
        self.settings = settings
        self.timeout_keep_alive = timeout_keep_alive
        self.loop = loop
        self.uvicorn_extra = uvicorn_extra or {}
        self.app: Gateway = create_app(settings, **create_kwargs)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> GatewayServer:
        # The options `nbia-proxy serve` uses, on a free loopback port.
        options = (
            uvicorn_options(self.settings)
            | {
                "host": "127.0.0.1",
                "port": 0,
                "log_level": "warning",
                "lifespan": "on",
                "timeout_keep_alive": self.timeout_keep_alive,
            }
            | self.uvicorn_extra
        )
        config = uvicorn.Config(self.app, **options)
        server = Server(config)  # signal handlers are skipped off the main thread
        self._server = server
        factory = uvloop.new_event_loop if self.loop == "uvloop" else None

        def run() -> None:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(server.serve())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if "ssl_certfile" in self.uvicorn_extra else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        return self

    def audit_lines(self, count: int = 0, timeout: float = 10) -> list[dict[str, Any]]:
        """This gateway's audit lines, once there are ``count`` (see :func:`audit_lines`)."""
        assert self.app.audit.target is not None
        return audit_lines(self.app.audit.target, count, timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


GatewayFactory = Callable[..., AbstractContextManager[GatewayServer]]
"""What the ``make_gateway`` fixture (tests/conftest.py) returns: settings in, a gateway out."""


def cache_stats(server: GatewayServer, section: str) -> dict[str, Any]:
    """One section of the gateway's ``/_proxy/cache/stats`` (``binaries``, ``shield``, ...)."""
    answer = httpx.get(server.url + "/_proxy/cache/stats", timeout=60)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()[section]
    return found


def audit_lines(path: Path | str, count: int = 0, timeout: float = 10) -> list[dict[str, Any]]:
    """The JSON lines of the audit log at ``path``, once it holds ``count`` (lines are written
    in batches, up to a second late); what it holds when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            text = ""
        lines = [json.loads(line) for line in text.splitlines()]
        if len(lines) >= count and (count or text) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: What the gateway logs when its stop deadline ends a stuck stop (proxy.stop_deadline).
STUCK = "the stop is stuck"


class StopTimedOut(AssertionError):
    """A gateway process did not exit in time after SIGTERM."""


class GatewayProcess:
    """``python -m proxy serve`` as its own process, as a user runs it (for memory, workers).

    ``preexec_fn`` runs in the child before the gateway starts (e.g. to lower a resource limit);
    ``stderr`` is a file to write the gateway's stderr to (default: the test's own).
    """

    def __init__(
        self,
        upstream: str,
        data_dir: Path,
        *args: str,
        preexec_fn: Callable[[], None] | None = None,
        stderr: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            # faulthandler: SIGABRT, sent when a stop times out, prints every thread's stack.
            sys.executable, "-X", "faulthandler", "-m", "proxy", "serve", "--port", str(self.port),
            "--upstream", upstream, "--data-dir", str(data_dir), "--log-level", "warning", *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.preexec_fn = preexec_fn
        self.stderr = stderr
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> GatewayProcess:
        with open(self.stderr, "wb") if self.stderr else contextlib.nullcontext() as err:
            self.process = subprocess.Popen(self.command, preexec_fn=self.preexec_fn, stderr=err)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return self
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise RuntimeError("the gateway process did not start") from None
                time.sleep(0.05)

    def stop(self, timeout: float) -> int:
        """SIGTERM, then its exit code; :class:`StopTimedOut` (the process is killed, its
        threads' stacks in its stderr and in the error) when it has not exited within
        ``timeout`` seconds. A stop the gateway's own deadline cut short is a warning."""
        assert self.process is not None
        if self.process.poll() is not None:  # stopped already (and said so then)
            self.exit_code = self.process.returncode
            return self.exit_code
        self.process.terminate()
        try:
            self.exit_code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler's dump, then the end
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            tail = self.log_tail()
            raise StopTimedOut(f"the gateway did not stop within {timeout} s\n{tail}") from None
        if self.stderr is not None and self.stderr.exists():
            if STUCK.encode() in self.stderr.read_bytes():
                warnings.warn(f"a gateway's stop was stuck\n{self.log_tail()}", stacklevel=2)
        return self.exit_code

    def log_tail(self, size: int = 8000) -> str:
        """The end of the gateway's stderr, when it goes to a file."""
        if self.stderr is None or not self.stderr.exists():
            return ""
        return self.stderr.read_bytes()[-size:].decode(errors="replace")

    def __exit__(self, *exc_info: object) -> None:
        # A gateway may take its whole shutdown_grace_seconds (30) plus the unwind to stop when
        # a connection is still open; past that, not stopping is a hang.
        self.stop(timeout=60)


class Clock:
    """A hand-driven clock for expiry tests: time moves when a test says so, nothing sleeps."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def request_line(
    method: str, target: str, host: str = "gateway", extra: str = "", version: str = "1.1"
) -> bytes:
    """A request head written by hand (HTTP clients normalise what some tests must send)."""
    return (
        f"{method} {target} HTTP/{version}\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


def send_raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Send raw request bytes; return (status, head, body). Status 0: closed without answer."""
    parts = httpx.URL(url)
    with socket.create_connection((parts.host, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return 0, b"", b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body
