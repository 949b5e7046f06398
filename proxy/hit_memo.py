"""The hit memo: raw request lines the gateway has answered from the cache before.

Computing a cache key means parsing and sorting the query, looking the endpoint up and hashing;
for a repeated plain GET that work would cost more than the answer. The memo maps the raw
request (path with its mount, query bytes) to the key the full path computed for it, so a
repeat is found in memory with one lookup, by the ASGI path and by the protocol shortcut alike.
Only plain GETs without a body are remembered; a request with a body or asking for a fresh
answer always takes the full path.

It also keeps *known heads*: the exact bytes of request heads that the protocol shortcut
(:mod:`proxy.hit_protocol`) answered, each with what httptools parsed from them. A client that
repeats a request sends the same bytes again (wrk, a script in a loop, a viewer polling); the
shortcut then looks those bytes up instead of driving the parser's per-header callbacks. Which
head bytes the parser accepts, and what it reads from them, is httptools' decision, made once
for every distinct head: the same bytes from the parser's idle state parse the same way again.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import FIFOCache

from proxy.cache.answer import HIT, StoredAnswer, answer_age
from proxy.cache.policy import CacheKey
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.headers import RawHeaders

#: Request lines remembered per process; the oldest is forgotten first, the full path refills.
LIMIT = 20_000
#: Longer queries take the full path every time (they would crowd the memo).
QUERY_LIMIT = 1024
#: Known heads kept per process, and the longest head kept: at most 4 MiB of head bytes.
HEADS_LIMIT = 2048
HEAD_BYTES_LIMIT = 2048
#: Rendered answers kept per process (for the second their Age holds), and the largest kept:
#: at most 8 MiB; a larger answer is rendered for every hit (its write costs more anyway).
WIRES_LIMIT = 128
WIRE_BYTES_LIMIT = 64 * 1024
#: Headers that send a request down the full path: a body, or a client asking for a fresh answer.
_FULL_PATH_HEADERS = frozenset(
    {b"cache-control", b"pragma", b"content-length", b"transfer-encoding"}
)


@dataclass(frozen=True, slots=True)
class KnownHead:
    """What httptools parsed from a head the shortcut answered: a keep-alive HTTP/1.1 ``GET``
    of ``path`` (mount included, not percent-encoded) and ``query``, with these headers (names
    lowercased, as uvicorn keeps them), whose answer is stored under ``digest``."""

    path: str
    query: bytes
    headers: RawHeaders
    digest: str


class HitMemo:
    """Raw request line → cache key, and the fresh stored answer for a repeat."""

    def __init__(self, cache: TieredCache, limit: int = LIMIT) -> None:
        self.cache = cache
        self._keys: FIFOCache[tuple[str, bytes], CacheKey] = FIFOCache(limit)
        #: Head bytes → what they parse to (read on the hot path with ``heads.get``).
        self.heads: dict[bytes, KnownHead] = {}
        self._wires: dict[str, tuple[Entry, int, bytes]] = {}

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
        return self.fresh_entry(key.digest)

    def fresh_entry(self, digest: str) -> Entry | None:
        """The fresh in-memory answer stored under ``digest``, else None."""
        entry = self.cache.from_memory(digest)
        if entry is None or entry.expires_at <= self.cache.clock():
            return None
        return entry

    def learn(self, head: bytes, known: KnownHead) -> None:
        """Keep ``head`` (a whole request head, as received) as parsing to ``known``; the
        oldest known head is forgotten first."""
        heads = self.heads
        if len(head) > HEAD_BYTES_LIMIT or head in heads:
            return
        if len(heads) >= HEADS_LIMIT:
            del heads[next(iter(heads))]
        heads[head] = known

    def hit_answer(self, entry: Entry) -> bytes:
        """The whole response of a ``HIT`` from ``entry``, counted as
        :func:`proxy.cache.answer.stored_answer` counts one. Its bytes differ only when its
        ``Age`` does, once a second: a small one is rendered once for all the hits meanwhile."""
        age = answer_age(self.cache, entry)
        wires = self._wires
        kept = wires.get(entry.digest)
        if kept is not None and kept[0] is entry and kept[1] == age:
            return kept[2]
        wire = StoredAnswer(entry, HIT, age).wire()
        if len(wire) <= WIRE_BYTES_LIMIT:
            if kept is None and len(wires) >= WIRES_LIMIT:
                del wires[next(iter(wires))]
            wires[entry.digest] = (entry, age, wire)
        return wire
