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

A :class:`Client` (one per upstream) builds its TLS context once (loading a trust store costs
about 20 ms of CPU, on the event loop) and keeps connections whose response ended cleanly, with
a known length and no ``Connection: close``, for the next GET to the same host: a TLS handshake
and two round trips saved per request. Any error, a body left unread, or a connection idle for
longer than ``idle_seconds`` closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools
import httpx

from proxy.headers import malformed

log = logging.getLogger("nbia_proxy.rawhttp")

# Pause reading from the upstream when this much body is waiting for the client, and resume
# once it has drained below the low mark: bounds memory per transfer to about 1 MiB.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only (RFC 9112 §3.2)

#: As httpx's pool: an idle connection is closed after this long, before a server's keep-alive
#: time-out (5 s on a stock Apache) would close it under a request just sent.
IDLE_SECONDS = 5.0

_Origin = tuple[str, str, int]


def new_ssl_context() -> ssl.SSLContext:
    """A TLS context as httpx's pool builds it: certifi's roots, nothing from the environment."""
    return httpx.create_ssl_context(trust_env=False)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The context of :func:`send` without one: built once per process."""
    return new_ssl_context()


class _ResponseProtocol(asyncio.Protocol):
    """One upstream connection: parses the response to the request under way, queues its body
    chunks and pauses the socket when they pile up; between requests it is idle."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.lost = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.request: httpx.Request | None = None  # None while idle
        self.begin(None)

    def begin(self, request: httpx.Request | None) -> None:
        """Expect the response to ``request`` (just about to be sent); None: idle."""
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = False  # some of the response has arrived
        self.keep_alive = False  # the response allows another request on this connection
        self.complete = False
        self.trailing = False  # bytes after the end of the response: the connection is spent
        self.error: Exception | None = None
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
        except httptools.HttpParserError as exc:
            error = httpx.RemoteProtocolError(
                f"invalid upstream response: {exc}", request=self.request
            )
            self._fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.request is None:
            return  # idle: the pool drops it
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
    def on_message_begin(self) -> None:
        if self.complete:
            self.trailing = True  # a second response to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        self.status_code = self.parser.get_status_code()
        # Read here: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
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

    def reusable(self) -> bool:
        """The response ended cleanly, all read, and the connection may carry another."""
        return (
            self.complete
            and not self.chunks
            and not (self.trailing or self.lost or self.paused)
            and self.error is None
            and self.transport is not None
            and not self.transport.is_closing()
            and not self._delimited_by_close()
            and self.keep_alive
            and not any(
                name == b"connection" and b"close" in value.lower() for name, value in self.headers
            )
        )

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()


class RawResponse:
    """The parts of an ``httpx.Response`` the relay needs, for a body read straight off a socket."""

    def __init__(
        self,
        protocol: _ResponseProtocol,
        read_timeout: float,
        release: Callable[[_ResponseProtocol], None] | None = None,
    ) -> None:
        self._protocol = protocol
        self._read_timeout = read_timeout
        self._release = release  # takes the connection back when the response ended cleanly
        self._finished = False
        self.status_code = protocol.status_code
        self.headers = httpx.Headers(protocol.headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive (chunked framing removed, encoding kept)."""
        protocol = self._protocol
        while not self._finished:  # once finished, the connection may carry another response
            if protocol.chunks:
                yield protocol.take()
                continue
            if protocol.complete:
                self._finish()
                return
            if protocol.error is not None:
                self._finish()
                raise protocol.error
            protocol.wakeup.clear()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await protocol.wakeup.wait()
            except TimeoutError as exc:
                self._finish()
                raise httpx.ReadTimeout(
                    "upstream stopped sending the body", request=protocol.request
                ) from exc

    async def aclose(self) -> None:
        self._finish()

    def _finish(self) -> None:
        """Give the connection back for another request, or close it (once)."""
        if self._finished:
            return
        self._finished = True
        protocol = self._protocol
        if self._release is not None and protocol.reusable():
            protocol.begin(None)
            self._release(protocol)
        else:
            protocol.close()


class Client:
    """Binary requests to one upstream's hosts: one TLS context, idle connections reused.

    ``ssl_context`` is built on first use when not given (:func:`new_ssl_context`). At most
    ``max_idle`` idle connections are kept per host; only GET requests take one (a kept
    connection the server closed at that moment is replaced once, before any answer arrived;
    a POST is never sent twice), and any request's connection is kept after a clean response.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_idle: int = 8,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._ssl_context = ssl_context
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[_Origin, deque[_ResponseProtocol]] = {}
        self._closed = False
        #: Connections opened so far (the tests and the benchmark read it).
        self.connections_opened = 0

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = new_ssl_context()
        return self._ssl_context

    async def send(
        self,
        url: httpx.URL,
        method: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> RawResponse:
        """Send one request and return once the response head has arrived."""
        request = _request(url, method, connect_timeout, read_timeout)
        message = _request_head(url, method, headers, body, request, keep_alive=True) + body
        origin = _origin(url)
        release = functools.partial(self._keep, origin)
        protocol = self._take(origin) if method == "GET" else None
        if protocol is not None:
            try:
                return await _exchange(protocol, message, request, read_timeout, release)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                if protocol.received:
                    raise
                log.debug("a kept connection to %s was closed as it was reused", url.host)
        context = self.ssl_context if url.scheme == "https" else None
        protocol = await _connect(url, request, connect_timeout, context)
        self.connections_opened += 1
        return await _exchange(protocol, message, request, read_timeout, release)

    def _take(self, origin: _Origin) -> _ResponseProtocol | None:
        """The most recently used live idle connection to ``origin``, if any."""
        idle = self._idle.get(origin)
        while idle:
            protocol = idle.pop()
            if protocol.idle_timer is not None:
                protocol.idle_timer.cancel()
                protocol.idle_timer = None
            if protocol.loop is not asyncio.get_running_loop():
                # Kept by an event loop that has ended (a client used from successive
                # asyncio.run calls): its transport cannot work here, nor be closed cleanly.
                with contextlib.suppress(RuntimeError):
                    protocol.close()
                continue
            if protocol.lost or protocol.trailing or protocol.transport is None:
                protocol.close()
                continue
            if protocol.transport.is_closing():
                continue
            return protocol
        return None

    def _keep(self, origin: _Origin, protocol: _ResponseProtocol) -> None:
        idle = self._idle.setdefault(origin, deque())
        if self._closed or len(idle) >= self.max_idle:
            protocol.close()
            return
        idle.append(protocol)
        loop = asyncio.get_running_loop()
        protocol.idle_timer = loop.call_later(self.idle_seconds, self._expire, origin, protocol)

    def _expire(self, origin: _Origin, protocol: _ResponseProtocol) -> None:
        protocol.idle_timer = None
        idle = self._idle.get(origin)
        if idle is not None and protocol in idle:
            idle.remove(protocol)
        protocol.close()

    def idle_connections(self) -> int:
        """How many connections wait for a request now."""
        return sum(len(idle) for idle in self._idle.values())

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response ends."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


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
    """Send one request on a new connection, closed after the response; return once the
    response head has arrived."""
    request = _request(url, method, connect_timeout, read_timeout)
    message = _request_head(url, method, headers, body, request, keep_alive=False) + body
    context = (ssl_context or default_ssl_context()) if url.scheme == "https" else None
    protocol = await _connect(url, request, connect_timeout, context)
    return await _exchange(protocol, message, request, read_timeout, None)


def _request(url: httpx.URL, method: str, connect: float, read: float) -> httpx.Request:
    """The ``httpx.Request`` that errors carry: the URL and the time limits."""
    timeout = {"connect": connect, "read": read}
    return httpx.Request(method, url, extensions={"timeout": timeout})


def _origin(url: httpx.URL) -> _Origin:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


async def _connect(
    url: httpx.URL,
    request: httpx.Request,
    connect_timeout: float,
    tls: ssl.SSLContext | None,
) -> _ResponseProtocol:
    """A new connection to ``url``'s host (TLS when ``tls`` is given)."""
    loop = asyncio.get_running_loop()
    _, host, port = _origin(url)
    try:
        async with asyncio.timeout(connect_timeout):
            _, protocol = await loop.create_connection(
                _ResponseProtocol,
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
    return protocol


async def _exchange(
    protocol: _ResponseProtocol,
    message: bytes,
    request: httpx.Request,
    read_timeout: float,
    release: Callable[[_ResponseProtocol], None] | None,
) -> RawResponse:
    """Send ``message`` on the connection; return once the response head has arrived."""
    assert protocol.transport is not None
    protocol.begin(request)
    protocol.transport.write(message)
    try:
        async with asyncio.timeout(read_timeout):
            await protocol.head_done
    except TimeoutError as exc:
        protocol.close()
        message_ = "upstream sent no response head in time"
        raise httpx.ReadTimeout(message_, request=request) from exc
    except httpx.HTTPError:
        protocol.close()
        raise
    return RawResponse(protocol, read_timeout, release)


def _request_head(
    url: httpx.URL,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    request: httpx.Request,
    *,
    keep_alive: bool,
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
    if not keep_alive:  # one request on this connection: the upstream closes it after the body
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
