"""The stop deadline (proxy/stop_deadline.py): a stop that sticks ends the process anyway, and
the log says which thread or task it was stuck on."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy import stop_deadline
from proxy.stop_deadline import StopDeadline
from tests.databases import database
from tests.fake_nbia import FakeServer
from tests.gateway_server import STUCK, GatewayProcess

S = "/nbia-api/services"


class Exits:
    """A stand-in for ``os._exit``: records the status instead of ending the test run."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.called = threading.Event()

    def __call__(self, status: int) -> None:
        self.status = status
        self.called.set()


def _blocked_in_cleanup(release: threading.Event) -> None:
    release.wait()


def test_an_expired_deadline_names_the_stuck_thread_and_exits_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    stuck = threading.Thread(target=_blocked_in_cleanup, args=(release,), name="db-writer")
    stuck.start()
    exits = Exits()
    try:
        with caplog.at_level(logging.ERROR, logger="nbia_proxy.server"):
            StopDeadline(0.05, exit=exits).start()
            assert exits.called.wait(60), "the deadline never ended the process"
    finally:
        release.set()
        stuck.join()
    assert exits.status == 1
    [record] = [r for r in caplog.records if STUCK in r.getMessage()]
    message = record.getMessage()
    assert "thread db-writer: " in message and "_blocked_in_cleanup" in message
    assert "thread nbia-proxy-stop-deadline" not in message  # not itself


def test_the_deadline_names_where_a_task_waits_not_only_its_outermost_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exits = Exits()

    async def waits_for_ever(never: asyncio.Event) -> None:
        await never.wait()

    async def outer(never: asyncio.Event) -> None:
        await waits_for_ever(never)

    async def run() -> None:
        task = asyncio.create_task(outer(asyncio.Event()), name="stuck-task")
        StopDeadline(0.05, exit=exits).start(asyncio.get_running_loop())
        assert await asyncio.to_thread(exits.called.wait, 60), "the deadline never expired"
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="nbia_proxy.server"):
        asyncio.run(run())
    [line] = [
        ln for r in caplog.records for ln in r.getMessage().splitlines() if "stuck-task" in ln
    ]
    assert line.startswith("task stuck-task: wait (locks.py:"), line  # the innermost first
    assert " < waits_for_ever (test_stop_deadline.py:" in line
    assert " < outer (test_stop_deadline.py:" in line


def test_the_process_ends_even_when_the_report_cannot_be_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop stuck in a log write (a full pipe on stderr) must not keep the deadline from
    ending the process; nor may a report that fails."""
    monkeypatch.setattr(stop_deadline, "REPORT_SECONDS", 0.05)
    blocked = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            blocked.wait()

    handler = Stuck()
    logging.getLogger("nbia_proxy.server").addHandler(handler)
    try:
        exits = Exits()
        StopDeadline(0.01, exit=exits).start()
        assert exits.called.wait(60) and exits.status == 1
    finally:
        blocked.set()
        logging.getLogger("nbia_proxy.server").removeHandler(handler)

    def fails(self: StopDeadline) -> list[str]:
        raise RuntimeError("frames gone")

    monkeypatch.setattr(StopDeadline, "positions", fails)
    exits = Exits()
    StopDeadline(0.01, exit=exits).start()
    assert exits.called.wait(60) and exits.status == 1


def test_a_process_without_a_deadline_starts_none(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[float] = []
    monkeypatch.setattr(StopDeadline, "start", lambda self, loop=None: started.append(self.seconds))
    stop_deadline.arm(0)
    stop_deadline.begin()
    assert started == []
    stop_deadline.arm(2.5)
    try:
        stop_deadline.begin()
    finally:
        stop_deadline.arm(0)
    assert started == [2.5]


class FreezableRelay:
    """A TCP relay to PostgreSQL that can stop passing bytes on (a database gone silent:
    connections stay open, nothing answers)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.frozen.is_set():
                    return  # swallowed: the sender waits for an answer that never comes
                sink.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[FreezableRelay, str]]:
    with database("postgresql", tmp_path) as url:
        relay = FreezableRelay(("127.0.0.1", 5432))
        try:
            yield relay, url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{relay.port}/")
        finally:
            relay.close()


def test_a_stop_stuck_on_a_silent_database_ends_within_the_deadline(
    tmp_path: Path, nbia_upstream: FakeServer, relay: tuple[FreezableRelay, str]
) -> None:
    """PostgreSQL goes silent before SIGTERM: the cache writer's last tidy-up waits on it for
    good. The process exits with status 1 once ``shutdown_cleanup_seconds`` have passed, and
    its log says what was stuck, rather than living on until a supervisor kills it."""
    frozen, url = relay
    log = tmp_path / "gateway.log"
    gateway = GatewayProcess(
        nbia_upstream.url, tmp_path / "data", "--database-url", url, "--audit-log", "",
        "--shutdown-grace-seconds", "0", "--shutdown-cleanup-seconds", "1",
        stderr=log,
    )  # fmt: skip
    with gateway:
        answer = httpx.get(gateway.url + f"{S}/v1/getCollectionValues", timeout=60)
        assert answer.status_code == 200
        frozen.frozen.set()
        with pytest.warns(UserWarning, match="stop was stuck"):
            status = gateway.stop(timeout=50)  # the writer alone would hold it 30 s and more
    assert status == 1
    text = log.read_text()
    assert STUCK in text
    assert "thread " in text.split(STUCK, 1)[1]
