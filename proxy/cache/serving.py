"""Answering a cacheable request: from the cache when fresh, else from the upstream, then stored.

Every answer says where it came from: ``X-Cache: HIT`` with the entry's ``Age``, or ``MISS``
with ``Age: 0``. A client's ``Cache-Control: no-cache`` skips the stored answer and replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Send

from proxy.cache.policy import CacheKey, lifetime, make_key, parameters, ttl_for, wants_fresh
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.endpoints import Endpoint, TokenUse
from proxy.forwarding import OutgoingRequest, open_upstream
from proxy.headers import find, for_client
from proxy.responses import send_bytes
from proxy.streaming import read_whole
from proxy.upstream import Upstream

HIT = (b"x-cache", b"HIT")
MISS = (b"x-cache", b"MISS")
BYPASS = (b"x-cache", b"BYPASS")
AGE_ZERO = (b"age", b"0")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Lifetimes: user TTL patterns (before the defaults) and the negative TTL."""

    ttl_overrides: tuple[tuple[str, float], ...]
    negative_ttl_seconds: float
    token_on_v4: bool


def cache_key(
    upstream: Upstream, endpoint: Endpoint, request: OutgoingRequest, token_on_v4: bool
) -> CacheKey | None:
    """The request's key, or None when it cannot be cached (e.g. a non-form POST body)."""
    try:
        pairs = parameters(request.query, request.body, find(request.headers, b"content-type"))
    except ValueError:
        return None
    uses_token = endpoint.token is TokenUse.REQUIRED or (
        endpoint.token is TokenUse.OPTIONAL and token_on_v4
    )
    # Whose view the answer is: the service account's when its token is sent, else anonymous.
    identity = f"account:{upstream.token.username}" if uses_token else "anonymous"
    return make_key(upstream.name, identity, request.method, endpoint, pairs)


async def serve_cacheable(
    cache: TieredCache,
    policy: CachePolicy,
    upstream: Upstream,
    endpoint: Endpoint,
    request: OutgoingRequest,
    key: CacheKey,
    send: Send,
) -> None:
    """Answer from the cache if a fresh entry exists, else fetch, answer and store."""
    headers = request.headers
    if not wants_fresh(find(headers, b"cache-control"), find(headers, b"pragma")):
        entry = await cache.lookup(key.digest)
        if entry is not None and entry.expires_at > cache.clock():
            await send_hit(cache, entry, send)
            return
    cache.count(endpoint.path, hit=False)
    response = await open_upstream(upstream, request, endpoint.token, policy.token_on_v4)
    body = await read_whole(response, upstream.name)
    kept = for_client(response.headers.raw)
    seconds = lifetime(
        response.status_code,
        ttl_for(endpoint, policy.ttl_overrides),
        policy.negative_ttl_seconds,
    )
    if seconds is not None:
        # Stored before the client sees the answer, so its next request is already a hit.
        now = cache.clock()
        entry = Entry(
            key.digest, endpoint.path, response.status_code, kept, body, now, now + seconds
        )
        cache.store_entry(key, entry)
    await send_bytes(send, response.status_code, body, [*kept, MISS, AGE_ZERO])


async def send_hit(cache: TieredCache, entry: Entry, send: Send) -> None:
    """Send a stored answer with its age."""
    age = max(0, int(cache.clock() - entry.created_at))
    headers = [*entry.wire_headers, HIT, (b"age", b"%d" % age)]
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    await send({"type": "http.response.body", "body": entry.body})
    cache.count(entry.endpoint, hit=True)
    cache.served(entry.digest)
