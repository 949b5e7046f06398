"""Kept files sent with the ASGI zero-copy send (:mod:`proxy.zerocopy`), over real sockets, on
both event loops: the bytes, ranges, keep-alive and pipelining, clients that leave or stop
reading, shutdown mid-send, a file unlinked mid-send, descriptors, and TLS (which falls back
to body messages).

``os.sendfile`` is wrapped to count its calls: the gateway runs in this process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from proxy.hit_protocol import HitProtocol
from tests.downloads import fd_targets, until, zip_path
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
MIB = 1024 * 1024
LOOPS = ["asyncio", "uvloop"]

pytestmark = pytest.mark.skipif(not hasattr(os, "sendfile"), reason="needs os.sendfile")


class Calls:
    """``os.sendfile``, counted."""

    def __init__(self) -> None:
        self.count = 0
        self.real = os.sendfile

    def __call__(self, *args: Any) -> int:
        self.count += 1
        return self.real(*args)


@pytest.fixture
def sendfile(monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls = Calls()
    monkeypatch.setattr(os, "sendfile", calls)
    return calls


class Kept:
    """A gateway whose big zip (48 MiB: more than the socket buffers hold) is kept."""

    def __init__(self, gw: GatewayServer, uid: str, body: bytes) -> None:
        self.gw = gw
        self.url = gw.url + zip_path(uid)
        self.path = zip_path(uid)
        self.body = body

    @property
    def stats(self) -> dict[str, Any]:
        assert self.gw.app.series is not None
        return self.gw.app.series.stats()

    def file(self) -> Path:
        (kept,) = [
            p
            for p in (self.gw.settings.data_dir / "binaries").rglob("*")
            if p.is_file() and ".part-" not in p.name and len(p.name) > 64
        ]
        return kept

    def protocols(self) -> list[HitProtocol]:
        server = self.gw._server
        assert server is not None
        return [c for c in server.server_state.connections if isinstance(c, HitProtocol)]


def _keep(tmp_path: Path, fake: FakeServer, loop: str, **settings: Any) -> Iterator[Kept]:
    fake.app.set_big_zip_bytes(48 * MIB)
    uid = fake.app.big_series_uid
    config = make_settings(tmp_path, fake.url, **settings)
    with GatewayServer(config, loop=loop) as gw:
        first = httpx.get(gw.url + zip_path(uid), timeout=120)
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        assert gw.app.series is not None
        fills = gw.app.series.fills
        until(lambda: fills.in_progress == 0)
        yield Kept(gw, uid, first.content)


@pytest.fixture(params=LOOPS)
def kept(
    request: pytest.FixtureRequest, tmp_path: Path, nbia_upstream: FakeServer
) -> Iterator[Kept]:
    yield from _keep(tmp_path, nbia_upstream, request.param)


def _head_and_socket(kept: Kept, extra: bytes = b"") -> tuple[socket.socket, bytes, bytes]:
    """A raw connection that asked for the kept zip: (socket, response head, first body bytes)."""
    host, port = kept.gw.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET %s HTTP/1.1\r\nhost: x\r\n%s\r\n" % (kept.path.encode(), extra))
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    return sock, head, rest


def _read_answer(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes]:
    """One answer with a Content-Length from ``sock``: (head, body, what follows it)."""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(MIB)
    head, _, rest = buffered.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    body = bytearray(rest)
    while len(body) < length:
        piece = sock.recv(MIB)
        assert piece, "the connection ended before the body"
        body += piece
    return head, bytes(body[:length]), bytes(body[length:])


def test_a_hit_is_sent_with_sendfile_whole_and_counted(kept: Kept, sendfile: Calls) -> None:
    before = kept.stats
    hit = httpx.get(kept.url, timeout=120)
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
    assert hashlib.sha256(hit.content).digest() == hashlib.sha256(kept.body).digest()
    assert sendfile.count >= 1
    after = kept.stats
    assert after["hits"] == before["hits"] + 1
    assert after["bytes_from_disk"] == before["bytes_from_disk"] + len(kept.body)
    lines = [line for line in kept.gw.audit_lines(2) if line["path"].endswith("/v4/getImage")]
    assert [(line["cache"], line["bytes"], line["outcome"]) for line in lines][-1] == (
        "HIT",
        len(kept.body),
        "ok",
    )


def test_ranges_if_range_and_head_on_one_keep_alive_connection(kept: Kept, sendfile: Calls) -> None:
    body, size = kept.body, len(kept.body)
    with httpx.Client(timeout=120) as client:
        whole = client.get(kept.url)
        etag = whole.headers["etag"]
        cases = [
            ({"Range": "bytes=10-20"}, 206, body[10:21]),
            ({"Range": f"bytes={size - 5 * MIB}-"}, 206, body[-5 * MIB :]),
            ({"Range": "bytes=-1000"}, 206, body[-1000:]),
            ({"Range": f"bytes={size}-"}, 416, None),
            ({"Range": "bytes=0-99", "If-Range": etag}, 206, body[:100]),
            ({"Range": "bytes=0-99", "If-Range": '"other"'}, 200, body),
        ]
        for headers, status, expected in cases:
            answer = client.get(kept.url, headers=headers)
            assert answer.status_code == status, headers
            if expected is not None:
                assert answer.content == expected, headers
        head = client.head(kept.url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(size)
        assert client.get(kept.url).content == body  # still the same connection, still whole
    assert sendfile.count >= 6


def test_a_pipelined_request_behind_a_zero_copy_answer_is_answered(
    kept: Kept, sendfile: Calls
) -> None:
    host, port = kept.gw.url.removeprefix("http://").split(":")
    request = b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % kept.path.encode()
    ranged = b"GET %s HTTP/1.1\r\nhost: x\r\nrange: bytes=0-9\r\n\r\n" % kept.path.encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request + ranged)
        head, body, rest = _read_answer(sock, b"")
        assert head.startswith(b"HTTP/1.1 200") and body == kept.body
        head, body, rest = _read_answer(sock, rest)
        assert head.startswith(b"HTTP/1.1 206") and body == kept.body[:10] and rest == b""
        sock.sendall(request)  # and the connection goes on
        head, body, rest = _read_answer(sock, b"")
        assert body == kept.body and rest == b""
    assert sendfile.count >= 2


def _binary_fds(kept: Kept) -> list[str]:
    binaries = str(kept.gw.settings.data_dir / "binaries")
    return [target for target in fd_targets() if target.startswith(binaries)]


def _sockets() -> int:
    return sum(target.startswith("socket:") for target in fd_targets())


def test_clients_that_leave_mid_transfer_leave_no_descriptor_and_no_trace(
    kept: Kept, sendfile: Calls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    httpx.get(kept.url, timeout=120)  # warm: pools and threads
    until(lambda: not kept.protocols())
    sockets = _sockets()
    hits = kept.stats["hits"]
    for _ in range(4):
        sock, head, _ = _head_and_socket(kept)
        assert head.startswith(b"HTTP/1.1 200")
        sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset, mid-body
    until(lambda: not kept.protocols() and not _binary_fds(kept))
    until(lambda: _sockets() <= sockets)
    assert kept.stats["hits"] == hits + 4
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    outcomes = [line["outcome"] for line in kept.gw.audit_lines(6)[-4:]]
    assert outcomes == ["abandoned"] * 4
    # The kept file is whole and served again.
    assert httpx.get(kept.url, timeout=120).content == kept.body


def test_a_client_that_stops_reading_holds_no_thread_and_the_next_gets_its_file(
    kept: Kept, sendfile: Calls
) -> None:
    sock, head, first = _head_and_socket(kept)
    with sock:
        assert head.startswith(b"HTTP/1.1 200")

        def waiting() -> bool:
            sends = [p._zero_copy._sending for p in kept.protocols() if p._zero_copy]
            return any(s is not None and s._writable is not None for s in sends)

        until(waiting)  # its socket is full: the send waits on the loop, in no thread
        assert not any(_in_sendfile(t) for t in threading.enumerate())
        assert httpx.get(kept.url, timeout=120).content == kept.body  # others are served
        # It reads again: the rest arrives, whole.
        _, body, _ = _read_answer(sock, head + b"\r\n\r\n" + first)
    assert body == kept.body


def _in_sendfile(thread: threading.Thread) -> bool:
    import sys

    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_send" and "zerocopy" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_aborts_a_send_to_a_client_that_stopped_reading(
    tmp_path: Path, nbia_upstream: FakeServer, loop: str
) -> None:
    keeping = _keep(tmp_path, nbia_upstream, loop, shutdown_grace_seconds=0.5)
    kept = next(keeping)
    sock, head, first = _head_and_socket(kept)
    with sock:
        until(lambda: any(p._zero_copy and p._zero_copy._sending for p in kept.protocols()))
        with pytest.raises(StopIteration):
            next(keeping)  # the server stops: after the grace, the transfer is aborted
        received = len(first)
        while piece := sock.recv(MIB):
            received += len(piece)
        assert received < len(kept.body)  # a broken transfer: short of its Content-Length
    assert not _binary_fds(kept)


def test_a_file_unlinked_mid_send_is_sent_whole(kept: Kept, sendfile: Calls) -> None:
    sock, head, first = _head_and_socket(kept)
    with sock:
        kept.file().unlink()  # what eviction does; the open descriptor keeps the bytes
        _, body, _ = _read_answer(sock, head + b"\r\n\r\n" + first)
    assert body == kept.body


@pytest.mark.parametrize("loop", LOOPS)
def test_over_tls_a_hit_is_sent_in_body_messages(
    tmp_path: Path, nbia_upstream: FakeServer, loop: str, sendfile: Calls
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(key_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    nbia_upstream.app.set_big_zip_bytes(8 * MIB)
    settings = make_settings(tmp_path / "data", nbia_upstream.url)
    tls = {"ssl_keyfile": str(key_file), "ssl_certfile": str(cert_file)}
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with GatewayServer(settings, loop=loop, uvicorn_extra=tls) as gw:
        url = gw.url + zip_path(nbia_upstream.app.big_series_uid)
        assert url.startswith("https://")
        with httpx.Client(timeout=120, verify=context) as client:
            first = client.get(url)
            assert first.headers["x-cache"] == "MISS"
            assert gw.app.series is not None
            fills = gw.app.series.fills
            until(lambda: fills.in_progress == 0)
            hit = client.get(url)
            assert hit.headers["x-cache"] == "HIT" and hit.content == first.content
            assert client.get(url, headers={"Range": "bytes=5-9"}).content == first.content[5:10]
    assert sendfile.count == 0
