"""Sending one client request upstream: same method, path, query and body, plus the service token.

Every client request that needs the upstream, cacheable or not, text or binary, goes through
:meth:`Forwarding.open`: the one offline rule, then the shield (breaker, limiter, retries for
reads: :func:`open_shielded`), then :func:`open_upstream`. Callers bound the wait with the one
request deadline (:func:`within`). The response comes back with its body still unread, so the
caller decides whether to buffer it (metadata) or stream it (binaries). Transport failures
become :class:`~proxy.errors.UpstreamError` subclasses naming the host and the cause; a request
httpx refuses to send is the client's 400. A 401 to a token-bearing request renews the token
once and retries once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from proxy import rawhttp
from proxy.endpoints import TokenUse
from proxy.errors import ClientError, UpstreamError, UpstreamTimeout, transport_error
from proxy.headers import RawHeaders, for_upstream
from proxy.metrics import error_kind, status_class
from proxy.shield.breaker import (
    counts_against_upstream,
    is_connection_failure,
    is_failure_status,
    is_slow,
)
from proxy.shield.retry import (
    OVERLOAD_STATUSES,
    RetryPolicy,
    backoff_seconds,
    retry_after_seconds,
)
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
    replayable: bool = False,
) -> UpstreamResponse:
    """Send ``request`` upstream and return the response with an unread body.

    ``bulk`` sends GET and POST requests through :mod:`proxy.rawhttp`, the fast path for
    large binary bodies; everything else goes through the upstream's httpx pool.
    ``replayable`` requests (reads) are sent once more when a pooled connection breaks
    before any answer arrives.
    """
    wants_token = token_use is TokenUse.REQUIRED or (token_use is TokenUse.OPTIONAL and token_on_v4)
    bulk = bulk and request.method in ("GET", "POST")
    token = await upstream.token.get() if wants_token else None
    response = await _send(upstream, request, token, bulk, replayable)
    if response.status_code == 401 and token is not None:
        await response.aclose()
        log.info("upstream %s rejected the service token; renewing once", upstream.name)
        token = await upstream.token.renew_after_rejection(token)
        response = await _send(upstream, request, token, bulk, replayable)
    return response


#: A pooled connection that breaks before the response head: typically a kept-alive connection
#: the upstream closed at the moment it was reused (the keep-alive race every proxy meets).
_BROKEN_BEFORE_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


async def _send(
    upstream: Upstream,
    request: OutgoingRequest,
    token: str | None,
    bulk: bool,
    replayable: bool,
) -> UpstreamResponse:
    headers = for_upstream(request.headers)
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    url = upstream.url_for(request.raw_path, request.query)
    try:
        if bulk:
            return await upstream.raw.send(
                url,
                request.method,
                headers,
                request.body,
                connect_timeout=upstream.timeout.connect or 10.0,
                read_timeout=upstream.timeout.read or 120.0,
            )
        outgoing = httpx.Request(request.method, url, headers=headers, content=request.body)
        try:
            return await upstream.client.send(outgoing, stream=True)
        except _BROKEN_BEFORE_ANSWER as exc:
            if not replayable:
                raise
            log.info(
                "upstream %s closed the connection before answering (%s); sending once more",
                upstream.name,
                type(exc).__name__,
            )
            return await upstream.client.send(outgoing, stream=True)
    except httpx.InvalidURL as exc:
        raise ClientError("malformed request path") from exc
    except httpx.LocalProtocolError as exc:
        # httpx would not write this request (h11's message quotes the offending bytes, which
        # may be a secret, so it is not repeated): the client's request, not the upstream.
        raise ClientError("the request cannot be forwarded: it is not valid HTTP") from exc
    except httpx.TransportError as exc:
        raise transport_error(exc, upstream.name) from exc


async def open_shielded(
    upstream: Upstream,
    request: OutgoingRequest,
    token_use: TokenUse,
    token_on_v4: bool,
    *,
    bulk: bool = False,
    retry: RetryPolicy | None = None,
) -> UpstreamResponse:
    """:func:`open_upstream` behind the upstream's breaker and limiter, with retries for reads.

    ``retry`` is None for requests that must not be repeated (side effects); the others are
    also sent once more when a kept-alive connection breaks before answering. The breaker hears
    one verdict per client request, however often it was retried, and only evidence that the
    upstream is unwell counts (:func:`~proxy.shield.breaker.counts_against_upstream`); a header that
    cannot be forwarded is the client's 400 before the breaker or the limiter see the request.
    A 429/503 with ``Retry-After`` pauses every upstream request of the gateway for that long.
    """
    for_upstream(request.headers)
    slow = is_slow(request.raw_path)
    breaker = upstream.breaker
    breaker.before()
    try:
        response = await _with_retries(upstream, request, token_use, token_on_v4, bulk, retry)
    except UpstreamError as exc:
        if counts_against_upstream(exc, slow=slow):
            breaker.failure(exc.message, unreachable=is_connection_failure(exc))
        else:
            breaker.abandon()
        raise
    except BaseException:
        # Refused by the queue, cancelled by the deadline, or the client's fault: no verdict
        # on the upstream, but a probe in flight must not stay "in flight" for ever.
        breaker.abandon()
        raise
    if is_failure_status(response.status_code, slow=slow):
        breaker.failure(f"answered {response.status_code}")
    else:
        breaker.success()
    return response


async def _with_retries(
    upstream: Upstream,
    request: OutgoingRequest,
    token_use: TokenUse,
    token_on_v4: bool,
    bulk: bool,
    retry: RetryPolicy | None,
) -> UpstreamResponse:
    """Send, and send a read again after 429/503 within the retry budget."""
    counters = upstream.limiter.counters
    started = time.monotonic()
    attempt = 0
    while True:
        async with upstream.limiter.slot():
            sent = time.perf_counter()
            try:
                response = await open_upstream(
                    upstream,
                    request,
                    token_use,
                    token_on_v4,
                    bulk=bulk,
                    replayable=retry is not None,
                )
            except UpstreamError as exc:
                counters.tally.upstream(upstream.name, "error", time.perf_counter() - sent)
                counters.tally.upstream_error(upstream.name, error_kind(exc))
                raise
        status = response.status_code
        counters.tally.upstream(upstream.name, status_class(status), time.perf_counter() - sent)
        if status not in OVERLOAD_STATUSES:
            upstream.limiter.succeeded()
            return response
        upstream.limiter.overloaded()
        if status == 429:
            counters.upstream_429 += 1
        else:
            counters.upstream_503 += 1
        told = retry_after_seconds(response.headers.get("retry-after"))
        if told is not None:
            # Never let one answer stop the gateway for longer than a retry could wait.
            told = min(told, retry.budget_seconds if retry else 5.0)
            upstream.limiter.pause(told)
            counters.tally.paused(upstream.name, told)
        delay = told if told is not None else backoff_seconds(attempt)
        spent = time.monotonic() - started
        if (
            retry is None
            or attempt >= retry.max_attempts
            or spent + delay > retry.budget_seconds
            # Opened meanwhile (or this request is the half-open probe): stop pressing.
            or upstream.breaker.is_open
        ):
            return response
        await response.aclose()
        attempt += 1
        counters.retries += 1
        log.info(
            "upstream %s answered %d; retry %d in %.1f s", upstream.name, status, attempt, delay
        )
        if told is None:
            await asyncio.sleep(delay)  # with Retry-After, the limiter's pause does the waiting


@dataclass(frozen=True, slots=True)
class Forwarding:
    """The rules every client request that goes upstream follows, cacheable or not: the one
    offline rule, the one deadline, and retries for reads only."""

    offline: bool
    deadline_seconds: float
    token_on_v4: bool
    retry: RetryPolicy

    def deadline(self) -> float:
        """When a request starting now must have its answer, on the event loop's clock."""
        return asyncio.get_running_loop().time() + self.deadline_seconds

    async def open(
        self,
        upstream: Upstream,
        request: OutgoingRequest,
        token_use: TokenUse,
        *,
        read: bool,
        bulk: bool = False,
    ) -> UpstreamResponse:
        """The one way a client's request reaches the upstream: refused offline, then sent
        behind the shield (:func:`open_shielded`), retried after 429/503 only when ``read``."""
        if self.offline:
            raise offline_miss(upstream.name)
        retry = self.retry if read else None
        return await open_shielded(
            upstream, request, token_use, self.token_on_v4, bulk=bulk, retry=retry
        )


def offline_miss(upstream: str) -> UpstreamTimeout:
    """The error for a request that would need the upstream while the gateway is offline."""
    return UpstreamTimeout("offline and not cached", upstream=upstream)


@asynccontextmanager
async def within(deadline: float, upstream: str) -> AsyncIterator[None]:
    """Bound the body of the ``async with`` by the request ``deadline`` (event loop clock):
    past it, the client gets 504."""
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError as exc:
        raise UpstreamTimeout("no answer within the request deadline", upstream=upstream) from exc
