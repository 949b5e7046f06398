"""Sending a kept file's bytes to an asyncio transport, zero-copy where the transport allows.

``loop.sendfile`` hands the file to the kernel (``os.sendfile``) on a plain socket transport
and falls back to reading and writing chunks itself elsewhere (TLS, a loop without native
support), so callers need not know which they got. The response head is the caller's: write it
to the transport first, then call :func:`send_range`.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO


class ShortFile(Exception):
    """The file ended before the bytes promised: the caller must abort the connection (a
    clean end would pass a truncated answer off as complete)."""


async def send_range(
    transport: asyncio.WriteTransport, file: BinaryIO, start: int, length: int
) -> None:
    """Send ``length`` bytes of ``file`` from ``start``; raise :class:`ShortFile` if it holds
    fewer. Waits for the transport's buffer as it goes (flow control included)."""
    if length <= 0:
        return  # loop.sendfile refuses a count of 0
    loop = asyncio.get_running_loop()
    sent = await loop.sendfile(transport, file, start, length, fallback=True)
    if sent != length:
        raise ShortFile(f"sent {sent} of {length} bytes from offset {start}")
