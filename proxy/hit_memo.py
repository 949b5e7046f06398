"""The hit memo: raw request lines the gateway has answered from the cache before.

Computing a cache key means parsing and sorting the query, looking the endpoint up and hashing;
for a repeated plain GET that work would cost more than the answer. The memo maps the raw
request (path with its mount, query bytes) to the key the full path computed for it, so a
repeat is found in memory with one lookup, by the ASGI path and by the protocol shortcut alike.
Only plain GETs without a body are remembered; a request with a body or asking for a fresh
answer always takes the full path.
"""

from __future__ import annotations

from cachetools import FIFOCache

from proxy.cache.policy import CacheKey
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.headers import RawHeaders

#: Request lines remembered per process; the oldest is forgotten first, the full path refills.
LIMIT = 20_000
#: Longer queries take the full path every time (they would crowd the memo).
QUERY_LIMIT = 1024
#: Headers that send a request down the full path: a body, or a client asking for a fresh answer.
_FULL_PATH_HEADERS = frozenset(
    {b"cache-control", b"pragma", b"content-length", b"transfer-encoding"}
)


class HitMemo:
    """Raw request line → cache key, and the fresh stored answer for a repeat."""

    def __init__(self, cache: TieredCache, limit: int = LIMIT) -> None:
        self.cache = cache
        self._keys: FIFOCache[tuple[str, bytes], CacheKey] = FIFOCache(limit)

    def remember(self, path: str, query: bytes, method: str, body: bytes, key: CacheKey) -> None:
        """Note that the request line ``path?query`` has the cache key ``key``."""
        if method == "GET" and not body and len(query) <= QUERY_LIMIT:
            self._keys[(path, query)] = key

    def fresh(self, path: str, query: bytes, headers: RawHeaders) -> Entry | None:
        """The fresh in-memory answer to a plain GET seen before, else None (full path)."""
        key = self._keys.get((path, query))
        if key is None:
            return None
        for name, _ in headers:
            if name in _FULL_PATH_HEADERS:
                return None
        entry = self.cache.from_memory(key.digest)
        if entry is None or entry.expires_at <= self.cache.clock():
            return None
        return entry
