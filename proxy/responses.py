"""Small raw-ASGI senders for the answers the gateway writes itself."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from starlette.types import Send

from proxy.access import Refusal
from proxy.headers import RawHeaders

BYPASS = (b"x-cache", b"BYPASS")
AGE_ZERO = (b"age", b"0")
#: On every answer the gateway makes itself (errors, token answers, refusals): never cached.
GATEWAY_MADE = [(b"cache-control", b"no-store"), BYPASS, AGE_ZERO]
#: The ASGI "Zero Copy Send" extension: its name in ``scope["extensions"]`` and its message
#: type (a file's bytes sent by the server, :mod:`proxy.zerocopy`).
ZERO_COPY = "http.response.zerocopysend"
#: The key of a zero-copy message in which its sender counts the bytes gone so far: the audit
#: line says what went when the client left (or the app stopped) in the middle of a large send.
SENT = "nbia_proxy.sent"


async def send_bytes(
    send: Send, status: int, body: bytes, headers: RawHeaders | None = None
) -> None:
    """Send a complete response with an exact Content-Length."""
    all_headers = list(headers or [])
    all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: RawHeaders | None = None
) -> None:
    """Send ``payload`` as a compact JSON document."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    all_headers = [(b"content-type", b"application/json")] + list(headers or [])
    await send_bytes(send, status, body, all_headers)


async def send_error(
    send: Send,
    status: int,
    message: str,
    upstream: str | None = None,
    retry_after: float | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Send the gateway's error shape: ``{"error": ..., "upstream": ...}``."""
    payload = {"error": message}
    if upstream is not None:
        payload["upstream"] = upstream
    headers = [*GATEWAY_MADE, *extra_headers]
    if retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, round(retry_after))))
    await send_json(send, status, payload, headers)


async def send_refusal(send: Send, refusal: Refusal) -> None:
    """Send the access policy's refusal (a 401 with its ``WWW-Authenticate`` challenge)."""
    challenge = [(b"www-authenticate", b'Bearer realm="nbia-proxy"')] if refusal.challenge else []
    # Rounded up: a client told to come back must not come back before the lockout ends.
    wait = None if refusal.retry_after is None else math.ceil(refusal.retry_after)
    await send_error(send, refusal.status, refusal.message, None, wait, challenge)
