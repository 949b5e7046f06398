"""The upstream transport (proxy.http1): kept-alive connections, httpx's errors and limits.

Each test runs a small server on loopback that answers with exactly the bytes it is given, so
the framing cases (chunked, delimited by close, HEAD, interim answers) and the failures are the
ones named, not whatever a framework would send.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import httpx
import pytest

from proxy.http1 import MAX_HEAD_BYTES, Http1Transport
from proxy.upstream import Upstream, upstream_configs
from tests.gateway_server import make_settings

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
Answer = Callable[[bytes], bytes | None]  # the request head -> the bytes to send (None: hang)


class Server:
    """Answers each request head with ``answer(head)``; counts connections and requests."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                reply = self.answer(head)
                if reply is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after or b"\r\nconnection: close\r\n" in reply.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def run(
    answer: Answer,
    scenario: Callable[[httpx.AsyncClient, str, Server], Awaitable[None]],
    *,
    max_connections: int = 10,
    close_after: bool = False,
    timeout: float = 5.0,
) -> Server:
    server = Server(answer, close_after)

    async def main() -> None:
        url = await server.start()
        transport = Http1Transport(max_connections)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            try:
                await scenario(client, url, server)
            finally:
                server.close()

    asyncio.run(main())
    return server


def test_one_connection_serves_request_after_request() -> None:
    sent: list[httpx.Request] = []

    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        for i in range(20):
            response = await client.post(f"{url}/x?i={i}", content=b"form=%d" % i)
            assert (response.status_code, response.content) == (200, b"ok")
            sent.append(response.request)

    server = run(lambda head: OK, scenario)
    assert server.connections == 1 and len(server.heads) == 20
    # On the wire: the request exactly as httpx prepared it, headers in order, nothing added.
    for request, head in zip(sent, server.heads, strict=True):
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
        lines += [name + b": " + value for name, value in request.headers.raw]
        assert head == b"\r\n".join(lines) + b"\r\n\r\n"
    assert server.heads[3].startswith(b"POST /x?i=3 HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 6\r\n" in server.heads[3].lower()


def test_framing_chunked_close_delimited_interim_and_head() -> None:
    answers = {
        b"/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"/interim": b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
        b"/head": b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        b"/close": b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
    }

    def answer(head: bytes) -> bytes:
        return answers[head.split(b" ")[1]]

    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        assert (await client.get(url + "/chunked")).content == b"abcde"
        assert (await client.get(url + "/interim")).content == b"ok"
        head = await client.head(url + "/head")
        assert (head.status_code, head.content, head.headers["content-length"]) == (
            200,
            b"",
            "1000",
        )
        assert (await client.get(url + "/chunked")).content == b"abcde"  # after the HEAD
        assert (await client.get(url + "/close")).content == b"until the end"
        assert (await client.get(url + "/chunked")).content == b"abcde"

    server = run(answer, scenario)
    # A HEAD's connection and one whose body ended with it are not used again.
    assert server.connections == 3


def test_a_connection_the_upstream_closed_is_not_reused() -> None:
    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        for _ in range(3):
            assert (await client.get(url)).content == b"ok"
            await asyncio.sleep(0.05)  # the close arrives

    server = run(lambda head: OK, scenario, close_after=True)
    assert server.connections == 3


def test_failures_are_httpx_errors() -> None:
    huge = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * MAX_HEAD_BYTES + b"\r\ncontent-length: 0\r\n\r\n"
    answers: dict[bytes, bytes | None] = {
        b"/huge": huge,
        b"/garbage": b"NOT HTTP AT ALL\r\n\r\n",
        b"/short": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\nonly this",
        b"/hang": None,
    }

    def answer(head: bytes) -> bytes | None:
        return answers[head.split(b" ")[1]]

    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        for path in (b"/huge", b"/garbage"):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(url + path.decode())
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await client.get(url + "/short")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(url + "/hang", timeout=0.2)
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(url + "/x", headers={"x-bad": "a\r\nInjected: yes"})
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:9/")

    server = run(answer, scenario, max_connections=1)
    # The single slot came back after each failure, and nothing malformed was sent.
    assert not any(b"Injected" in head for head in server.heads)


def test_a_full_pool_waits_then_times_out() -> None:
    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        held = await client.send(client.build_request("GET", url), stream=True)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(url, timeout=httpx.Timeout(5.0, pool=0.2))
        waiting = asyncio.ensure_future(client.get(url))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await held.aclose()  # frees the slot: the waiting request goes ahead
        assert (await waiting).content == b"ok"

    server = run(lambda head: OK, scenario, max_connections=1)
    assert server.connections == 2  # the held answer was closed unread: its connection too


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_verifies_the_certificate(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server = Server(lambda head: OK)

    async def main() -> None:
        url = await server.start(server_tls)
        try:
            trusting = Http1Transport(2, ssl.create_default_context(cafile=str(cert)))
            async with httpx.AsyncClient(transport=trusting, timeout=5) as client:
                for _ in range(2):
                    assert (await client.get(url)).content == b"ok"
            async with httpx.AsyncClient(transport=Http1Transport(2), timeout=5) as client:
                with pytest.raises(httpx.ConnectError) as failure:
                    await client.get(url)
                assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)
        finally:
            server.close()

    asyncio.run(main())
    assert server.connections == 1  # kept for both trusted requests; the refused one never got in


def test_a_request_on_a_kept_connection_closed_unanswered_fails_unsent_again() -> None:
    """The transport never sends a request twice (the caller decides: proxy.forwarding
    replays reads only); the broken connection is not kept."""

    class DropsTheSecond(Server):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                for answered in range(2):
                    self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                    await reader.readexactly(1)
                    if answered and self.connections == 1:
                        return  # the second request on the first connection: closed unanswered
                    writer.write(OK)
                    await writer.drain()
                await reader.read()
            finally:
                writer.close()

    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        assert (await client.post(url, content=b"a")).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.post(url, content=b"b")
        assert (await client.post(url, content=b"c")).content == b"ok"

    server = DropsTheSecond(lambda head: OK)

    async def main() -> None:
        url = await server.start()
        async with httpx.AsyncClient(transport=Http1Transport(1), timeout=5) as client:
            try:
                await scenario(client, url, server)
            finally:
                server.close()

    asyncio.run(main())
    assert len(server.heads) == 3 and server.connections == 2


def test_idle_connections_are_closed_after_the_keepalive_time() -> None:
    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        pool = cast(Http1Transport, client._transport).pool
        pool.idle_seconds = 0.2
        assert (await client.get(url)).content == b"ok"
        assert pool.idle_connections() == 1
        await asyncio.sleep(0.5)
        assert pool.idle_connections() == 0  # closed, not just passed over at the next request
        assert (await client.get(url)).content == b"ok"

    server = run(lambda head: OK, scenario)
    assert server.connections == 2


def test_a_held_binary_response_leaves_the_metadata_pool_alone(tmp_path: Path) -> None:
    """Two pools per upstream, one TLS context: binaries have no cap of their own, and the
    metadata client's cap (max_upstream_connections) counts only its own connections."""
    server = Server(lambda head: OK)

    async def main() -> None:
        url = await server.start()
        settings = make_settings(tmp_path, url, max_upstream_connections=1)
        upstream = Upstream(upstream_configs(settings)[-1], settings)
        metadata = cast(Http1Transport, upstream.client._transport).pool
        assert upstream.raw.ssl_context is metadata.ssl_context
        timeouts = {"connect_timeout": 5.0, "read_timeout": 5.0}
        try:
            binaries = [
                await upstream.raw.send(httpx.URL(url + "/zip"), "GET", [], b"", **timeouts)
                for _ in range(2)
            ]  # held open, unread
            assert (await upstream.client.get(url + "/meta")).content == b"ok"
            request = upstream.client.build_request("GET", url)
            held = await upstream.client.send(request, stream=True)
            with pytest.raises(httpx.PoolTimeout):
                await upstream.client.get(url, timeout=httpx.Timeout(5.0, pool=0.2))
            third = await upstream.raw.send(httpx.URL(url + "/zip"), "GET", [], b"", **timeouts)
            for response in [*binaries, third]:
                await response.aclose()
            await held.aclose()
        finally:
            await upstream.aclose()
            server.close()

    asyncio.run(main())
    assert server.connections == 4  # three binaries (unread: not kept), one metadata


def test_a_connection_out_of_step_is_not_reused() -> None:
    """Two answers to one request, or bytes sent while idle: that connection is spent."""
    answers = {b"/twice": OK + OK, b"/then-noise": OK + b"HTTP/1.1 200 OK\r\n"}

    def answer(head: bytes) -> bytes:
        return answers.get(head.split(b" ")[1], OK)

    async def scenario(client: httpx.AsyncClient, url: str, server: Server) -> None:
        for path in answers:
            assert (await client.get(url + path.decode())).content == b"ok"
            await asyncio.sleep(0.05)  # the rest arrives
            assert (await client.get(url)).content == b"ok"

    server = run(answer, scenario)
    assert server.connections == 3  # a new one after each spent one, then kept
