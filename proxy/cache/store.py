"""The cache's source of truth in SQL: reads from any thread, writes from the writer thread only.

SQLite has one writer at a time; funnelling every write through one thread (see
:mod:`proxy.cache.writer`) is what keeps "database is locked" away under load. PostgreSQL
replicas share these tables; upserts make concurrent writers of the same key harmless.

Text reaches the database only through :func:`storable`: a request may carry bytes that are
not UTF-8 (kept as surrogates when decoded), and no driver can encode those.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    delete,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from proxy.cache.policy import CacheKey, glob_to_like
from proxy.cache.tables import CacheCounter, CacheEntry, CacheTag
from proxy.db import describe_failure, upsert_insert
from proxy.headers import RawHeaders

# Rough per-entry bookkeeping cost (row, index entries), counted in the size cap.
_ENTRY_OVERHEAD = 256

#: Failures of the database or its disk as a whole (full, read-only, gone), not of one entry.
ENVIRONMENT_ERRORS = (OperationalError, InterfaceError, PoolTimeout, OSError)

# What no database stores as text: lone surrogates (bytes that were not UTF-8, kept by
# surrogateescape decoding) and NUL (PostgreSQL text cannot hold it).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


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


@dataclass(frozen=True, slots=True)
class Stored:
    """What a batch write did: bytes added, and the entries the database refused (and why)."""

    added_bytes: int
    refused: dict[str, str]


def storable(text: str, limit: int | None = None) -> str:
    """``text`` as every database can store it, cut to ``limit`` characters.

    Undecodable bytes become ``%XX`` (their percent-encoding) and NUL ``%00``; text without
    them is returned unchanged, so what clean requests stored before still matches.
    """
    if _UNSTORABLE.search(text) is not None:
        text = _UNSTORABLE.sub(_percent_encode, text)
    return text[:limit] if limit else text


def _limit(column: Any) -> int | None:
    """The length of a ``String(n)`` column (PostgreSQL refuses longer text)."""
    return getattr(column.type, "length", None)


# Looked up once: reading a column's type through the ORM costs more than the rest of a row.
_UPSTREAM, _IDENTITY, _METHOD, _ENDPOINT = (
    _limit(column)
    for column in (CacheEntry.upstream, CacheEntry.identity, CacheEntry.method, CacheEntry.endpoint)
)
_TAG_KIND, _TAG_VALUE, _COUNTER_ENDPOINT = (
    _limit(column) for column in (CacheTag.kind, CacheTag.value, CacheCounter.endpoint)
)


def _percent_encode(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"%{code - 0xDC00:02X}"
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class _Row:
    """An entry as the database will take it: every text made storable beforehand."""

    digest: str
    size: int
    values: dict[str, Any]
    tags: list[tuple[str, str]]

    @classmethod
    def of(cls, key: CacheKey, entry: Entry) -> _Row:
        values = {
            "key": key.digest,
            "upstream": storable(key.upstream, _UPSTREAM),
            "identity": storable(key.identity, _IDENTITY),
            "method": storable(key.method, _METHOD),
            "endpoint": storable(key.endpoint, _ENDPOINT),
            "params": storable(key.params),
            "status": entry.status,
            "headers": _encode_headers(entry.headers),
            "body": entry.body,
            "size": entry.size,
            "created_at": entry.created_at,
            "expires_at": entry.expires_at,
            "last_access": entry.created_at,
        }
        tags = sorted({(storable(k, _TAG_KIND), storable(v, _TAG_VALUE)) for k, v in key.tags})
        return cls(key.digest, entry.size, values, tags)


class CacheStore:
    """SQL access for the cache tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert: Callable[..., Any] = upsert_insert(engine)
        # The write path's statements, built once: SQLAlchemy then reuses their compiled form,
        # and each is sent once per batch with every row's parameters (executemany).
        keys: BindParameter[str] = bindparam("keys", expanding=True)
        entries, tags = cast(Table, CacheEntry.__table__), cast(Table, CacheTag.__table__)
        self._sizes = select(entries.c.size).where(entries.c.key.in_(keys))
        insert = self._insert(entries)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[entries.c.key],
            set_={c.name: insert.excluded[c.name] for c in entries.c if c.name != "key"},
        )
        self._untag = delete(tags).where(tags.c.key.in_(keys))
        self._tag = tags.insert()
        self._get = select(
            entries.c.endpoint,
            entries.c.status,
            entries.c.headers,
            entries.c.body,
            entries.c.created_at,
            entries.c.expires_at,
        ).where(entries.c.key == bindparam("digest"))

    # reads --------------------------------------------------------------------------------

    def get(self, digest: str) -> Entry | None:
        # Core, built once, not the ORM: this is the read behind every memory-tier miss.
        with self.engine.connect() as connection:
            row = connection.execute(self._get, {"digest": digest}).first()
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

    def put_many(self, items: Iterable[tuple[CacheKey, Entry]]) -> Stored:
        """Insert or replace entries and their tags; return bytes added and entries refused.

        One transaction for the batch. When the database refuses an entry (rather than failing
        as a whole: full, read-only, gone, which raises), the batch is written again one entry
        per transaction, so that only the refused entry is lost, never its neighbours. Of two
        entries with the same key the later wins.
        """
        rows = list({row.digest: row for row in (_Row.of(k, e) for k, e in items)}.values())
        if not rows:
            return Stored(0, {})
        try:
            with self.engine.begin() as connection:
                return Stored(self._put_rows(connection, rows), {})
        except ENVIRONMENT_ERRORS:
            raise
        except Exception:  # one of them is refused: find it below rather than lose them all
            pass
        added, refused = 0, {}
        for row in rows:
            try:
                with self.engine.begin() as connection:
                    added += self._put_rows(connection, [row])
            except ENVIRONMENT_ERRORS:
                raise
            except Exception as exc:
                refused[row.digest] = f"{row.values['endpoint']}: {describe_failure(exc)}"
        return Stored(added, refused)

    def _put_rows(self, connection: Connection, rows: list[_Row]) -> int:
        """Upsert ``rows`` (distinct keys) with their tags, four statements whatever their
        number; return the bytes added."""
        keys = {"keys": [row.digest for row in rows]}
        old = sum(int(size) for (size,) in connection.execute(self._sizes, keys))
        connection.execute(self._upsert, [row.values for row in rows])
        connection.execute(self._untag, keys)
        tags = [
            {"key": row.digest, "kind": kind, "value": value}
            for row in rows
            for kind, value in row.tags
        ]
        if tags:
            connection.execute(self._tag, tags)
        return sum(row.size for row in rows) - old

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
                name = storable(endpoint, _COUNTER_ENDPOINT)
                statement = self._insert(CacheCounter).values(
                    endpoint=name, hits=hits, misses=misses
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
        if not (pattern or collection or series):
            return self._purge_all()
        query = select(CacheEntry.key, CacheEntry.size)
        if pattern:
            like = glob_to_like(storable(pattern))
            query = query.where(CacheEntry.endpoint.like(like, escape="\\"))
        for kind, value in (("collection", collection), ("series", series)):
            if value:
                value = storable(value)
                tagged = select(CacheTag.key).where(CacheTag.kind == kind, CacheTag.value == value)
                query = query.where(CacheEntry.key.in_(tagged))
        with Session(self.engine) as session, session.begin():
            rows = session.execute(query).all()
            self._delete(session, [row.key for row in rows])
        return len(rows), sum(row.size for row in rows)

    def purge_tagged(self, upstream: str, tags: Iterable[tuple[str, str]]) -> tuple[int, int]:
        """Delete ``upstream``'s entries tagged with any of ``tags`` (kind, value); return
        (entries, bytes). The update feeds' purge: one transaction for a poll's changes."""
        wanted = sorted({(storable(k, _TAG_KIND), storable(v, _TAG_VALUE)) for k, v in tags})
        if not wanted:
            return 0, 0
        found: dict[str, int] = {}
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(wanted), 200):
                chunk = wanted[start : start + 200]
                tagged = select(CacheTag.key).where(
                    or_(*(and_(CacheTag.kind == k, CacheTag.value == v) for k, v in chunk))
                )
                query = select(CacheEntry.key, CacheEntry.size).where(
                    CacheEntry.upstream == storable(upstream, _UPSTREAM),
                    CacheEntry.key.in_(tagged),
                )
                found.update((row.key, int(row.size)) for row in session.execute(query))
            self._delete(session, list(found))
        return len(found), sum(found.values())

    def oldest(self, upstream: str) -> float | None:
        """When the oldest stored answer of ``upstream`` was fetched (None: it has none)."""
        with Session(self.engine) as session:
            value = session.scalar(
                select(func.min(CacheEntry.created_at)).where(
                    CacheEntry.upstream == storable(upstream, _UPSTREAM)
                )
            )
        return None if value is None else float(value)

    def collections(self, upstream: str) -> list[str]:
        """The collections the stored answers of ``upstream`` name."""
        query = (
            select(CacheTag.value)
            .where(
                CacheTag.kind == "collection",
                CacheTag.key.in_(
                    select(CacheEntry.key).where(
                        CacheEntry.upstream == storable(upstream, _UPSTREAM)
                    )
                ),
            )
            .distinct()
        )
        with Session(self.engine) as session:
            return sorted(session.scalars(query))

    def _purge_all(self) -> tuple[int, int]:
        with Session(self.engine) as session, session.begin():
            count, size = session.execute(
                select(func.count(), func.coalesce(func.sum(CacheEntry.size), 0))
            ).one()
            # Without a WHERE clause SQLite frees the tables' pages wholesale instead of
            # deleting row by row: a few pages of WAL, which a full disk still has room for.
            session.execute(delete(CacheTag))
            session.execute(delete(CacheEntry))
        self.reclaim()
        return int(count), int(size)

    def reclaim(self) -> None:
        """Give the space of deleted entries back to the file system (SQLite, best effort).

        The WAL is emptied first (that frees its file), then VACUUM rebuilds the now small
        database through it and a last truncating checkpoint shrinks the file. On a disk with
        no room even for that, the freed pages stay in the file and new entries reuse them.
        """
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as connection:
            try:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                connection.exec_driver_sql("PRAGMA temp_store=MEMORY")  # not the full disk
                connection.exec_driver_sql("VACUUM")
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            except OperationalError:
                pass  # the entries are gone either way
            finally:
                connection.exec_driver_sql("PRAGMA temp_store=DEFAULT")

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (SQLite), so that the WAL can start over.

        A WAL that starts over reuses its own file: a purge still finds room in it when the
        disk fills up afterwards.
        """
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def free_disk_bytes(self) -> int | None:
        """Free space on the SQLite file's file system; None for a database server."""
        name = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not name or name == ":memory:":
            return None
        status = os.statvfs(Path(name).parent)
        return status.f_bavail * status.f_frsize

    def check_writable(self) -> None:
        """Raise unless the database takes writes (a read-only file, mount or server fails)."""
        with self.engine.begin() as connection:
            connection.execute(update(CacheCounter).where(false()).values(hits=0))

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
