"""The raw HTTP/1.1 client used for large bodies, against scripted one-shot servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from proxy import rawhttp
from proxy.http1 import MAX_HEAD_BYTES

TIMEOUTS = {"connect_timeout": 2.0, "read_timeout": 2.0}
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(script: Script) -> AsyncIterator[tuple[httpx.URL, list[bytes]]]:
    """A loopback server that runs ``script`` per connection and records each request head."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield httpx.URL(f"http://127.0.0.1:{port}/nbia-api/services/v4/getImage?A=1&b=2"), heads


async def _body(response: rawhttp.RawResponse) -> bytes:
    return b"".join([chunk async for chunk in response.aiter_raw()])


async def _get(url: httpx.URL, **kwargs: float) -> rawhttp.RawResponse:
    timeouts = {"connect_timeout": 2.0, "read_timeout": 2.0} | kwargs
    return await rawhttp.send(url, "GET", [(b"accept", b"*/*")], b"", **timeouts)


def test_chunked_body_is_dechunked_and_head_is_sent_as_given() -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        async with serve(script) as (url, heads):
            response = await _get(url)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/zip"
            assert await _body(response) == b"hello world"
            await response.aclose()
        head = heads[0].decode()
        assert head.startswith("GET /nbia-api/services/v4/getImage?A=1&b=2 HTTP/1.1\r\n")
        assert "accept: */*" in head and "connection: close" in head

    asyncio.run(run())


def test_body_delimited_by_close_is_complete() -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async def run() -> None:
        async with serve(script) as (url, _):
            assert await _body(await _get(url)) == b"all of it"

    asyncio.run(run())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["short-content-length", "missing-last-chunk"],
)
def test_body_cut_short_raises(reply: bytes) -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        await writer.drain()

    async def run() -> None:
        async with serve(script) as (url, _):
            response = await _get(url)
            with pytest.raises(httpx.RemoteProtocolError):
                await _body(response)

    asyncio.run(run())


def test_garbage_instead_of_http_raises() -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        async with serve(script) as (url, _):
            with pytest.raises(httpx.RemoteProtocolError):
                await _get(url)

    asyncio.run(run())


def test_silent_upstream_times_out_on_head_and_on_body() -> None:
    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def stalls(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        async with serve(mute) as (url, _):
            with pytest.raises(httpx.ReadTimeout):
                await _get(url, read_timeout=0.2)
        async with serve(stalls) as (url, _):
            response = await _get(url, read_timeout=0.2)
            with pytest.raises(httpx.ReadTimeout):
                await _body(response)

    asyncio.run(run())


def test_refused_connection_raises_connect_error() -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await _get(httpx.URL(f"http://127.0.0.1:{port}/x"))

    asyncio.run(run())


def test_reading_pauses_when_the_consumer_lags() -> None:
    """With 8 MiB on offer and nobody reading, at most about 1 MiB is held in memory."""
    payload = b"x" * (8 * 1024 * 1024)

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()

    async def run() -> None:
        async with serve(script) as (url, _):
            response = await _get(url, read_timeout=5)
            await asyncio.sleep(0.5)  # the server pushes as fast as it can meanwhile
            protocol = response._protocol
            assert protocol.paused
            assert protocol.buffered < 2 * 1024 * 1024
            assert len(await _body(response)) == len(payload)

    asyncio.run(run())


def replying(reply: bytes) -> Script:
    """A script that sends ``reply`` and closes."""

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        await writer.drain()

    return script


def test_an_interim_answer_is_skipped_for_the_real_one() -> None:
    """One response protocol for both clients: a 100 Continue is not the answer."""
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nzip"

    async def run() -> None:
        async with serve(replying(reply)) as (url, _):
            response = await _get(url)
            assert response.status_code == 200
            assert await _body(response) == b"zip"

    asyncio.run(run())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * MAX_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["head-over-16-KiB", "upgrade"],
)
def test_a_head_too_large_or_an_upgrade_is_refused(reply: bytes) -> None:
    async def run() -> None:
        async with serve(replying(reply)) as (url, _):
            with pytest.raises(httpx.RemoteProtocolError):
                await _get(url)

    asyncio.run(run())


def test_a_post_never_goes_out_on_a_kept_connection_nor_twice() -> None:
    """A GET's connection is kept; a POST opens its own, and when that breaks, it fails."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                requests.append(head.split(b" ", 1)[0])
                if head.startswith(b"POST"):
                    await reader.readexactly(4)
                    break  # closed unanswered
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def run() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
        client = rawhttp.Client()
        async with server:
            response = await client.send(url, "GET", [], b"", **TIMEOUTS)
            assert await _body(response) == b"ok"
            assert client.idle_connections() == 1
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await client.send(url, "POST", [], b"form", **TIMEOUTS)
            assert client.idle_connections() == 1  # the GET's connection was not taken
            assert client.connections_opened == 2
            await client.aclose()

    asyncio.run(run())
    assert requests == [b"GET", b"POST"]
