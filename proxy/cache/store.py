"""The cache's source of truth in SQL: reads from any thread, writes from the writer thread only.

SQLite has one writer at a time; funnelling every write through one thread (see
:mod:`proxy.cache.writer`) is what keeps "database is locked" away under load. PostgreSQL
replicas share these tables; upserts make concurrent writers of the same key harmless.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from proxy.cache.policy import CacheKey, glob_to_like
from proxy.cache.tables import CacheCounter, CacheEntry, CacheTag
from proxy.headers import RawHeaders

# Rough per-entry bookkeeping cost (row, index entries), counted in the size cap.
_ENTRY_OVERHEAD = 256


@dataclass(slots=True)
class Entry:
    """A stored answer, ready to send: ``wire_headers`` already holds Content-Length."""

    digest: str
    endpoint: str
    status: int
    headers: RawHeaders
    body: bytes
    created_at: float
    expires_at: float
    wire_headers: RawHeaders = field(init=False)
    size: int = field(init=False)
    wire_head: bytes | None = field(init=False, default=None)  # see proxy.hit_protocol

    def __post_init__(self) -> None:
        self.wire_headers = [*self.headers, (b"content-length", b"%d" % len(self.body))]
        self.size = len(self.body) + sum(len(n) + len(v) for n, v in self.headers)
        self.size += _ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """What the cache holds and how it did, for one endpoint."""

    endpoint: str
    entries: int
    bytes: int
    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


class CacheStore:
    """SQL access for the cache tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        self._insert: Callable[..., Any] = (
            postgresql.insert if dialect == "postgresql" else sqlite.insert
        )

    # reads --------------------------------------------------------------------------------

    def get(self, digest: str) -> Entry | None:
        # Core, not the ORM: this is the read behind every memory-tier miss.
        query = select(
            CacheEntry.endpoint,
            CacheEntry.status,
            CacheEntry.headers,
            CacheEntry.body,
            CacheEntry.created_at,
            CacheEntry.expires_at,
        ).where(CacheEntry.key == digest)
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        return Entry(
            digest=digest,
            endpoint=row.endpoint,
            status=row.status,
            headers=_decode_headers(row.headers),
            body=bytes(row.body),
            created_at=row.created_at,
            expires_at=row.expires_at,
        )

    def total_bytes(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.coalesce(func.sum(CacheEntry.size), 0))) or 0)

    def stats(self) -> list[EndpointStats]:
        with Session(self.engine) as session:
            sizes = {
                endpoint: (int(count), int(size or 0))
                for endpoint, count, size in session.execute(
                    select(CacheEntry.endpoint, func.count(), func.sum(CacheEntry.size)).group_by(
                        CacheEntry.endpoint
                    )
                )
            }
            counters = {
                row.endpoint: (row.hits, row.misses)
                for row in session.scalars(select(CacheCounter))
            }
        return [
            EndpointStats(name, *sizes.get(name, (0, 0)), *counters.get(name, (0, 0)))
            for name in sorted(sizes.keys() | counters.keys())
        ]

    # writes (writer thread) ------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[CacheKey, Entry]]) -> int:
        """Insert or replace entries and their tags in one transaction; return bytes added."""
        added = 0
        with Session(self.engine) as session, session.begin():
            for key, entry in items:
                values = {
                    "key": key.digest,
                    "upstream": key.upstream,
                    "identity": key.identity,
                    "method": key.method,
                    "endpoint": key.endpoint,
                    "params": key.params,
                    "status": entry.status,
                    "headers": _encode_headers(entry.headers),
                    "body": entry.body,
                    "size": entry.size,
                    "created_at": entry.created_at,
                    "expires_at": entry.expires_at,
                    "last_access": entry.created_at,
                }
                old = session.scalar(select(CacheEntry.size).where(CacheEntry.key == key.digest))
                statement = self._insert(CacheEntry).values(**values)
                changed = {k: v for k, v in values.items() if k != "key"}
                session.execute(
                    statement.on_conflict_do_update(index_elements=["key"], set_=changed)
                )
                session.execute(delete(CacheTag).where(CacheTag.key == key.digest))
                for kind, value in sorted(key.tags):
                    session.add(CacheTag(key=key.digest, kind=kind, value=value[:200]))
                added += entry.size - (old or 0)
        return added

    def touch(self, digests: Iterable[str], when: float) -> None:
        """Record that entries were served (for least-recently-used eviction)."""
        keys = list(digests)
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(keys), 500):
                session.execute(
                    update(CacheEntry)
                    .where(CacheEntry.key.in_(keys[start : start + 500]))
                    .values(last_access=when)
                )

    def add_counts(self, counts: dict[str, list[int]]) -> None:
        """Add hit/miss deltas per endpoint."""
        with Session(self.engine) as session, session.begin():
            for endpoint, (hits, misses) in counts.items():
                statement = self._insert(CacheCounter).values(
                    endpoint=endpoint, hits=hits, misses=misses
                )
                session.execute(
                    statement.on_conflict_do_update(
                        index_elements=["endpoint"],
                        set_={
                            "hits": CacheCounter.hits + hits,
                            "misses": CacheCounter.misses + misses,
                        },
                    )
                )

    def purge(
        self,
        *,
        pattern: str | None = None,
        collection: str | None = None,
        series: str | None = None,
    ) -> tuple[int, int]:
        """Delete matching entries (all of them without filters); return (entries, bytes)."""
        query = select(CacheEntry.key, CacheEntry.size)
        if pattern:
            query = query.where(CacheEntry.endpoint.like(glob_to_like(pattern), escape="\\"))
        for kind, value in (("collection", collection), ("series", series)):
            if value:
                tagged = select(CacheTag.key).where(CacheTag.kind == kind, CacheTag.value == value)
                query = query.where(CacheEntry.key.in_(tagged))
        with Session(self.engine) as session, session.begin():
            rows = session.execute(query).all()
            self._delete(session, [row.key for row in rows])
        return len(rows), sum(row.size for row in rows)

    def evict(self, max_bytes: int, target_bytes: int) -> tuple[int, int]:
        """Delete least recently used entries while the total exceeds ``max_bytes``."""
        removed, freed = 0, 0
        with Session(self.engine) as session, session.begin():
            total = int(session.scalar(select(func.coalesce(func.sum(CacheEntry.size), 0))) or 0)
            if total <= max_bytes:
                return 0, 0
            oldest = session.execute(
                select(CacheEntry.key, CacheEntry.size).order_by(CacheEntry.last_access)
            )
            doomed: list[str] = []
            for row in oldest:
                if total - freed <= target_bytes:
                    break
                doomed.append(row.key)
                freed += row.size
            self._delete(session, doomed)
            removed = len(doomed)
        return removed, freed

    def sweep(self, expired_before: float) -> int:
        """Delete entries that expired before ``expired_before``; return how many."""
        with Session(self.engine) as session, session.begin():
            keys = list(
                session.scalars(
                    select(CacheEntry.key).where(CacheEntry.expires_at < expired_before)
                )
            )
            self._delete(session, keys)
        return len(keys)

    @staticmethod
    def _delete(session: Session, keys: list[str]) -> None:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            session.execute(delete(CacheTag).where(CacheTag.key.in_(chunk)))
            session.execute(delete(CacheEntry).where(CacheEntry.key.in_(chunk)))


def _encode_headers(headers: RawHeaders) -> str:
    return json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers])


def _decode_headers(text: str) -> RawHeaders:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(text)]
