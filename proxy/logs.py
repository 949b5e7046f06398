"""Logging set-up: one line per event, and no tracebacks for transfers aborted on purpose."""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import StreamBroken


class _DropAbortTracebacks(logging.Filter):
    """uvicorn logs any exception that ends an ASGI call with a traceback.

    A :class:`StreamBroken` is how the gateway makes the server abort a client transfer after an
    upstream failure; it was already logged in one line, so the traceback is noise. So is a
    ``CancelledError``: requests are only cancelled at shutdown, which logs its own line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamBroken | asyncio.CancelledError)


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr at ``level``."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("uvicorn.error").addFilter(_DropAbortTracebacks())
    # httpx logs every request URL at INFO; the gateway logs its own lines instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
