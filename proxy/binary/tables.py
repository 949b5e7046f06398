"""The kept binaries' tables (migrated by ``migrations/versions/0003_binaries.py``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from proxy.tables import Base


class BinaryFile(Base):
    """One kept download: where its bytes are (digest and sha256 name the file), what they are,
    how they were checked, and when they were fetched and last served."""

    __tablename__ = "binary_files"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # the request's cache key
    upstream: Mapped[str] = mapped_column(String(32))
    identity: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))
    endpoint: Mapped[str] = mapped_column(String(200), index=True)
    params: Mapped[str] = mapped_column(Text)  # the canonical parameters, for people reading
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(200))
    content_disposition: Mapped[str] = mapped_column(Text)
    validation: Mapped[str] = mapped_column(String(16))  # how the bytes were checked
    fetched_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float] = mapped_column(Float, index=True)


class BinaryTag(Base):
    """A collection or series a kept download's request named, so it can be purged by either."""

    __tablename__ = "binary_tags"
    __table_args__ = (Index("ix_binary_tags_kind_value", "kind", "value"),)

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)
