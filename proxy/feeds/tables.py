"""The update feeds' table (migrated by ``migrations/versions/0004_feed_position.py``)."""

from __future__ import annotations

from sqlalchemy import Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from proxy.tables import Base


class FeedPosition(Base):
    """How far the gateway has followed one upstream's update feeds, shared by every replica."""

    __tablename__ = "feed_positions"

    upstream: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: Wall-clock time the last successful poll started (its window ends there); None: never.
    last_success: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_attempt: Mapped[float | None] = mapped_column(Float, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # in a row, since the last success
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: JSON object: what the last successful poll saw (item -> fingerprint), so that a row the
    #: overlapping window reports again purges nothing.
    seen: Mapped[str] = mapped_column(Text, default="{}")
    #: Which getUpdatedSeries form the upstream answers: "v2" or "v4".
    form: Mapped[str | None] = mapped_column(String(8), nullable=True)
