"""The streaming face of :mod:`proxy.http1`, for relaying large upstream bodies quickly.

Binary payloads (series zips of several GB) only need one request out, the response head, and
the body handed on chunk by chunk with flat memory; :mod:`proxy.http1` does the protocol. The
response object offers the small part of ``httpx.Response`` that the relay uses
(``status_code``, ``headers``, ``aiter_raw()``, ``aclose()``), and failures are the ``httpx``
exceptions the metadata client raises, so callers handle both clients the same way.

A :class:`Client` (one per upstream) keeps a connection whose response ended cleanly for the
next GET to the same host: a TLS handshake and two round trips saved per request. Only a GET
goes out on a kept connection (a POST is never sent twice), and a GET whose kept connection the
server closed at that moment is sent once more on a new one. The client has no cap of its own
on connections in use, and its pool is not the metadata client's: a slow multi-GB relay must
not take a connection the metadata client needs.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator

import httpx

from proxy.http1 import KEEPALIVE_SECONDS, Body, Pool, check_head, connect, new_ssl_context, origin

#: As httpx's pool: an idle connection is closed after this long.
IDLE_SECONDS = KEEPALIVE_SECONDS


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The context of :func:`send` without one: built once per process."""
    return new_ssl_context()


class RawResponse:
    """The parts of an ``httpx.Response`` the relay needs, for a body read straight off a socket."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self._protocol = body.connection
        self.status_code = body.connection.status_code
        self.headers = httpx.Headers([(k.lower(), v) for k, v in body.connection.headers])

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive (chunked framing removed, encoding kept)."""
        return aiter(self._body)

    async def aclose(self) -> None:
        self._body.finish()


class Client:
    """Binary requests to one upstream's hosts: one TLS context, idle connections reused.

    ``ssl_context`` is built on first use when not given; at most ``max_idle`` idle
    connections are kept per host, each for at most ``idle_seconds``.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_idle: int = 8,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.pool = Pool(ssl_context, max_idle=max_idle, idle_seconds=idle_seconds)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self.pool.ssl_context

    @property
    def connections_opened(self) -> int:
        """Connections opened so far (the tests and the benchmark read it)."""
        return self.pool.connections_opened

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
        timeouts = {"connect": connect_timeout, "read": read_timeout}
        get = method == "GET"
        return RawResponse(await self.pool.open(request, message, timeouts, reuse=get, replay=get))

    def idle_connections(self) -> int:
        """How many connections wait for a request now."""
        return self.pool.idle_connections()

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response ends."""
        await self.pool.aclose()


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
    scheme, host, port = origin(url)
    tls = (ssl_context or default_ssl_context()) if scheme == b"https" else None
    connection = await connect(request, host, port, tls, connect_timeout)
    await connection.exchange(message, request, read_timeout)
    return RawResponse(Body(connection, None, read_timeout))


def _request(url: httpx.URL, method: str, connect: float, read: float) -> httpx.Request:
    """The ``httpx.Request`` that errors carry: the URL and the time limits."""
    timeout = {"connect": connect, "read": read}
    return httpx.Request(method, url, extensions={"timeout": timeout})


def _request_head(
    url: httpx.URL,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    request: httpx.Request,
    *,
    keep_alive: bool,
) -> bytes:
    """The request line, ``host``, the given headers and the body's length."""
    verb = method.encode("latin-1")
    target = url.raw_path
    check_head(verb, target, headers, request, origin_form=True)
    lines = [b"%s %s HTTP/1.1" % (verb, target), b"host: " + url.netloc]  # as configured
    lines += [name + b": " + value for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d" % len(body))
    if not keep_alive:  # one request on this connection: the upstream closes it after the body
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
