"""A minimal HTTP/1.1 client for relaying large upstream bodies quickly.

httpx reads bodies through h11, anyio and httpcore: per chunk it copies the data twice and
sets up a cancel scope, which caps a relay at a few hundred MB/s on a small machine. Binary
payloads (series zips of several GB) only need: one request out, the status line and headers
parsed, and the body handed on chunk by chunk. This module does exactly that on an asyncio
protocol with the C parser ``httptools`` (already installed with uvicorn), with flow control so
that memory stays flat when the client is slower than the upstream.

The response object offers the small part of ``httpx.Response`` that the relay uses
(``status_code``, ``headers``, ``aiter_raw()``, ``aclose()``), and failures are raised as the
matching ``httpx`` exceptions (carrying an ``httpx.Request`` with the URL and time limits, so
error messages can name the host), so callers handle both clients the same way.

The request head is written by hand, so it is checked first: a method, target, header name or
value that would end or split a line (CR, LF, NUL, ...) raises ``httpx.LocalProtocolError``
before anything is sent, as h11 does for httpx.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

from proxy.headers import malformed

# Pause reading from the upstream when this much body is waiting for the client, and resume
# once it has drained below the low mark: bounds memory per transfer to about 1 MiB.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only (RFC 9112 §3.2)


class _ResponseProtocol(asyncio.Protocol):
    """Parses one response and queues its body chunks, pausing the socket when full."""

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.error: Exception | None = None
        self.wakeup = asyncio.Event()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            error = httpx.RemoteProtocolError(
                f"invalid upstream response: {exc}", request=self.request
            )
            self._fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_done.done() and exc is None and self._delimited_by_close():
            self.on_message_complete()
        if not self.complete:
            error = httpx.RemoteProtocolError(
                "upstream closed the connection before the body ended", request=self.request
            )
            error.__cause__ = exc  # a reset or a TLS error says more than "closed"
            self._fail(error)

    def _delimited_by_close(self) -> bool:
        """A body with neither length nor chunking ends when the connection closes."""
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status_code = self.parser.get_status_code()
        if not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self.wakeup.set()

    def on_message_complete(self) -> None:
        self.complete = True
        self.wakeup.set()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if not self.head_done.done():
            self.head_done.set_exception(error)
        self.wakeup.set()

    def take(self) -> bytes:
        """Pop the next chunk; resume the socket once the backlog is small."""
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class RawResponse:
    """The parts of an ``httpx.Response`` the relay needs, for a body read straight off a socket."""

    def __init__(self, protocol: _ResponseProtocol, read_timeout: float) -> None:
        self._protocol = protocol
        self._read_timeout = read_timeout
        self.status_code = protocol.status_code
        self.headers = httpx.Headers(protocol.headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive (chunked framing removed, encoding kept)."""
        protocol = self._protocol
        while True:
            if protocol.chunks:
                yield protocol.take()
                continue
            if protocol.complete:
                return
            if protocol.error is not None:
                raise protocol.error
            protocol.wakeup.clear()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await protocol.wakeup.wait()
            except TimeoutError as exc:
                raise httpx.ReadTimeout(
                    "upstream stopped sending the body", request=protocol.request
                ) from exc

    async def aclose(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()


async def send(
    url: httpx.URL,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    connect_timeout: float,
    read_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send one request on a new connection and return once the response head has arrived."""
    request = httpx.Request(
        method,
        url,
        extensions={"timeout": {"connect": connect_timeout, "read": read_timeout}},
    )
    head = _request_head(url, method, headers, body, request)
    loop = asyncio.get_running_loop()
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    tls = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
    try:
        async with asyncio.timeout(connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: _ResponseProtocol(request),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls else None,
            )
    except TimeoutError as exc:
        message = f"connecting to {host}:{port} timed out"
        raise httpx.ConnectTimeout(message, request=request) from exc
    except OSError as exc:
        message = f"cannot connect to {host}:{port}: {exc.strerror}"
        raise httpx.ConnectError(message, request=request) from exc
    assert protocol.transport is not None
    protocol.transport.write(head + body)
    try:
        async with asyncio.timeout(read_timeout):
            await protocol.head_done
    except TimeoutError as exc:
        protocol.transport.close()
        message = "upstream sent no response head in time"
        raise httpx.ReadTimeout(message, request=request) from exc
    except httpx.HTTPError:
        protocol.transport.close()
        raise
    return RawResponse(protocol, read_timeout)


def _request_head(
    url: httpx.URL,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    request: httpx.Request,
) -> bytes:
    """The request line and headers; refused when any part would not stay on its own line."""
    verb = method.encode("latin-1")
    target = url.raw_path
    problem = malformed(headers)
    if not _METHOD.fullmatch(verb):
        problem = "the method is not a valid HTTP token"
    elif not _TARGET.fullmatch(target):
        problem = "the request target is not visible ASCII"
    if problem is not None:
        raise httpx.LocalProtocolError(problem, request=request)
    host = url.netloc  # host[:port] exactly as configured
    lines = [b"%s %s HTTP/1.1" % (verb, target), b"host: " + host]
    lines += [name + b": " + value for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d" % len(body))
    # One request per connection: the upstream closes it when the body ends.
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
