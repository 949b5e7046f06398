"""The audit log: one structured line per request on the ``nbia_proxy.audit`` logger.

Fields: user, client address, method, path (never the query string, which a legacy token
request may carry a password in), status, cache result, body bytes, duration. Never a token,
key or password.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import Message, Send

audit_log = logging.getLogger("nbia_proxy.audit")


def enabled() -> bool:
    """Cheap check, so that the hit paths skip building lines nobody will see."""
    return audit_log.isEnabledFor(logging.INFO)


def record(
    *,
    user: str,
    client: str,
    method: str,
    path: str,
    status: int,
    cache: str,
    size: int,
    started: float,
) -> None:
    """Write one audit line (``started`` is a ``time.perf_counter()`` reading)."""
    audit_log.info(
        json.dumps(
            {
                "user": user,
                "client": client,
                "method": method,
                "path": path,
                "status": status,
                "cache": cache,
                "bytes": size,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
            separators=(",", ":"),
        )
    )


class Progress:
    """What has been sent of one answer so far: for its audit line, and so that an error
    after the answer has started is not answered a second time."""

    __slots__ = ("cache", "size", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.cache = "-"
        self.size = 0

    def watch(self, send: Send) -> Send:
        """``send``, noting in this progress what passes through it."""

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started = True
                self.status = message["status"]
                for name, value in message["headers"]:
                    if name == b"x-cache":
                        self.cache = value.decode("latin-1")
            else:
                self.size += len(message.get("body", b""))
            await send(message)

        return tracked
