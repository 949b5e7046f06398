"""The hit shortcut's connection handling: what uvicorn does for a response, it must do too."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

SERIES = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


@pytest.fixture
def gateway(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    settings = make_settings(tmp_path, nbia_upstream.url)
    with GatewayServer(settings, timeout_keep_alive=1) as server:
        yield server


def read_answer(stream: BinaryIO) -> bytes:
    """One whole response from ``stream`` (a socket's file); returns its head."""
    head = b""
    while (line := stream.readline()) not in (b"\r\n", b""):
        head += line
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, f"no complete response: {head!r}"
    assert len(stream.read(int(length[1]))) == int(length[1])
    return head


def test_hits_keep_the_keep_alive_timeout(gateway: GatewayServer) -> None:
    """A connection kept busy past the timeout stays open; once idle that long, it is closed."""
    assert httpx.get(gateway.url + SERIES, timeout=10).headers["x-cache"] == "MISS"
    port = int(gateway.url.rsplit(":", 1)[1])
    request = f"GET {SERIES} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for _ in range(6):  # 1.5 s of requests 0.3 s apart, against a 1 s timeout
            sock.sendall(request)
            assert b"x-cache: HIT" in read_answer(stream)
            time.sleep(0.3)
        sock.settimeout(5)
        assert stream.read(1) == b""  # closed by the gateway, not by the 5 s socket timeout
    assert gateway.app.shortcut_hits == 6


def test_pipelined_requests_are_answered_in_order(gateway: GatewayServer) -> None:
    """Behind a request on the ASGI path, a pipelined hit waits its turn, also on that path."""
    assert httpx.get(gateway.url + SERIES, timeout=10).headers["x-cache"] == "MISS"
    port = int(gateway.url.rsplit(":", 1)[1])
    encoded = SERIES.replace("getSeries", "get%53eries")  # decoded by uvicorn: ASGI
    requests = [f"GET {target} HTTP/1.1\r\nHost: gateway\r\n\r\n" for target in (encoded, SERIES)]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        sock.sendall("".join(requests).encode())
        heads = [read_answer(stream), read_answer(stream)]
        sock.sendall(requests[1].encode())  # and then the connection is idle: a shortcut hit
        heads.append(read_answer(stream))
        assert stream.read(1) == b""  # the keep-alive timeout still closes it
    assert all(b"x-cache: HIT" in head for head in heads)
    assert gateway.app.shortcut_hits == 1
