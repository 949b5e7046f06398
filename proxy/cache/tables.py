"""The cache's tables (migrated by ``migrations/versions/0001_cache.py``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from proxy.tables import Base


class CacheEntry(Base):
    """One stored answer: status, end-to-end headers and body bytes, with its lifetimes."""

    __tablename__ = "cache_entries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the canonical key
    upstream: Mapped[str] = mapped_column(String(32))
    identity: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))
    endpoint: Mapped[str] = mapped_column(String(200), index=True)
    params: Mapped[str] = mapped_column(Text)  # the canonical parameters, for people reading
    status: Mapped[int] = mapped_column(Integer)
    headers: Mapped[str] = mapped_column(Text)  # JSON list of [name, value] pairs
    body: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    last_access: Mapped[float] = mapped_column(Float, index=True)


class CacheTag(Base):
    """A collection or series an entry's request named, so it can be purged by either."""

    __tablename__ = "cache_tags"
    __table_args__ = (Index("ix_cache_tags_kind_value", "kind", "value"),)

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)


class CacheCounter(Base):
    """Hits and misses per endpoint, summed over restarts and replicas."""

    __tablename__ = "cache_counters"

    endpoint: Mapped[str] = mapped_column(String(200), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    misses: Mapped[int] = mapped_column(BigInteger, default=0)
