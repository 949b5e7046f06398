"""Binary payloads are relayed as streams: early first byte, detectable truncation, flat memory.

These run against the gateway on a real socket (uvicorn in a thread or a subprocess): httpx's
ASGITransport buffers whole bodies and could not show any of this.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import requests

from tests.downloads import zip_path
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess, GatewayServer, make_settings

MIB = 1024 * 1024


def test_big_zip_is_byte_identical(gateway: GatewayServer, nbia_upstream: FakeServer) -> None:
    """The zip that reaches the client through the gateway is the upstream's, byte for byte."""
    nbia_upstream.app.set_big_zip_bytes(8 * MIB)
    path = zip_path(nbia_upstream.app.big_series_uid)
    direct = httpx.get(nbia_upstream.url + path, timeout=30)
    through = httpx.get(gateway.url + path, timeout=30)
    assert through.status_code == direct.status_code == 200
    assert len(through.content) >= 8 * MIB
    assert hashlib.md5(through.content).digest() == hashlib.md5(direct.content).digest()
    for header in ("content-type", "content-disposition"):
        assert through.headers[header] == direct.headers[header]


def test_first_byte_arrives_before_upstream_finishes(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """With a slow upstream, the client gets bytes long before the upstream has sent them all."""
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(128 * 1024)  # a slow fake sends 4 KiB chunks: about 32 pauses
    fake.slow(seconds_between_chunks=0.05, path_contains="getImage")
    with httpx.stream("GET", gateway.url + zip_path(fake.big_series_uid), timeout=30) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic()
        total = len(first) + sum(len(chunk) for chunk in chunks)
        done_at = time.monotonic()
    assert total >= 100 * 1024
    # Most of the upstream's pauses happened after the first byte had reached us.
    assert done_at - first_at >= 0.8


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_truncated_upstream_gives_a_detectable_failure(
    gateway: GatewayServer, nbia_upstream: FakeServer, client: str
) -> None:
    """An upstream that dies mid-zip makes the client's read fail; it never ends cleanly."""
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(4 * MIB)
    fake.cut_stream(after_bytes=MIB + 12345, mode="abort", path_contains="getImage")
    url = gateway.url + zip_path(fake.big_series_uid)
    if client == "httpx":
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=30)
    else:  # what tcia-utils uses
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, timeout=30)
    # The gateway is still healthy afterwards and the same zip streams fine once the fault is gone.
    fake.reset()
    fake.set_big_zip_bytes(4 * MIB)
    assert httpx.get(url, timeout=30).status_code == 200


def _connections_to(port: int) -> int:
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


@pytest.fixture
def relaying_gateway(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    """A gateway that relays binaries without keeping them (no series cache)."""
    settings = make_settings(tmp_path, nbia_upstream.url, binary_cache_enabled=False)
    with GatewayServer(settings) as server:
        yield server


def test_client_disconnect_closes_the_upstream_request(
    relaying_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """When the client hangs up mid-download, the gateway's upstream connection closes at once
    (a download the series cache keeps goes on: tests/test_series_cache.py)."""
    gateway = relaying_gateway
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(16 * MIB)
    fake.slow(seconds_between_chunks=0.5, path_contains="getImage")
    with httpx.stream("GET", gateway.url + zip_path(fake.big_series_uid), timeout=30) as response:
        chunks = response.iter_raw()  # keep a reference: a collected iterator closes the stream
        next(chunks)
        assert _connections_to(nbia_upstream.port) == 1
    # The full download would take 8 s more; the upstream side must be gone well before that.
    deadline = time.monotonic() + 3
    while _connections_to(nbia_upstream.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections_to(nbia_upstream.port) == 0


@pytest.fixture
def gateway_process(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayProcess]:
    """The gateway as its own process (so its memory can be measured alone)."""
    with GatewayProcess(nbia_upstream.url, tmp_path / "data") as process:
        yield process


def _rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def test_memory_stays_flat_for_a_large_zip_and_a_slow_client(
    gateway_process: GatewayProcess, nbia_upstream: FakeServer
) -> None:
    """Relaying 192 MiB to a client that stalls first grows the gateway by a few MiB at most."""
    url, pid = gateway_process.url, gateway_process.pid
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(192 * MIB)
    path = zip_path(fake.big_series_uid)
    httpx.get(url + "/healthz")
    baseline = _rss_mib(pid)
    peak = baseline
    received = 0
    with httpx.stream("GET", url + path, timeout=60) as response:
        for i, chunk in enumerate(response.iter_raw(MIB)):
            received += len(chunk)
            if i == 0:
                time.sleep(1.0)  # the upstream is far faster than us now: flow control must hold
            if i % 16 == 0:
                peak = max(peak, _rss_mib(pid))
    peak = max(peak, _rss_mib(pid))
    assert received >= 180 * MIB  # the fake builds a zip of about the requested size
    assert peak - baseline < 40, f"gateway grew from {baseline:.0f} to {peak:.0f} MiB"
