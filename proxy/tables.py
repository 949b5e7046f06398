"""The declarative base shared by every table of the gateway (``Base.metadata`` feeds Alembic)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Declarative base for every table of the gateway."""


def all_tables() -> type[Base]:
    """``Base`` with every table module imported, so its metadata is complete."""
    # Imported for their side effect: each module registers its tables on Base.metadata.
    import proxy.accounts.tables
    import proxy.binary.tables
    import proxy.cache.tables  # noqa: F401

    return Base
