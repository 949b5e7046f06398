"""Kept-alive HTTP/1.1 connections to an upstream, as the transport of its httpx client.

httpx's own transport (httpcore on anyio, responses parsed by h11 in Python) costs about a
millisecond of CPU per request on a small machine: half of what a cache miss costs the gateway.
This one does what the gateway needs of it, on an asyncio protocol with the C parser
``httptools`` (as :mod:`proxy.rawhttp` does for large downloads), and keeps connections open
between requests. Failures are raised as the ``httpx`` exceptions httpcore raises for them
(with the OS error as their cause), so callers and error messages cannot tell the difference;
the limits are httpcore's too: the pool size, a wait for a free connection bounded by the
``pool`` time-out, idle connections closed after 5 s, a response head of at most 16 KiB.
A request is handed to the socket whole (the gateway's are small, held in memory anyway), so
an upstream that will not take it shows as one that does not answer within the read time-out.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

from proxy.headers import malformed

#: Idle connections older than this are closed rather than reused (httpx's default): servers
#: close theirs after a while, and reusing one they just closed costs a failed request.
KEEPALIVE_SECONDS = 5.0
#: The largest response head accepted (h11's limit, so answers are refused as before).
MAX_HEAD_BYTES = 16 * 1024
# Pause reading from the upstream when this much body is waiting for the caller, and resume
# once it has drained below the low mark: bounds memory per response to about 1 MiB.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11's request-target: visible ASCII


class _Exchange:
    """The response to one request: parsed as it arrives, its body queued for the reader."""

    def __init__(self, request: httpx.Request, connection: _Connection) -> None:
        self.request = request
        self.connection = connection
        self.parser = httptools.HttpResponseParser(self)
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: httpx.HTTPError | None = None
        self.wakeup = asyncio.Event()

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._count(len(status) + 16)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._count(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this connection
            self.connection.close()
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers, self.head_bytes = [], 0
            return
        self.status_code = status
        if not self.head_done.done():
            self.head_done.set_result(None)
        if self.request.method == "HEAD":
            self.on_message_complete()  # no body, whatever Content-Length says

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER:
            self.connection.pause()
        self.wakeup.set()

    def on_message_complete(self) -> None:
        if self.status_code >= 200 and not self.complete:
            self.complete = True
            # Asked now: once the parser has moved past the message it no longer knows.
            self.keep_alive = self.parser.should_keep_alive()
            self.wakeup.set()

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES and not self.head_done.done():
            raise httptools.HttpParserError("the response head is too large")

    # the connection's events
    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx.RemoteProtocolError("upgrade not expected", request=self.request))
        except httptools.HttpParserError as exc:
            message = f"invalid upstream response: {exc}"
            self.fail(httpx.RemoteProtocolError(message, request=self.request))

    def lost(self, exc: Exception | None) -> None:
        if self.head_done.done() and exc is None and self._delimited_by_close():
            self.on_message_complete()
        if self.complete:
            return
        if self.head_done.done():
            message = "peer closed connection without sending complete message body"
        else:
            message = "Server disconnected without sending a response."
        error = httpx.RemoteProtocolError(message, request=self.request)
        error.__cause__ = exc  # a reset or a TLS error says more than "closed"
        self.fail(error)

    def _delimited_by_close(self) -> bool:
        """A body with neither length nor chunking ends when the connection closes."""
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def fail(self, error: httpx.HTTPError) -> None:
        if self.error is None:
            self.error = error
        if not self.head_done.done():
            self.head_done.set_exception(error)
            self.head_done.exception()  # retrieved: nobody may be waiting any more
        self.connection.close()
        self.wakeup.set()

    def take(self) -> bytes:
        """Pop the next chunk; resume the socket once the backlog is small."""
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered < _LOW_WATER:
            self.connection.resume()
        return chunk


class _Connection(asyncio.Protocol):
    """One connection to an upstream; carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(data)
        else:  # nothing was asked: an idle connection the upstream is misusing
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.lost(exc)

    def reusable(self, now: float) -> bool:
        return (
            not self.closed
            and self.loop is asyncio.get_running_loop()
            and now - self.idle_since < KEEPALIVE_SECONDS
        )

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; closing it gives the connection back (or closes it)."""

    def __init__(self, exchange: _Exchange, pool: Http1Transport, read_timeout: float | None):
        self._exchange = exchange
        self._pool = pool
        self._read_timeout = read_timeout
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        while True:
            if exchange.chunks:
                yield exchange.take()
                continue
            if exchange.complete:
                return
            if exchange.error is not None:
                raise exchange.error
            exchange.wakeup.clear()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await exchange.wakeup.wait()
            except TimeoutError as exc:
                exchange.connection.close()
                raise httpx.ReadTimeout("timed out", request=exchange.request) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.release(self._exchange)


class Http1Transport(httpx.AsyncBaseTransport):
    """A pool of kept-alive HTTP/1.1 connections, at most ``max_connections`` at once."""

    def __init__(self, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, str, int], list[_Connection]] = {}
        self._ssl = ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        body = await request.aread()
        head = _request_head(request, body)
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("timed out", request=request) from exc
        connection: _Connection | None = None
        try:
            connection = self._take_idle(request) or await self._connect(request, timeouts)
            exchange = _Exchange(request, connection)
            connection.exchange = exchange
            assert connection.transport is not None
            connection.transport.write(head + _framed(request, body))
            async with asyncio.timeout(timeouts.get("read")):
                await exchange.head_done
        except BaseException as exc:
            if connection is not None:
                connection.close()
            self._slots.release()
            if isinstance(exc, TimeoutError):
                raise httpx.ReadTimeout("timed out", request=request) from exc
            raise
        return httpx.Response(
            exchange.status_code,
            headers=exchange.headers,
            stream=_Body(exchange, self, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def release(self, exchange: _Exchange) -> None:
        """The response is closed: keep its connection for the next request if it can be."""
        connection = exchange.connection
        connection.exchange = None
        if (
            exchange.complete
            and not exchange.chunks
            and exchange.request.method != "HEAD"
            and exchange.keep_alive
            and not connection.closed
        ):
            connection.resume()
            connection.idle_since = time.monotonic()
            self._idle.setdefault(_origin(exchange.request.url), []).append(connection)
        else:
            connection.close()
        self._slots.release()

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _take_idle(self, request: httpx.Request) -> _Connection | None:
        idle = self._idle.get(_origin(request.url))
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if connection.reusable(now):
                return connection
            connection.close()
        return None

    async def _connect(self, request: httpx.Request, timeouts: dict[str, Any]) -> _Connection:
        url = request.url
        scheme, host, port = _origin(url)
        tls: ssl.SSLContext | None = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context(trust_env=False)
            tls = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        return connection


def _origin(url: httpx.URL) -> tuple[bytes, str, int]:
    scheme = url.raw_scheme
    return scheme, url.host, url.port or (443 if scheme == b"https" else 80)


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    """The request line and headers as httpx prepared them; refused as h11 refuses them."""
    method = request.method.encode("latin-1")
    target = request.url.raw_path
    headers = request.headers.raw
    problem = malformed(headers)
    if not _METHOD.fullmatch(method):
        problem = "the method is not a valid HTTP token"
    elif not _TARGET.fullmatch(target):
        problem = "the request target is not visible ASCII"
    if problem is not None:
        raise httpx.LocalProtocolError(problem, request=request)
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _framed(request: httpx.Request, body: bytes) -> bytes:
    """The body as the headers announce it: as it is, or as one chunk when chunked."""
    chunked = any(
        name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
        for name, value in request.headers.raw
    )
    if not chunked:
        return body
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
