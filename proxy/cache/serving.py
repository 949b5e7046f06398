"""Answering a cacheable request: from the cache when fresh, else from the upstream, then stored.

Every answer says where it came from: ``X-Cache: HIT`` with the entry's ``Age``, or ``MISS``
with ``Age: 0`` (``BYPASS`` for an answer too large to store). A client's ``Cache-Control:
no-cache`` skips the stored answer and replaces it. What may be stored, and whether concurrent
requests may share one upstream request, follows the request's :class:`~proxy.cache.shape.Fit`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import httpx
from starlette.types import Receive, Send

from proxy.cache.policy import CacheKey, lifetime, make_key, origin, pairs, ttl_for, wants_fresh
from proxy.cache.shape import Fit, head_size, storable
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.endpoints import Endpoint, TokenUse
from proxy.errors import GatewayError, UpstreamTimeout
from proxy.forwarding import OutgoingRequest, UpstreamResponse, open_shielded
from proxy.headers import RawHeaders, find, for_client, for_upstream
from proxy.responses import AGE_ZERO, send_bytes
from proxy.shield.policy import UNHEALTHY_STATUSES, ShieldPolicy
from proxy.streaming import Overflow, read_bounded, relay_stream, uncached_marks
from proxy.upstream import Upstream

HIT = (b"x-cache", b"HIT")
MISS = (b"x-cache", b"MISS")
STALE = (b"x-cache", b"STALE")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Lifetimes (user TTL patterns before the defaults, the negative TTL) and the body bound."""

    ttl_overrides: tuple[tuple[str, float], ...]
    negative_ttl_seconds: float
    token_on_v4: bool
    max_body_bytes: int  # larger answers are relayed as they arrive, never held or stored


def cache_key(
    upstream: Upstream, endpoint: Endpoint, request: OutgoingRequest, token_on_v4: bool
) -> CacheKey:
    """The request's key: the query always, the body as a form on POST (GET bodies are refused).

    Call it only for a request :func:`proxy.cache.shape.classify` found ``CACHED`` or better.
    """
    uses_token = endpoint.token is TokenUse.REQUIRED or (
        endpoint.token is TokenUse.OPTIONAL and token_on_v4
    )
    # Whose view the answer is: the service account's when its token is sent, else anonymous.
    identity = f"account:{upstream.token.username}" if uses_token else "anonymous"
    form = pairs(request.body) if request.method == "POST" else []
    return make_key(
        key_origin(upstream),
        upstream.name,
        identity,
        request.method,
        endpoint,
        pairs(request.query),
        form,
    )


def key_origin(upstream: Upstream) -> str:
    """The upstream's base URL as it goes into keys."""
    url = upstream.base_url
    return origin(url.scheme, url.netloc.decode("ascii"), url.path)


def forwarded_head_size(upstream: Upstream, request: OutgoingRequest) -> int:
    """The size of the request head as it will be forwarded, the service token aside."""
    target = upstream.url_for(request.raw_path, request.query).raw_path
    headers = [*for_upstream(request.headers), (b"host", upstream.base_url.netloc)]
    if request.body or request.method == "POST":
        headers.append((b"content-length", b"%d" % len(request.body)))
    return head_size(request.method, target, headers)


def _sent_head_size(response: UpstreamResponse) -> int | None:
    """The size of the request head the upstream received (token included), if known."""
    if not isinstance(response, httpx.Response):
        return None
    sent = response.request
    return head_size(sent.method, sent.url.raw_path, sent.headers.raw)


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer read whole: what every coalesced waiter receives."""

    status: int
    headers: RawHeaders
    body: bytes


class TooLarge:
    """A flight's answer was over ``max_body_bytes``: neither shared nor stored."""


TOO_LARGE = TooLarge()
Flight = Answer | TooLarge


@dataclass(slots=True)
class _Handoff:
    """An answer too large to share, kept open for the request whose fetch obtained it."""

    wanted: bool = True  # that request still waits for it (False: the flight closes it)
    overflow: Overflow | None = None


async def serve_cacheable(
    cache: TieredCache,
    policy: CachePolicy,
    shield: ShieldPolicy,
    upstream: Upstream,
    endpoint: Endpoint,
    request: OutgoingRequest,
    key: CacheKey,
    fit: Fit,
    receive: Receive,
    send: Send,
) -> None:
    """Answer from the cache if fresh; else fetch (once for all identical ``EXACT`` waiters),
    and store what ``fit`` allows.

    When the upstream cannot answer (transport error, time-out, 5xx, 429, open circuit) an
    expired entry within ``max_stale_seconds`` is served instead, marked ``X-Cache: STALE``.
    """
    headers = request.headers
    entry = await cache.lookup(key.digest)
    fresh_wanted = wants_fresh(find(headers, b"cache-control"), find(headers, b"pragma"))
    if entry is not None and not fresh_wanted and entry.expires_at > cache.clock():
        await send_hit(cache, entry, send)
        return
    if shield.offline:
        if entry is None:
            raise UpstreamTimeout("offline and not cached", upstream=upstream.name)
        await send_stale(cache, entry, send, shield)
        return

    # Stored bodies must suit every client: ask the upstream for them unencoded.
    plain = replace(
        request,
        headers=[h for h in request.headers if h[0] != b"accept-encoding"]
        + [(b"accept-encoding", b"identity")],
    )
    handoff = _Handoff()

    async def fetch() -> Flight:
        # A flight that just finished may have stored the answer while this request was still
        # looking it up: use it rather than start a second upstream request.
        stored = cache.from_memory(key.digest)
        if stored is not None and not fresh_wanted and stored.expires_at > cache.clock():
            return Answer(stored.status, stored.headers, stored.body)
        response = await open_shielded(
            upstream, plain, endpoint.token, policy.token_on_v4, retry=shield.retry
        )
        sent_head = _sent_head_size(response)
        body = await read_bounded(response, upstream.name, policy.max_body_bytes)
        if isinstance(body, Overflow):
            # Sharing it would mean holding it whole. The request whose fetch this is relays
            # the open answer as it arrives; the flight's other waiters each ask on their own
            # (streamed too): one extra upstream request per concurrent waiter, and only for
            # answers past the limit, against memory that grows with the answer for everyone.
            if handoff.wanted:
                handoff.overflow = body
            else:
                await body.aclose()  # that request is gone (client left, deadline)
            return TOO_LARGE
        answer = Answer(response.status_code, for_client(response.headers.raw), body)
        if storable(answer.status, fit, sent_head):
            _store(cache, policy, endpoint, key, answer)
        return answer

    # Only a request the key describes exactly may speak for others: anything else (a head near
    # the limit, fields in a POST's query) would hand its own error to every waiter.
    shared = fit is Fit.EXACT
    deadline = asyncio.get_running_loop().time() + shield.deadline_seconds
    try:
        if (
            shared
            and entry is not None
            and not fresh_wanted
            and entry.status == 200
            and cache.clock() - entry.expires_at < shield.revalidate_seconds
        ):
            # Just expired: answer with it now and refresh it in the background, once per key.
            handoff.wanted = False
            shield.coalescer.start(key.digest, fetch)
            await send_stale(cache, entry, send, shield)
            return
        cache.count(endpoint.path, hit=False)
        try:
            async with asyncio.timeout_at(deadline):
                flight = await (shield.coalescer.run(key.digest, fetch) if shared else fetch())
        except (GatewayError, TimeoutError) as exc:
            stale = _stale_copy(cache, entry, shield)
            if stale is not None:
                await send_stale(cache, stale, send, shield)
                return
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    "no answer within the request deadline", upstream=upstream.name
                ) from exc
            raise
        if isinstance(flight, TooLarge):
            overflow, handoff.overflow = handoff.overflow, None
            await _relay_too_large(
                overflow, deadline, policy, shield, upstream, endpoint, request, receive, send
            )
            return
        answer = flight
        stale = _stale_copy(cache, entry, shield) if answer.status in UNHEALTHY_STATUSES else None
        if stale is not None:
            await send_stale(cache, stale, send, shield)
            return
        await send_bytes(send, answer.status, answer.body, [*answer.headers, MISS, AGE_ZERO])
    finally:
        handoff.wanted = False
        if handoff.overflow is not None:
            await handoff.overflow.aclose()  # obtained but never relayed: free the upstream


async def _relay_too_large(
    overflow: Overflow | None,
    deadline: float,
    policy: CachePolicy,
    shield: ShieldPolicy,
    upstream: Upstream,
    endpoint: Endpoint,
    request: OutgoingRequest,
    receive: Receive,
    send: Send,
) -> None:
    """Relay an answer past ``max_body_bytes`` as it arrives: the flight's own (``overflow``,
    for the request whose fetch obtained it) or, for a waiter, one it asks for itself (within
    the same request ``deadline``, on the event loop's clock)."""
    if overflow is not None:
        response = overflow.response
    else:
        try:
            async with asyncio.timeout_at(deadline):
                response = await open_shielded(
                    upstream, request, endpoint.token, policy.token_on_v4, retry=shield.retry
                )
        except TimeoutError as exc:
            message = "no answer within the request deadline"
            raise UpstreamTimeout(message, upstream=upstream.name) from exc
    await relay_stream(response, upstream.name, receive, send, uncached_marks(response), overflow)


def _store(
    cache: TieredCache, policy: CachePolicy, endpoint: Endpoint, key: CacheKey, answer: Answer
) -> None:
    seconds = lifetime(
        answer.status, ttl_for(endpoint, policy.ttl_overrides), policy.negative_ttl_seconds
    )
    if seconds is not None:
        # Stored before any client sees the answer, so the next request is already a hit.
        now = cache.clock()
        entry = Entry(
            key.digest,
            endpoint.path,
            answer.status,
            answer.headers,
            answer.body,
            now,
            now + seconds,
        )
        cache.store_entry(key, entry)


def _stale_copy(cache: TieredCache, entry: Entry | None, shield: ShieldPolicy) -> Entry | None:
    """``entry`` if it may stand in for a failed upstream answer, else None."""
    if (
        entry is not None
        and entry.status == 200
        and cache.clock() - entry.expires_at <= shield.max_stale_seconds
    ):
        return entry
    return None


async def send_stale(cache: TieredCache, entry: Entry, send: Send, shield: ShieldPolicy) -> None:
    """Send an expired entry because the upstream could not answer."""
    shield.counters.stale_served += 1
    age = max(0, int(cache.clock() - entry.created_at))
    headers = [*entry.wire_headers, STALE, (b"age", b"%d" % age)]
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    await send({"type": "http.response.body", "body": entry.body})


async def send_hit(cache: TieredCache, entry: Entry, send: Send) -> None:
    """Send a stored answer with its age."""
    age = max(0, int(cache.clock() - entry.created_at))
    headers = [*entry.wire_headers, HIT, (b"age", b"%d" % age)]
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    await send({"type": "http.response.body", "body": entry.body})
    cache.count(entry.endpoint, hit=True)
    cache.served(entry.digest)
