"""Answering a cacheable request: from the cache when fresh, else from the upstream, then stored.

Every answer says where it came from: ``X-Cache: HIT`` with the entry's ``Age``, or ``MISS``
with ``Age: 0`` (``BYPASS`` for an answer too large to store). A client's ``Cache-Control:
no-cache`` skips the stored answer and replaces it. What may be stored, and whether concurrent
requests may share one upstream request, follows the request's :class:`~proxy.cache.shape.Fit`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import httpx
from starlette.types import Receive, Send

from proxy.cache.answer import STALE, send_stored, stored_answer
from proxy.cache.decision import Action, Decision, decide, freshness
from proxy.cache.policy import CacheKey, lifetime, make_key, origin, pairs, ttl_for
from proxy.cache.policy import wants_fresh as wants_fresh_answer
from proxy.cache.shape import Fit, head_size, storable
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.endpoints import Endpoint, TokenUse
from proxy.errors import GatewayError
from proxy.forwarding import (
    Forwarding,
    OutgoingRequest,
    UpstreamResponse,
    offline_miss,
    within,
)
from proxy.headers import RawHeaders, find, for_client, for_upstream
from proxy.hit_memo import HitMemo
from proxy.responses import AGE_ZERO, send_bytes
from proxy.shield.policy import UNHEALTHY_STATUSES, ShieldPolicy
from proxy.streaming import Overflow, read_bounded, relay_stream, uncached_marks
from proxy.upstream import Upstream

MISS = (b"x-cache", b"MISS")


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
    target = upstream.target_for(request.raw_path, request.query)
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


class CachedAnswers:
    """Answers cacheable requests: from the store, or fetched (coalesced, shielded) and stored.

    ``memo`` remembers which raw request lines have which key, so that a repeat is answered
    from memory before anything is parsed (:mod:`proxy.hit_memo`).
    """

    def __init__(
        self,
        cache: TieredCache,
        policy: CachePolicy,
        shield: ShieldPolicy,
        forwarding: Forwarding,
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.shield = shield
        self.forwarding = forwarding
        self.memo = HitMemo(cache)

    async def serve(
        self,
        upstream: Upstream,
        endpoint: Endpoint,
        request: OutgoingRequest,
        key: CacheKey,
        fit: Fit,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer a cacheable request as :func:`~proxy.cache.decision.decide` says: from the
        store, or from the upstream (once for all identical ``EXACT`` waiters), storing what
        ``fit`` allows. When the upstream then cannot answer (transport error, time-out, 5xx,
        429, open circuit), a stored copy the decision allows is served instead, marked
        ``X-Cache: STALE``.
        """
        cache = self.cache
        entry = await cache.lookup(key.digest)
        headers = request.headers
        wants_fresh = wants_fresh_answer(find(headers, b"cache-control"), find(headers, b"pragma"))
        decision = self._decide(entry, wants_fresh, fit, upstream)
        action = decision.action
        if action is Action.REFUSE:
            raise offline_miss(upstream.name)
        if action is Action.SERVE:
            assert entry is not None  # decide() serves only what is stored
            await send_stored(send, stored_answer(cache, entry))
            return
        fetch = _Fetch(
            cache, self.policy, self.forwarding, upstream, endpoint, request, key, fit, wants_fresh
        )
        if action in _STALE_ANSWERS:
            assert entry is not None
            if action is Action.SERVE_STALE_AND_REVALIDATE:
                fetch.handoff.wanted = False  # a background refresh relays nothing to anyone
                self.shield.coalescer.start(key.digest, fetch.run)
            await self._send_stale(entry, send)
            return
        cache.count(endpoint.path, hit=False)
        try:
            await self._fetch_and_answer(fetch, decision, entry, receive, send)
        finally:
            fetch.handoff.wanted = False
            if fetch.handoff.overflow is not None:
                # Obtained but never relayed: free the upstream connection.
                await fetch.handoff.overflow.aclose()

    def _decide(
        self, entry: Entry | None, wants_fresh: bool, fit: Fit, upstream: Upstream
    ) -> Decision:
        """The request's, the stored entry's and the upstream's state, given to decide()."""
        stored = freshness(
            status=None if entry is None else entry.status,
            expires_at=0.0 if entry is None else entry.expires_at,
            now=self.cache.clock(),
            revalidate_seconds=self.shield.revalidate_seconds,
            max_stale_seconds=self.shield.max_stale_seconds,
        )
        return decide(
            stored,
            stored_ok=entry is not None and entry.status == 200,
            wants_fresh=wants_fresh,
            offline=self.forwarding.offline,
            # Only a request the key describes exactly may speak for others: anything else (a
            # head near the limit, fields in a POST's query) would hand its error to every waiter.
            shared=fit is Fit.EXACT,
            circuit_open=upstream.breaker.refusing,
        )

    async def _fetch_and_answer(
        self,
        fetch: _Fetch,
        decision: Decision,
        entry: Entry | None,
        receive: Receive,
        send: Send,
    ) -> None:
        """Fetch within the request deadline (coalesced when the decision says so) and answer:
        the fetched answer, or the stored copy when the upstream failed and one may stand in."""
        upstream = fetch.upstream
        stand_in = entry if decision.stale_on_failure else None
        deadline = self.forwarding.deadline()
        try:
            async with within(deadline, upstream.name):
                if decision.action is Action.FETCH_COALESCED:
                    flight = await self.shield.coalescer.run(
                        fetch.key.digest, fetch.run, fetch.recall, fetch.stored
                    )
                else:
                    flight = await fetch.run()
        except GatewayError:
            if stand_in is None:
                raise
            await self._send_stale(stand_in, send)
            return
        if isinstance(flight, TooLarge):
            overflow, fetch.handoff.overflow = fetch.handoff.overflow, None
            await _relay_too_large(overflow, deadline, fetch, receive, send)
        elif stand_in is not None and flight.status in UNHEALTHY_STATUSES:
            await self._send_stale(stand_in, send)
        else:
            await send_bytes(send, flight.status, flight.body, [*flight.headers, MISS, AGE_ZERO])

    async def _send_stale(self, entry: Entry, send: Send) -> None:
        self.shield.counters.stale_served += 1
        await send_stored(send, stored_answer(self.cache, entry, STALE))


_STALE_ANSWERS = frozenset({Action.SERVE_STALE, Action.SERVE_STALE_AND_REVALIDATE})


class _Fetch:
    """One upstream request for a cacheable key: read whole, stored if ``fit`` allows, shared
    by the flight's waiters (an answer too large to share goes to its own request only)."""

    def __init__(
        self,
        cache: TieredCache,
        policy: CachePolicy,
        forwarding: Forwarding,
        upstream: Upstream,
        endpoint: Endpoint,
        request: OutgoingRequest,
        key: CacheKey,
        fit: Fit,
        wants_fresh: bool,
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.forwarding = forwarding
        self.upstream = upstream
        self.endpoint = endpoint
        self.request = request
        self.key = key
        self.fit = fit
        self.wants_fresh = wants_fresh
        self.handoff = _Handoff()
        self.kept = False  # the answer was stored

    async def recall(self) -> Flight | None:
        """The fresh answer another process fetched and stored for this key, if any."""
        entry = await self.cache.lookup(self.key.digest)
        if entry is None or entry.expires_at <= self.cache.clock():
            return None
        return Answer(entry.status, entry.headers, entry.body)

    def stored(self) -> bool:
        """Whether :meth:`run` stored its answer (other processes may then read it)."""
        return self.kept

    async def run(self) -> Flight:
        """Fetch, store, and return what every waiter receives."""
        cache, key = self.cache, self.key
        # A flight that just finished may have stored the answer while this request was still
        # looking it up: use it rather than start a second upstream request.
        stored = cache.from_memory(key.digest)
        if stored is not None and not self.wants_fresh and stored.expires_at > cache.clock():
            return Answer(stored.status, stored.headers, stored.body)
        # Stored bodies must suit every client: ask the upstream for them unencoded.
        plain = replace(
            self.request,
            headers=[h for h in self.request.headers if h[0] != b"accept-encoding"]
            + [(b"accept-encoding", b"identity")],
        )
        response = await self.forwarding.open(self.upstream, plain, self.endpoint.token, read=True)
        sent_head = _sent_head_size(response)
        body = await read_bounded(response, self.upstream.name, self.policy.max_body_bytes)
        if isinstance(body, Overflow):
            # Sharing it would mean holding it whole. The request whose fetch this is relays
            # the open answer as it arrives; the flight's other waiters each ask on their own
            # (streamed too): one extra upstream request per concurrent waiter, and only for
            # answers past the limit, against memory that grows with the answer for everyone.
            if self.handoff.wanted:
                self.handoff.overflow = body
            else:
                await body.aclose()  # that request is gone (client left, deadline)
            return TOO_LARGE
        answer = Answer(response.status_code, for_client(response.headers.raw), body)
        if storable(answer.status, self.fit, sent_head):
            self.kept = _store(cache, self.policy, self.endpoint, key, answer)
        return answer


async def _relay_too_large(
    overflow: Overflow | None, deadline: float, fetch: _Fetch, receive: Receive, send: Send
) -> None:
    """Relay an answer past ``max_body_bytes`` as it arrives: the flight's own (``overflow``,
    for the request whose fetch obtained it) or, for a waiter, one it asks for itself (within
    the same request ``deadline``)."""
    upstream = fetch.upstream
    if overflow is not None:
        response = overflow.response
    else:
        async with within(deadline, upstream.name):
            response = await fetch.forwarding.open(
                upstream, fetch.request, fetch.endpoint.token, read=True
            )
    await relay_stream(response, upstream.name, receive, send, uncached_marks(response), overflow)


def _store(
    cache: TieredCache, policy: CachePolicy, endpoint: Endpoint, key: CacheKey, answer: Answer
) -> bool:
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
    return seconds is not None
