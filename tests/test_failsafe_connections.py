"""Connections that hold the gateway: a head that never ends, idle and slow connections, forged
forwarding headers, and transfers still running at shutdown (issue 8, items 5, 6, 7 and 17).

Every address in 127.0.0.0/8 is loopback on Linux: an attacker's sockets are bound to 127.0.0.2,
another client's to 127.0.0.3, so the per-address cap and "other clients" can be told apart.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import psutil
import pytest

from proxy.config import Settings
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess, GatewayServer, make_settings

MIB = 1024 * 1024
S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "nbia-proxy.service"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, source: str, timeout: float = 10.0) -> socket.socket:
    """A raw connection to the gateway from ``source`` (an address in 127.0.0.0/8)."""
    return socket.create_connection(
        ("127.0.0.1", port_of(url)), timeout=timeout, source_address=(source, 0)
    )


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def ask_healthz(sock: socket.socket) -> bytes:
    """One keep-alive ``GET /healthz`` on ``sock``; returns the whole answer."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    while len(body) < int(length[1]):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {answer + body!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30)


class Repeating:
    """``step()`` every ``interval`` seconds in a thread, for the length of a ``with`` block."""

    interval = 0.05

    def __init__(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._running = False
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while self._running:
            self.step()
            time.sleep(self.interval)

    def step(self) -> None:
        raise NotImplementedError


class Probe(Repeating):
    """Another client asking ``/healthz`` on fresh connections while an attack runs."""

    def __init__(self, url: str, source: str = OTHER) -> None:
        super().__init__()
        self.url = url
        self.http = client(source)
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self.http.close()

    def step(self) -> None:
        started = time.monotonic()
        try:
            answer = self.http.get(self.url + "/healthz", headers={"Connection": "close"})
            answer.raise_for_status()
            self.latencies.append(time.monotonic() - started)
        except httpx.HTTPError as exc:
            self.failures.append(repr(exc))


class PeakMemory(Repeating):
    """The highest resident size of a process, sampled every 10 ms."""

    interval = 0.01

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss

    def step(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)


# --- item 5: a request head is bounded while it arrives ---------------------------------------


def send_unterminated_header(url: str, size: int) -> tuple[bytes, int]:
    """One header value of ``size`` bytes that never ends; returns (answer, bytes sent)."""
    sent = 0
    with connect(url, ATTACKER, timeout=30) as sock:
        try:
            sock.sendall(f"GET {SERIES} HTTP/1.1\r\nHost: gateway\r\nX-Pad: ".encode())
            chunk = b"a" * 65536
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the gateway closed the connection: expected
        try:
            return read_to_end(sock), sent
        except TimeoutError:
            return b"", sent


def test_a_64_mb_unterminated_header_gets_431_while_others_are_served(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    with GatewayProcess(nbia_upstream.url, tmp_path / "data") as gateway:
        warm = httpx.get(gateway.url + SERIES, timeout=10)
        assert warm.headers["x-cache"] == "MISS"
        before = psutil.Process(gateway.pid).memory_info().rss
        with PeakMemory(gateway.pid) as memory, Probe(gateway.url) as probe:
            time.sleep(0.3)
            answer, sent = send_unterminated_header(gateway.url, 64 * MIB)
            time.sleep(0.3)
        again = httpx.get(gateway.url + SERIES, timeout=10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"request head larger than" in answer
    assert sent < 32 * MIB  # cut off long before the end, not read to the end first
    assert memory.peak - before < 40 * MIB, f"RSS grew by {(memory.peak - before) / MIB:.0f} MiB"
    assert probe.failures == [] and len(probe.latencies) >= 3
    assert max(probe.latencies) < 5.0
    assert (again.headers["x-cache"], again.content) == ("HIT", warm.content)


@pytest.mark.parametrize(
    "start",
    [
        b"GET /nbia-api/services/v4/getSeries?x=",  # a request line that never ends
        b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Pad: ",  # a header value
        b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-",  # a header name
    ],
    ids=["request-line", "header-value", "header-name"],
)
def test_a_head_over_the_limit_in_small_pieces_is_refused_before_it_ends(
    tmp_path: Path, nbia_upstream: FakeServer, start: bytes
) -> None:
    """The bound holds whatever the parser delivers, and however the bytes are cut up."""
    settings = make_settings(tmp_path, nbia_upstream.url, max_header_bytes=16 * 1024)
    with GatewayServer(settings) as gateway, connect(gateway.url, ATTACKER) as sock:
        sock.sendall(start)
        try:
            for _ in range(64):  # 64 KiB in 1 KiB pieces
                sock.sendall(b"b" * 1024)
                time.sleep(0.005)
        except OSError:
            pass  # the gateway closed the connection
        answer = read_to_end(sock)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_a_body_arriving_with_its_head_is_not_counted_as_head(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    """A small head and a large form body in the same segments: the body is not a head."""
    settings = make_settings(tmp_path, nbia_upstream.url, max_header_bytes=4096)
    form = "&".join(f"list=1.3.6.1.4.1.14519.{i}" for i in range(4000)).encode()
    assert len(form) > 64 * 1024
    head = (
        f"POST {S}/v4/getSeriesMetadata HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(form)}\r\n\r\n"
    ).encode()
    with GatewayServer(settings) as gateway, connect(gateway.url, OTHER) as sock:
        sock.sendall(head + form)
        answer = read_to_end(sock)
    assert answer.split(b" ", 2)[1] not in (b"431", b"400"), answer[:200]


# --- item 6: idle and slow connections ----------------------------------------------------------


@pytest.fixture
def strict_gateway(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    """A gateway with a 1 s header timeout and a cap of 5 connections per address."""
    settings = make_settings(
        tmp_path, nbia_upstream.url, header_timeout_seconds=1.0, max_connections_per_client=5
    )
    with GatewayServer(settings, timeout_keep_alive=30) as server:
        yield server


def test_a_silent_connection_is_closed_after_the_header_timeout(
    strict_gateway: GatewayServer,
) -> None:
    with connect(strict_gateway.url, ATTACKER) as sock:
        assert read_to_end(sock) == b""  # closed by the gateway, not by the 10 s socket timeout


def test_a_head_that_stops_half_way_gets_408(strict_gateway: GatewayServer) -> None:
    with connect(strict_gateway.url, ATTACKER) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": "request head not received in time"
    }


def test_a_dribbled_head_is_cut_off_although_bytes_keep_coming(
    strict_gateway: GatewayServer,
) -> None:
    """Slowloris: one byte every 0.2 s keeps the connection busy, but the head never ends."""
    with connect(strict_gateway.url, ATTACKER) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        try:
            for _ in range(40):  # 8 s of dribbling against a 1 s timeout
                sock.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass  # the gateway has closed the connection
        assert read_to_end(sock).startswith(b"HTTP/1.1 408 ")


def test_blank_lines_do_not_keep_an_idle_connection_open(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    """Between requests the parser skips blank lines; they begin no request, so the keep-alive
    timeout still runs (uvicorn restarts it on every read)."""
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url), timeout_keep_alive=1) as gateway:
        with connect(gateway.url, ATTACKER) as sock:
            assert ask_healthz(sock).startswith(b"HTTP/1.1 200 ")
            try:
                for _ in range(40):  # 8 s of blank lines against a 1 s keep-alive
                    sock.sendall(b"\r\n")
                    time.sleep(0.2)
            except OSError:
                pass  # the gateway has closed the connection
            assert read_to_end(sock) == b""


def test_a_slow_answer_and_a_quiet_keep_alive_are_not_cut_by_the_header_timeout(
    strict_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """The timeout is for the request head only: not the upstream's time, not keep-alive."""
    nbia_upstream.app.slow(seconds_before_headers=2.0, path_contains="getCollectionValues")
    with client(OTHER) as http:
        slow = http.get(strict_gateway.url + f"{S}/v4/getCollectionValues")
        assert slow.status_code == 200
        time.sleep(2.0)  # idle for twice the header timeout, well within keep-alive
        again = http.get(strict_gateway.url + "/healthz")
        assert again.status_code == 200
        assert len({slow.extensions["network_stream"], again.extensions["network_stream"]}) == 1


def hold_connections(url: str, source: str, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections from ``source``, each having been answered once."""
    held = []
    for _ in range(count):
        sock = connect(url, source)
        assert ask_healthz(sock).startswith(b"HTTP/1.1 200 ")
        held.append(sock)
    return held


def test_connections_beyond_the_per_client_cap_get_503_and_others_are_served(
    strict_gateway: GatewayServer,
) -> None:
    held = hold_connections(strict_gateway.url, ATTACKER, 5)
    try:
        with connect(strict_gateway.url, ATTACKER) as extra:
            answer = read_to_end(extra)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"connections from this address" in answer
        with client(OTHER) as http:
            assert http.get(strict_gateway.url + SERIES).status_code == 200
        held.pop().close()
        # A place is free again once the gateway has seen that close.
        deadline = time.monotonic() + 10
        while True:
            sock = connect(strict_gateway.url, ATTACKER)
            if ask_healthz(sock).startswith(b"HTTP/1.1 200 "):
                held.append(sock)
                break
            sock.close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()


def test_a_trusted_proxy_is_not_capped_as_one_client(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(
        tmp_path, nbia_upstream.url, max_connections_per_client=2, trusted_proxies=[ATTACKER]
    )
    with GatewayServer(settings, timeout_keep_alive=30) as gateway:
        held = hold_connections(gateway.url, ATTACKER, 6)
        for sock in held:
            sock.close()


def limit_open_files(soft: int, hard: int) -> Callable[[], None]:
    """A ``preexec_fn`` that lowers the child's open-file limits (below this process's)."""
    ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process opens more than a thousand sockets: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_files")
def test_1000_idle_connections_leave_the_gateway_to_other_clients(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    """With a file limit of 1000, 1000 idle connections once left no descriptor for anyone."""
    gateway = GatewayProcess(
        nbia_upstream.url,
        tmp_path / "data",
        "--header-timeout-seconds",
        "3",
        preexec_fn=limit_open_files(1000, 1000),
    )
    with gateway:
        idle = [connect(gateway.url, ATTACKER) for _ in range(1000)]
        try:
            time.sleep(0.5)
            with client(OTHER) as http:
                assert http.get(gateway.url + "/healthz").status_code == 200
                assert http.get(gateway.url + SERIES).status_code == 200
            assert httpx.get(gateway.url + "/healthz", timeout=30).status_code == 200
            # Beyond the cap (256) they were refused at once; the rest go at the header timeout.
            answers = [read_to_end(sock) for sock in idle]
        finally:
            for sock in idle:
                sock.close()
    refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) == 1000 - 256
    assert all(answer == b"" for answer in answers if answer not in refused)


def test_the_soft_file_limit_is_raised_to_the_hard_one(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    limit = limit_open_files(256, 4096)
    gateway = GatewayProcess(nbia_upstream.url, tmp_path / "data", preexec_fn=limit)
    with gateway:
        soft, hard = psutil.Process(gateway.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == hard > 256


def test_the_systemd_unit_raises_the_file_limit() -> None:
    lines = UNIT.read_text().splitlines()
    assert "LimitNOFILE=65536" in lines


# --- item 7: forwarding headers only from trusted proxies --------------------------------------


@pytest.mark.parametrize(
    ("trusted", "audited"),
    [([], "127.0.0.1"), (["127.0.0.2", "10.0.0.0/8"], "127.0.0.1"), (["127.0.0.1"], "203.0.113.9")],
)
def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    trusted: list[str],
    audited: str,
) -> None:
    """The audit line names the peer unless the peer is a trusted proxy; on the full path and
    on the protocol's shortcut for hits alike."""
    settings = make_settings(tmp_path, nbia_upstream.url, trusted_proxies=trusted)
    forged = {"X-Forwarded-For": "203.0.113.9"}
    with GatewayServer(settings) as gateway:
        miss = httpx.get(gateway.url + SERIES, headers=forged)
        hit = httpx.get(gateway.url + SERIES, headers=forged)
        assert gateway.app.shortcut_hits == 1
        lines = gateway.audit_lines(2)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert [(line["client"], line["cache"]) for line in lines] == [
        (audited, "MISS"),
        (audited, "HIT"),
    ]


def test_trusted_proxies_come_as_a_list_or_comma_separated_and_are_checked() -> None:
    assert Settings(trusted_proxies="10.0.0.5, 10.1.0.0/16").trusted_proxies == [
        "10.0.0.5",
        "10.1.0.0/16",
    ]
    assert Settings(trusted_proxies=["::1"]).trusted_proxies == ["::1"]
    assert Settings().trusted_proxies == []
    with pytest.raises(ValueError, match="'nginx' is not an IP address or network"):
        Settings(trusted_proxies="nginx")


def wrong_logins(url: str, forwarded_for: list[str]) -> list[int]:
    statuses = []
    for address in forwarded_for:
        answer = httpx.get(
            url + SERIES,
            headers={"Authorization": "Bearer nbk_wrong", "X-Forwarded-For": address},
        )
        statuses.append(answer.status_code)
    return statuses


def test_a_local_caller_cannot_escape_the_lockout_with_x_forwarded_for(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(tmp_path, nbia_upstream.url, access="accounts")
    with GatewayServer(settings) as gateway:
        statuses = wrong_logins(gateway.url, [f"198.51.100.{i}" for i in range(12)])
    # The lockout of 127.0.0.1 starts after the free failures (1 s, then doubling, so a slow
    # machine sees it too); with a fresh forwarded address each time, it used to never start.
    assert statuses[:5] == [401] * 5
    assert 429 in statuses


def test_behind_a_trusted_proxy_the_lockout_is_per_forwarded_client(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(
        tmp_path, nbia_upstream.url, access="accounts", trusted_proxies=["127.0.0.1"]
    )
    with GatewayServer(settings) as gateway:
        statuses = wrong_logins(gateway.url, ["198.51.100.7"] * 12)
        others = wrong_logins(gateway.url, ["198.51.100.8"])
    assert 429 in statuses
    assert others == [401]  # another client behind the same proxy is not locked out


# --- item 17: a bounded shutdown ------------------------------------------------------------------


class Download:
    """A slow series download through the gateway, read in a thread."""

    def __init__(self, url: str, fake: FakeServer) -> None:
        fake.app.set_big_zip_bytes(16 * MIB)
        # 4 KiB every 10 ms: the whole zip would take more than 40 s.
        fake.app.slow(seconds_between_chunks=0.01, path_contains="getImage")
        self.url = url + f"{S}/v4/getImage?SeriesInstanceUID={fake.app.big_series_uid}"
        self.received = 0
        self.error: Exception | None = None
        self.ended_cleanly = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while self.received < 64 * 1024:
            assert time.monotonic() < deadline and self.error is None, self.error
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=120) as response:
                for chunk in response.iter_raw():
                    self.received += len(chunk)
            self.ended_cleanly = True
        except httpx.HTTPError as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def stop_with(gateway: GatewayProcess, *signals: signal.Signals, wait: float) -> float:
    """Send ``signals`` 0.5 s apart; return how long the process took to exit after the first."""
    assert gateway.process is not None
    started = time.monotonic()
    for number, sig in enumerate(signals):
        if number:
            time.sleep(0.5)
        gateway.process.send_signal(sig)
    gateway.process.wait(timeout=wait)
    return time.monotonic() - started


def tracebacks(stderr: Path) -> list[str]:
    return [line for line in stderr.read_text().splitlines() if "Traceback" in line]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_aborts_a_transfer_still_running_after_the_grace(
    tmp_path: Path, nbia_upstream: FakeServer, workers: int
) -> None:
    stderr = tmp_path / "stderr.log"
    args = ("--shutdown-grace-seconds", "2", "--workers", str(workers))
    with GatewayProcess(nbia_upstream.url, tmp_path / "data", *args, stderr=stderr) as gateway:
        download = Download(gateway.url, nbia_upstream)
        at_signal = download.received
        took = stop_with(gateway, signal.SIGTERM, wait=2 + 15)
        download.join()
    assert took >= 1.5  # the transfer had its grace
    assert download.received > at_signal  # and went on during it
    assert not download.ended_cleanly and isinstance(download.error, httpx.TransportError)
    assert tracebacks(stderr) == []


def test_a_second_signal_ends_the_gateway_at_once_and_quietly(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    stderr = tmp_path / "stderr.log"
    args = ("--shutdown-grace-seconds", "600")
    with GatewayProcess(nbia_upstream.url, tmp_path / "data", *args, stderr=stderr) as gateway:
        download = Download(gateway.url, nbia_upstream)
        took = stop_with(gateway, signal.SIGINT, signal.SIGINT, wait=15)
        download.join()
    assert took < 10  # far from the 600 s grace
    assert not download.ended_cleanly and isinstance(download.error, httpx.TransportError)
    assert tracebacks(stderr) == [], stderr.read_text()
