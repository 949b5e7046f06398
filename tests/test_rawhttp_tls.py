"""The binary client over TLS, against a local HTTPS fake with a certificate made here.

Bytes arrive unchanged, an untrusted certificate is the right error (and the gateway's 502),
the TLS context is built once, and a connection whose response ended cleanly carries the next
request (and only then).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from proxy import rawhttp
from proxy.errors import transport_error
from tests.gateway_server import GatewayServer, make_settings

BODY = os.urandom(3 * 1024 * 1024 + 17)  # several TLS records and socket reads, odd length
TIMEOUTS = {"connect_timeout": 5.0, "read_timeout": 5.0}
IMAGE = "/nbia-api/services/v1/getImage?SeriesInstanceUID=1.2.3"  # binary, never a token


class HttpsFake:
    """An HTTPS server in a thread: answers every GET with ``BODY`` (Content-Length) and keeps
    the connection unless told otherwise; counts connections and requests."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.keep_alive = True  # False: "Connection: close" and close after each response
        self.drop_second_request = False  # close, unanswered, a request on a used connection
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if answered and self.drop_second_request:
                    break
                close = not self.keep_alive or b"connection: close" in head.lower()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/zip\r\n")
                writer.write(b"content-length: %d\r\n" % len(BODY))
                writer.write(b"connection: close\r\n\r\n" if close else b"\r\n")
                for start in range(0, len(BODY), 256 * 1024):
                    writer.write(BODY[start : start + 256 * 1024])
                    await writer.drain()
                answered += 1
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client went away (or refused the certificate)
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def __enter__(self) -> HttpsFake:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https(ca: trustme.CA) -> Iterator[HttpsFake]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with HttpsFake(context) as server:
        yield server


@pytest.fixture
def contexts_built(monkeypatch: pytest.MonkeyPatch, ca: trustme.CA) -> list[ssl.SSLContext]:
    """Every default SSL context built from now on (httpx's included), each trusting ``ca``."""
    built: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = real(*args, **kwargs)
        ca.configure_trust(context)
        built.append(context)
        return context

    monkeypatch.setattr(ssl, "create_default_context", counting)
    return built


def image_url(server: HttpsFake) -> httpx.URL:
    return httpx.URL(server.url + IMAGE)


async def fetch(client: rawhttp.Client, url: httpx.URL, *, read: bool = True) -> bytes:
    response = await client.send(url, "GET", [(b"accept", b"*/*")], b"", **TIMEOUTS)
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.aiter_raw()]) if read else b""
    await response.aclose()
    return body


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def run(steps: Callable[[], Any]) -> Any:
    return asyncio.run(steps())


def test_a_binary_body_arrives_unchanged_over_tls(https: HttpsFake, ca: trustme.CA) -> None:
    async def steps() -> None:
        client = rawhttp.Client(trusting(ca))
        assert await fetch(client, image_url(https)) == BODY
        await client.aclose()

    run(steps)
    head = https.requests[0].decode()
    assert head.startswith(f"GET {IMAGE} HTTP/1.1\r\n")
    assert "connection: close" not in head.lower()  # kept alive for the next request


def test_the_one_shot_send_closes_its_connection(https: HttpsFake, ca: trustme.CA) -> None:
    async def steps() -> bytes:
        url = image_url(https)
        response = await rawhttp.send(url, "GET", [], b"", ssl_context=trusting(ca), **TIMEOUTS)
        return b"".join([chunk async for chunk in response.aiter_raw()])

    assert run(steps) == BODY
    assert b"connection: close" in https.requests[0]


def test_an_untrusted_certificate_is_a_connect_error_saying_so(https: HttpsFake) -> None:
    """The client's own roots (certifi's, as httpx's) do not include the CA made here."""

    async def steps() -> None:
        client = rawhttp.Client()
        with pytest.raises(httpx.ConnectError) as caught:
            await fetch(client, image_url(https))
        message = transport_error(caught.value, "nbia").message
        assert message.startswith("upstream 127.0.0.1:")
        assert "TLS handshake failed: certificate verify failed" in message

    run(steps)
    assert https.requests == []  # nothing was sent on the refused connection


def test_the_tls_context_is_built_once_per_client(
    https: HttpsFake, contexts_built: list[ssl.SSLContext]
) -> None:
    https.keep_alive = False  # a new connection, and handshake, per request

    async def steps() -> None:
        client = rawhttp.Client()
        for _ in range(3):
            assert await fetch(client, image_url(https)) == BODY
        assert client.connections_opened == 3

    run(steps)
    assert https.connections == 3
    assert len(contexts_built) == 1


def test_a_connection_that_ended_cleanly_carries_the_next_request(
    https: HttpsFake, ca: trustme.CA
) -> None:
    async def steps() -> None:
        client = rawhttp.Client(trusting(ca))
        for _ in range(3):
            assert await fetch(client, image_url(https)) == BODY
        assert client.idle_connections() == 1
        await client.aclose()
        assert client.idle_connections() == 0

    run(steps)
    assert (https.connections, len(https.requests)) == (1, 3)


def test_a_connection_the_server_closes_or_with_an_unread_body_is_not_reused(
    https: HttpsFake, ca: trustme.CA
) -> None:
    async def steps() -> None:
        client = rawhttp.Client(trusting(ca))
        await fetch(client, image_url(https), read=False)  # the body is left unread
        assert client.idle_connections() == 0
        assert await fetch(client, image_url(https)) == BODY
        https.keep_alive = False  # the server says "Connection: close"
        assert await fetch(client, image_url(https)) == BODY
        assert client.idle_connections() == 0
        assert await fetch(client, image_url(https)) == BODY

    run(steps)
    assert (https.connections, len(https.requests)) == (3, 4)


def test_a_kept_connection_closed_unanswered_is_replaced_once(
    https: HttpsFake, ca: trustme.CA
) -> None:
    """The keep-alive race: the server closes a kept connection as a GET goes out on it."""
    https.drop_second_request = True

    async def steps() -> None:
        client = rawhttp.Client(trusting(ca))
        assert await fetch(client, image_url(https)) == BODY
        assert await fetch(client, image_url(https)) == BODY
        assert client.connections_opened == 2

    run(steps)
    assert (https.connections, len(https.requests)) == (2, 3)


def test_idle_connections_expire_and_are_bounded(https: HttpsFake, ca: trustme.CA) -> None:
    async def steps() -> None:
        client = rawhttp.Client(trusting(ca), max_idle=1, idle_seconds=0.2)
        url = image_url(https)
        responses = [await client.send(url, "GET", [], b"", **TIMEOUTS) for _ in range(2)]
        for response in responses:  # both end cleanly; one connection is kept
            assert b"".join([chunk async for chunk in response.aiter_raw()]) == BODY
        assert client.idle_connections() == 1
        await asyncio.sleep(0.5)
        assert client.idle_connections() == 0
        assert await fetch(client, url) == BODY
        assert client.connections_opened == 3

    run(steps)
    assert https.connections == 3


def test_the_gateway_relays_binaries_over_tls_on_one_connection(
    https: HttpsFake, contexts_built: list[ssl.SSLContext], tmp_path: Path
) -> None:
    """Bytes unchanged; the contexts were built with the gateway, none per request."""
    # BODY is no zip: relayed as it is, not kept (the series cache would refuse it).
    settings = make_settings(tmp_path, https.url, binary_cache_enabled=False)
    with GatewayServer(settings) as gateway, httpx.Client() as client:
        assert len(contexts_built) == 3  # one per upstream (nbia, nlst), one for this client
        for _ in range(3):
            response = client.get(gateway.url + IMAGE, timeout=10)
            assert response.status_code == 200
            assert response.content == BODY
    assert len(contexts_built) == 3
    assert (https.connections, len(https.requests)) == (1, 3)


def test_an_untrusted_upstream_certificate_is_a_502_naming_the_cause(
    https: HttpsFake, tmp_path: Path
) -> None:
    with GatewayServer(make_settings(tmp_path, https.url)) as gateway:
        response = httpx.get(gateway.url + IMAGE, timeout=10)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert "TLS handshake failed: certificate verify failed" in error
    assert len(response.content) < 300
    assert https.requests == []


def test_a_connection_kept_by_an_ended_event_loop_is_not_reused(
    https: HttpsFake, ca: trustme.CA
) -> None:
    client = rawhttp.Client(trusting(ca))
    for _ in range(2):  # each run its own loop: the second cannot use the first's connection
        assert asyncio.run(fetch(client, image_url(https), read=True)) == BODY
    assert client.connections_opened == 2
