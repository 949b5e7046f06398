"""HTTP/1.1 connections to an upstream: the response protocol, the pool, the httpx transport.

httpx's own transport (httpcore on anyio, responses parsed by h11 in Python) costs about a
millisecond of CPU per request on a small machine, and reads a body with two copies and a
cancel scope per chunk, which caps a relay at a few hundred MB/s. What the gateway needs of
HTTP/1.1 is small: a request written whole, the status line and headers parsed, the body handed
on chunk by chunk. This module does that on an asyncio protocol with the C parser ``httptools``
(installed with uvicorn), for both of the gateway's upstream clients:

* :class:`Http1Transport`, an ``httpx`` transport for the metadata client;
* :mod:`proxy.rawhttp`, the streaming ``send()`` for large binary relays.

Both sit on a :class:`Pool` (one per client and upstream, the TLS context shared): kept-alive
connections per host, reused only after a clean, fully read response with a known length and
no ``Connection: close``; an idle connection closed after ``idle_seconds``; at most
``max_connections`` in use when given, a wait for one bounded by the ``pool`` time-out. A body
piling up unread pauses the socket (about 1 MiB held per response); a response head larger than
16 KiB is refused (h11's limit). Failures are raised as the ``httpx`` exceptions httpcore raises
for them (with the OS or TLS error as their cause and an ``httpx.Request`` carrying the URL and
time limits), so :func:`proxy.errors.transport_error` describes both clients alike. A request
head with a byte that would end or split a line raises ``httpx.LocalProtocolError`` before
anything is sent, as h11 does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

from proxy.headers import malformed

log = logging.getLogger("nbia_proxy.http1")

#: Idle connections are closed after this long (httpx's default), before a server's own
#: keep-alive time-out (5 s on a stock Apache) would close one under a request just sent.
KEEPALIVE_SECONDS = 5.0
#: The largest response head accepted (h11's limit, so answers are refused as httpx did).
MAX_HEAD_BYTES = 16 * 1024
# Pause reading from the upstream when this much body is waiting for the reader, and resume
# once it has drained below the low mark: bounds memory per response to about 1 MiB.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11's request-target: visible ASCII

Origin = tuple[bytes, str, int]


def new_ssl_context() -> ssl.SSLContext:
    """A TLS context as httpx's pool builds it: certifi's roots, nothing from the environment.
    Loading a trust store costs about 20 ms of CPU: build one per upstream, not per request."""
    return httpx.create_ssl_context(trust_env=False)


def origin(url: httpx.URL) -> Origin:
    """Scheme, host and port: connections are kept per origin."""
    scheme = url.raw_scheme
    return scheme, url.host, url.port or (443 if scheme == b"https" else 80)


def check_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    request: httpx.Request,
    *,
    origin_form: bool = False,
) -> None:
    """Refuse a request head any part of which would not stay on its own line.
    ``origin_form``: the target must also be a path (``/...``, RFC 9112 section 3.2)."""
    problem = malformed(headers)
    if not _METHOD.fullmatch(method):
        problem = "the method is not a valid HTTP token"
    elif not _TARGET.fullmatch(target) or (origin_form and not target.startswith(b"/")):
        problem = "the request target is not visible ASCII"
    if problem is not None:
        raise httpx.LocalProtocolError(problem, request=request)


class Connection(asyncio.Protocol):
    """One upstream connection: parses the response to the request under way, queues its body
    chunks and pauses the socket when they pile up; between requests it is idle."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.begin(None)

    def begin(self, request: httpx.Request | None) -> None:
        """Expect the response to ``request`` (just about to be sent); None: idle."""
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done: asyncio.Future[None] = self.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = False  # some of the response has arrived
        self.keep_alive = False  # the response allows another request on this connection
        self.complete = False
        self.trailing = False  # bytes after the end of the response: the connection is spent
        self.error: httpx.HTTPError | None = None
        self.wakeup = asyncio.Event()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.request is None:  # nothing was asked: this connection is out of step
            self.trailing = True
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx.RemoteProtocolError("upgrade not expected", request=self.request))
        except httptools.HttpParserError as exc:
            message = f"invalid upstream response: {exc}"
            self.fail(httpx.RemoteProtocolError(message, request=self.request))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.request is None:
            return  # idle: the pool drops it
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

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            self.trailing = True  # a second response to one request

    def on_status(self, status: bytes) -> None:
        self._count(len(status) + 16)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))
            self._count(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers, self.head_bytes = [], 0
            return
        self.status_code = status
        # Asked now: once the parser has moved past the message it no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head_done.done():
            self.head_done.set_result(None)
        if self.request is not None and self.request.method == "HEAD":
            self.on_message_complete()  # no body, whatever Content-Length says

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and not self.closed:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True
        self.wakeup.set()

    def on_message_complete(self) -> None:
        if self.status_code >= 200 and not self.complete:
            self.complete = True
            self.wakeup.set()

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES and not self.head_done.done():
            raise httptools.HttpParserError("the response head is too large")

    # for the pool and the body
    def fail(self, error: httpx.HTTPError) -> None:
        if self.error is None:
            self.error = error
        if not self.head_done.done():
            self.head_done.set_exception(error)
            self.head_done.exception()  # retrieved: nobody may be waiting any more
        self.close()
        self.wakeup.set()

    async def exchange(
        self, message: bytes, request: httpx.Request, read_timeout: float | None
    ) -> None:
        """Send ``message`` (the whole request); return once the response head has arrived."""
        assert self.transport is not None
        self.begin(request)
        try:
            self.transport.write(message)
            async with asyncio.timeout(read_timeout):
                await self.head_done
        except BaseException as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                raise httpx.ReadTimeout("timed out", request=request) from exc
            raise

    def take(self) -> bytes:
        """Pop the next chunk; resume the socket once the backlog is small."""
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _LOW_WATER and not self.closed:
            assert self.transport is not None
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        """The response ended cleanly, all read, and the connection may carry another."""
        return (
            self.complete
            and not self.chunks
            and not (self.trailing or self.closed or self.paused)
            and self.error is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self.request is not None
            and self.request.method != "HEAD"  # the parser still expects the announced body
            and not self._delimited_by_close()
            and self.keep_alive
            and not any(
                name.lower() == b"connection" and b"close" in value.lower()
                for name, value in self.headers
            )
        )

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class Body(httpx.AsyncByteStream):
    """A response body as it arrives (chunked framing removed, encoding kept). Once it has
    ended or is closed, its connection goes back to ``pool`` if it can carry another request,
    else it is closed (``pool`` None: always closed)."""

    def __init__(self, connection: Connection, pool: Pool | None, read_timeout: float | None):
        self.connection = connection
        self._pool = pool
        self._read_timeout = read_timeout
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self.connection
        while not self._finished:  # once finished, the connection may carry another response
            if connection.chunks:
                yield connection.take()
                continue
            if connection.complete:
                self.finish()
                return
            if connection.error is not None:
                self.finish()
                raise connection.error
            connection.wakeup.clear()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await connection.wakeup.wait()
            except TimeoutError as exc:
                self.finish()
                raise httpx.ReadTimeout("timed out", request=connection.request) from exc

    async def aclose(self) -> None:
        self.finish()

    def finish(self) -> None:
        """Give the connection back, or close it (once)."""
        if self._finished:
            return
        self._finished = True
        if self._pool is not None:
            self._pool.release(self.connection)
        else:
            self.connection.close()


class Pool:
    """Connections to one upstream's hosts: one TLS context, kept-alive connections reused.

    ``ssl_context`` is built on first use when not given (:func:`new_ssl_context`). At most
    ``max_connections`` are in use at once when given (a request waits for one up to its
    ``pool`` time-out), and at most ``max_idle`` idle ones are kept per host.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int | None = None,
        max_idle: int,
        idle_seconds: float = KEEPALIVE_SECONDS,
    ) -> None:
        self._ssl_context = ssl_context
        self._slots = None if max_connections is None else asyncio.Semaphore(max_connections)
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[Origin, deque[Connection]] = {}
        self._closed = False
        #: Connections opened so far (the tests and the benchmark read it).
        self.connections_opened = 0

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = new_ssl_context()
        return self._ssl_context

    async def open(
        self,
        request: httpx.Request,
        message: bytes,
        timeouts: dict[str, Any],
        *,
        reuse: bool,
        replay: bool,
    ) -> Body:
        """Send ``message`` for ``request``; return the body once the response head is in.

        ``reuse``: the request may go out on a kept connection; ``replay``: when that kept
        connection turns out closed (before any answer arrived), send it once more on a new one.
        """
        if self._slots is not None:
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise httpx.PoolTimeout("timed out", request=request) from exc
        read_timeout = timeouts.get("read")
        try:
            connection = self._take(origin(request.url)) if reuse else None
            if connection is not None:
                try:
                    await connection.exchange(message, request, read_timeout)
                    return Body(connection, self, read_timeout)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    if not replay or connection.received:
                        raise
                    host = request.url.host
                    log.debug("a kept connection to %s was closed as it was reused", host)
            connection = await self.connect(request, timeouts.get("connect"))
            await connection.exchange(message, request, read_timeout)
            return Body(connection, self, read_timeout)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    async def connect(self, request: httpx.Request, timeout: float | None) -> Connection:
        """A new connection to ``request``'s host (TLS for https)."""
        scheme, host, port = origin(request.url)
        tls = self.ssl_context if scheme == b"https" else None
        connection = await connect(request, host, port, tls, timeout)
        self.connections_opened += 1
        return connection

    def release(self, connection: Connection) -> None:
        """The response is read or closed: keep its connection for the next request if it can
        carry one, else close it; its slot is free again either way."""
        if self._slots is not None:
            self._slots.release()
        assert connection.request is not None
        key = origin(connection.request.url)
        idle = self._idle.setdefault(key, deque())
        if self._closed or not connection.reusable() or len(idle) >= self.max_idle:
            connection.close()
            return
        connection.begin(None)
        idle.append(connection)
        connection.idle_timer = connection.loop.call_later(
            self.idle_seconds, self._expire, key, connection
        )

    def _take(self, key: Origin) -> Connection | None:
        """The most recently used live idle connection (the least likely to be closed)."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()
                connection.idle_timer = None
            if connection.loop is not asyncio.get_running_loop():
                # Kept by an event loop that has ended (a client used from successive
                # asyncio.run calls): its transport cannot work here, nor be closed cleanly.
                with contextlib.suppress(RuntimeError):
                    connection.close()
                continue
            if connection.closed or connection.trailing or connection.transport is None:
                connection.close()
                continue
            if connection.transport.is_closing():
                continue
            return connection
        return None

    def _expire(self, key: Origin, connection: Connection) -> None:
        connection.idle_timer = None
        idle = self._idle.get(key)
        if idle is not None and connection in idle:
            idle.remove(connection)
        connection.close()

    def idle_connections(self) -> int:
        """How many connections wait for a request now."""
        return sum(len(idle) for idle in self._idle.values())

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response ends."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


async def connect(
    request: httpx.Request, host: str, port: int, tls: ssl.SSLContext | None, timeout: float | None
) -> Connection:
    """A new connection to ``host:port`` (TLS when ``tls`` is given)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_connection(
                Connection, host, port, ssl=tls, server_hostname=host if tls else None
            )
    except TimeoutError as exc:
        raise httpx.ConnectTimeout("timed out", request=request) from exc
    except OSError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    return connection


class Http1Transport(httpx.AsyncBaseTransport):
    """The httpx face of a :class:`Pool`: at most ``max_connections`` at once, any request
    on a kept connection (a failure is raised, the caller decides on sending again)."""

    def __init__(self, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.pool = Pool(ssl_context, max_connections=max_connections, max_idle=max_connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        body = await request.aread()
        message = _request_head(request) + _framed(request, body)
        stream = await self.pool.open(request, message, timeouts, reuse=True, replay=False)
        return httpx.Response(
            stream.connection.status_code,
            headers=stream.connection.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


def _request_head(request: httpx.Request) -> bytes:
    """The request line and headers as httpx prepared them; refused as h11 refuses them."""
    method = request.method.encode("latin-1")
    target = request.url.raw_path
    headers = request.headers.raw
    check_head(method, target, headers, request)
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
