"""The ASGI "Zero Copy Send" extension on uvicorn's HTTP/1.1 protocol: a file's bytes go from
the page cache to the socket with ``os.sendfile``, never through Python.

A connection that can take them (plain TCP, no TLS) offers ``http.response.zerocopysend`` in
each request's ``scope["extensions"]``; the app then sends ``{"type":
"http.response.zerocopysend", "file": ..., "offset": ..., "count": ..., "more_body": ...}``
instead of body messages. :class:`ZeroCopy` takes those messages from the request's cycle
and hands every other one to uvicorn unchanged.

How one such message is sent:

* the response head (and anything else) uvicorn has written is on its way first: the send
  waits until the transport's buffer is empty;
* reading is paused meanwhile, so that nothing the client sends makes the protocol write into
  the middle of the file's bytes (an error answer, a shortcut hit);
* the bytes go out on a duplicate of the socket's descriptor, never on the transport's own
  number: a transport that closes its descriptor mid-send frees that number for the next
  connection, and file bytes would reach another client;
* ``sendfile`` runs in a worker thread (it reads the file, and a page not in the page cache is
  a disk read) on the non-blocking socket: when the socket's buffer is full the thread returns
  and the loop waits for the socket to be writable, so a client that stops reading holds no
  thread;
* when the connection is lost (the client left, or the server aborted it at the end of the
  shutdown grace), the send stops and its duplicate is closed, which closes the socket.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from proxy.responses import SENT, ZERO_COPY

#: At most this many bytes per ``sendfile`` call (the kernel's own cap is about 2 GiB).
_CALL_BYTES = 64 * 1024 * 1024
#: At most this many bytes per worker-thread hop, so that a stop is heard soon after it comes.
_HOP_BYTES = 256 * 1024 * 1024


def offered(scheme: str | None) -> bool:
    """Whether a connection of ``scheme`` (uvicorn's ``http`` or ``https``) can offer it."""
    return scheme == "http" and hasattr(os, "sendfile")


class ZeroCopy:
    """Zero-copy sends on one connection, one message at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Any, flow: FlowControl) -> None:
        self.loop = loop
        self.transport = transport
        self.flow = flow
        self._sending: _Sendfile | None = None

    def adopt(self, cycle: RequestResponseCycle) -> None:
        """Take this request's zero-copy messages; uvicorn sends the rest."""
        send = cycle.send

        async def zero_copy_send(message: Any) -> None:
            if message["type"] != ZERO_COPY:
                await send(message)
                return
            message[SENT] = 0
            await self._send(cycle, message)
            if not message.get("more_body", False):
                # uvicorn ends the response: its length check, keep-alive or close, pipelining.
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        cycle.send = zero_copy_send  # type: ignore[method-assign]

    def lost(self) -> None:
        """The connection is gone: stop what is being sent."""
        if self._sending is not None:
            self._sending.stop()

    async def _send(self, cycle: RequestResponseCycle, message: dict[str, Any]) -> None:
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{ZERO_COPY}' outside a response body.")
        if cycle.chunked_encoding:
            raise RuntimeError(f"'{ZERO_COPY}' needs a response with a Content-Length.")
        file = message["file"]
        fd: int = file if isinstance(file, int) else file.fileno()
        offset = message.get("offset")
        if offset is None:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        count = message.get("count")
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        if cycle.scope["method"] == "HEAD":
            count = 0
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        cycle.expected_content_length -= count
        if not count:
            return
        transport = self.transport
        if transport.get_write_buffer_size() and not cycle.disconnected:
            await self._drained()
        if cycle.disconnected or transport.is_closing():
            raise _gone()
        paused = transport.is_reading()
        if paused:
            transport.pause_reading()
        sending = _Sendfile(self.loop, os.dup(transport.get_extra_info("socket").fileno()), fd)
        self._sending = sending
        try:
            left = await sending.run(offset, count)
        except OSError as exc:
            # The client is gone (a reset, a broken pipe): the transport hears it here.
            transport.abort()
            raise _gone() from exc
        finally:
            # What went, counted call by call (a hop that failed on a reset sent its first
            # calls' bytes all the same): the audit line says it, not the count asked.
            message[SENT] = sending.sent
            self._sending = None
            sending.close()
            if paused and not transport.is_closing():
                transport.resume_reading()
        if left:
            raise _gone()  # stopped: the connection was lost (or aborted by the server)

    async def _drained(self) -> None:
        """Wait until the transport has handed all it buffered to the socket."""
        transport = self.transport
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)  # resume_writing at an empty buffer
        try:
            await self.flow.drain()
        finally:
            transport.set_write_buffer_limits(high=high, low=low)


class _Sendfile:
    """``count`` bytes of a file from ``offset`` to a socket (``out``: a descriptor of its own,
    closed by :meth:`close`), in worker-thread hops between waits for the socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: int, file: int) -> None:
        self.loop = loop
        self.out = out
        self.file = file
        self.stopped = False
        self.sent = 0  # bytes sent so far (by the hops' threads, one at a time)
        self._writable: asyncio.Future[None] | None = None
        self._hop: asyncio.Future[tuple[int, bool]] | None = None

    async def run(self, offset: int, count: int) -> int:
        """Send; how many bytes were left unsent when it was stopped (:attr:`sent` counts the
        bytes sent as they go). Raises ``OSError`` when the socket fails, ``EOFError`` when
        the file ends before ``count`` bytes."""
        while count and not self.stopped:
            self._hop = self.loop.run_in_executor(None, self._send, offset, count)
            # Shielded: a cancelled request must not close the descriptor under the thread.
            sent, blocked = await asyncio.shield(self._hop)
            self._hop = None
            offset += sent
            count -= sent
            if blocked and count and not self.stopped:
                await self._until_writable()
        return count

    def _send(self, offset: int, count: int) -> tuple[int, bool]:
        """In a worker thread: send until the socket's buffer is full (then ``blocked``), the
        hop's share is sent, or a stop; how many bytes went."""
        sent = 0
        share = min(count, _HOP_BYTES)
        while sent < share and not self.stopped:
            try:
                went = os.sendfile(
                    self.out, self.file, offset + sent, min(share - sent, _CALL_BYTES)
                )
            except BlockingIOError:
                return sent, True
            if not went:
                raise EOFError("the file ended before the bytes to send")
            sent += went
            self.sent += went
        return sent, False

    async def _until_writable(self) -> None:
        writable = self.loop.create_future()
        self._writable = writable
        self.loop.add_writer(self.out, _settle, writable)
        try:
            await writable
        finally:
            self.loop.remove_writer(self.out)
            self._writable = None

    def stop(self) -> None:
        """Send no more: a thread hop in progress ends after its current call."""
        self.stopped = True
        if self._writable is not None:
            _settle(self._writable)

    def close(self) -> None:
        """Close the descriptor, once no thread uses it any more."""
        self.stopped = True
        hop = self._hop
        if hop is not None and not hop.done():
            hop.add_done_callback(self._closed_after)
            return
        os.close(self.out)

    def _closed_after(self, hop: asyncio.Future[tuple[int, bool]]) -> None:
        """The hop of a cancelled send has ended: its failure is of no one's concern now."""
        if not hop.cancelled():
            hop.exception()
        os.close(self.out)


def _gone() -> ConnectionResetError:
    """What a zero-copy send raises on a lost connection (the ASGI spec's ``OSError`` for a
    send after a disconnect): the app stops sending, and its response counts as unfinished."""
    return ConnectionResetError("the client connection is gone")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
