"""Relaying an upstream response body to the client.

Binary payloads (series zips, DICOM, JPEG) are relayed chunk by chunk in constant memory:
the client gets the first bytes while the upstream is still sending. Two failure rules:

* the upstream breaks off mid-body: :class:`~proxy.errors.StreamBroken` propagates to the
  server, which then aborts the connection, so the client sees a truncated transfer (no final
  chunk, or fewer bytes than the declared Content-Length), never a clean end;
* the client goes away: the upstream response is closed at once.

Text payloads are read whole only up to a limit (:func:`read_bounded`); a larger one, declared
or found while reading, is relayed from where the reading stopped, so memory stays bounded by
the limit whatever the upstream sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.types import Receive, Send

from proxy.errors import StreamBroken, transport_error
from proxy.forwarding import UpstreamResponse
from proxy.headers import RawHeaders, for_client
from proxy.responses import AGE_ZERO, BYPASS

log = logging.getLogger("nbia_proxy.stream")


@dataclass(slots=True)
class Overflow:
    """A body larger than the limit of :func:`read_bounded`: what was read, and the rest."""

    response: UpstreamResponse
    read: list[bytes]  # the chunks read before the limit was passed (none if it was declared)
    rest: AsyncIterator[bytes]  # the same iterator, where the reading stopped

    async def aclose(self) -> None:
        self.read.clear()
        await self.response.aclose()


async def read_bounded(response: UpstreamResponse, upstream: str, limit: int) -> bytes | Overflow:
    """The whole body (raw bytes, content encoding kept) if it is at most ``limit`` bytes.

    Else an :class:`Overflow` at once when Content-Length declares more, or as soon as the
    chunks read pass the limit; the response then stays open for :func:`relay_stream`.
    """
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        return Overflow(response, [], response.aiter_raw())
    chunks: list[bytes] = []
    size = 0
    raw = response.aiter_raw()
    try:
        async for chunk in raw:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return Overflow(response, chunks, raw)
    except BaseException as exc:
        await response.aclose()
        if isinstance(exc, httpx.HTTPError):
            raise transport_error(exc, upstream, mid_body=True) from exc
        raise
    await response.aclose()
    return b"".join(chunks)


async def relay_stream(
    response: UpstreamResponse,
    upstream: str,
    receive: Receive,
    send: Send,
    extra: RawHeaders,
    overflow: Overflow | None = None,
) -> int:
    """Stream ``response`` to the client; return the number of body bytes sent.

    With ``overflow`` (of this response), its chunks already read go first, then the rest.
    """
    read = overflow.read if overflow is not None else []
    chunks = overflow.rest if overflow is not None else response.aiter_raw()
    headers = for_client(response.headers.raw) + extra
    length = response.headers.get("content-length")
    if length is not None:
        headers.append((b"content-length", length.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    sent = 0

    async def pump() -> None:
        nonlocal sent
        while read:  # popped as sent, so the memory they hold is given back on the way
            chunk = read.pop(0)
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        async for chunk in chunks:
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        if pumping.done():
            error = pumping.exception()
            if isinstance(error, httpx.HTTPError):
                gateway_error = transport_error(error, upstream, mid_body=True)
                log.warning("%s after %d bytes; aborting the client transfer", gateway_error, sent)
                raise StreamBroken(gateway_error.message) from error
            if error is not None:
                raise error
        else:
            log.info("client disconnected after %d bytes; closing the upstream response", sent)
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
    finally:
        watching.cancel()
        # Done already, except when the relay itself is cancelled (at shutdown): the pump must
        # not outlive it, reading from a closed response.
        pumping.cancel()
        await response.aclose()
    return sent


def uncached_marks(response: UpstreamResponse) -> RawHeaders:
    """The headers that mark a relayed answer as not from the cache (the upstream's Age kept)."""
    return [BYPASS] if "age" in response.headers else [BYPASS, AGE_ZERO]


async def _client_gone(receive: Receive) -> None:
    """Return when the client disconnects (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
