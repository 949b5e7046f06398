"""Reading a client's request body: bounded in size and in time, refused early when too large."""

from __future__ import annotations

import asyncio

from starlette.types import Receive

from proxy.errors import ClientError
from proxy.headers import RawHeaders, find


async def read_body(headers: RawHeaders, receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole body: 413 when ``Content-Length`` or the bytes read pass ``limit``, 408 when it
    does not arrive within ``timeout`` seconds, 499 when the client goes away."""
    declared = find(headers, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ClientError(f"request body larger than {limit} bytes", status=413)
    try:
        async with asyncio.timeout(timeout):
            return await read_all(receive, limit)
    except TimeoutError:
        raise ClientError("request body not received in time", status=408) from None


async def read_all(receive: Receive, limit: int) -> bytes:
    """The body's chunks joined, at most ``limit`` bytes, with no time bound of its own."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError("client disconnected", status=499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body larger than {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
