"""Relaying an upstream response body to the client.

Binary payloads (series zips, DICOM, JPEG) are relayed chunk by chunk in constant memory:
the client gets the first bytes while the upstream is still sending. Two failure rules:

* the upstream breaks off mid-body: :class:`StreamBroken` propagates to the server, which then
  aborts the connection, so the client sees a truncated transfer (no final chunk, or fewer bytes
  than the declared Content-Length), never a clean end;
* the client goes away: the upstream response is closed at once.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from starlette.types import Receive, Send

from proxy.forwarding import UpstreamResponse, translate
from proxy.headers import RawHeaders, for_client

log = logging.getLogger("nbia_proxy.stream")


class StreamBroken(Exception):
    """The upstream failed after the response had started; the connection must be aborted."""


async def relay_stream(
    response: UpstreamResponse, upstream: str, receive: Receive, send: Send, extra: RawHeaders
) -> int:
    """Stream ``response`` to the client; return the number of body bytes sent."""
    headers = for_client(response.headers.raw) + extra
    length = response.headers.get("content-length")
    if length is not None:
        headers.append((b"content-length", length.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    sent = 0

    async def pump() -> None:
        nonlocal sent
        async for chunk in response.aiter_raw():
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
                gateway_error = translate(error, upstream)
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


async def read_whole(response: UpstreamResponse, upstream: str) -> bytes:
    """Read a (small) body completely; raw bytes, content encoding kept."""
    try:
        return b"".join([chunk async for chunk in response.aiter_raw()])
    except httpx.HTTPError as exc:
        raise translate(exc, upstream) from exc
    finally:
        await response.aclose()


async def _client_gone(receive: Receive) -> None:
    """Return when the client disconnects (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
