"""Sending one client request upstream: same method, path, query and body, plus the service token.

:func:`open_upstream` returns the upstream response with its body still unread, so the caller
decides whether to buffer it (metadata) or stream it (binaries). Transport failures become
:class:`~proxy.errors.UpstreamError` subclasses; a 401 to a token-bearing request renews the
token once and retries once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from proxy import rawhttp
from proxy.endpoints import TokenUse
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.headers import RawHeaders, for_upstream
from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.forward")

#: Either client's response; both offer status_code, headers, aiter_raw() and aclose().
UpstreamResponse = httpx.Response | rawhttp.RawResponse


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A client request as it will be sent upstream (path is below the upstream's mount)."""

    method: str
    raw_path: bytes
    query: bytes
    headers: RawHeaders
    body: bytes


async def open_upstream(
    upstream: Upstream,
    request: OutgoingRequest,
    token_use: TokenUse,
    token_on_v4: bool,
    *,
    bulk: bool = False,
) -> UpstreamResponse:
    """Send ``request`` upstream and return the response with an unread body.

    ``bulk`` sends GET and POST requests through :mod:`proxy.rawhttp`, the fast path for
    large binary bodies; everything else goes through the upstream's httpx pool.
    """
    wants_token = token_use is TokenUse.REQUIRED or (token_use is TokenUse.OPTIONAL and token_on_v4)
    bulk = bulk and request.method in ("GET", "POST")
    token = await upstream.token.get() if wants_token else None
    response = await _send(upstream, request, token, bulk)
    if response.status_code == 401 and token is not None:
        await response.aclose()
        log.info("upstream %s rejected the service token; renewing once", upstream.name)
        token = await upstream.token.renew_after_rejection(token)
        response = await _send(upstream, request, token, bulk)
    return response


async def _send(
    upstream: Upstream, request: OutgoingRequest, token: str | None, bulk: bool
) -> UpstreamResponse:
    headers = for_upstream(request.headers)
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    url = upstream.url_for(request.raw_path, request.query)
    try:
        if bulk:
            return await rawhttp.send(
                url,
                request.method,
                headers,
                request.body,
                connect_timeout=upstream.timeout.connect or 10.0,
                read_timeout=upstream.timeout.read or 120.0,
            )
        outgoing = httpx.Request(request.method, url, headers=headers, content=request.body)
        return await upstream.client.send(outgoing, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("upstream timed out", upstream=upstream.name) from exc
    except httpx.TransportError as exc:
        raise UpstreamUnreachable(
            f"upstream unreachable ({type(exc).__name__})", upstream=upstream.name
        ) from exc


def translate(exc: httpx.HTTPError, upstream: str) -> UpstreamError:
    """Map an httpx error raised while reading a body to the gateway's error type."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("upstream timed out while sending the body", upstream=upstream)
    return UpstreamUnreachable(
        f"upstream broke off the response ({type(exc).__name__})", upstream=upstream
    )
