"""Stand-in asyncio transports for driving the gateway's protocol without a socket.

:class:`proxy.hit_protocol.HitProtocol` is fed bytes with ``data_received`` and writes its
answers to the transport: the tests read what it wrote (:class:`RecordingTransport`), the
benchmark ``bench.hit_cost`` only counts it (:class:`CountingTransport`, the least work a write).
"""

from __future__ import annotations

from typing import Any


class CountingTransport:
    """Just enough of an asyncio transport for the protocol: it counts what is written."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.written = 0
        self.closed = False
        self._peer = peer

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self._peer, 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass


class RecordingTransport(CountingTransport):
    """A transport that keeps what the protocol writes, in ``out``."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__(peer)
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data
