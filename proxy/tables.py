"""The declarative base shared by every table of the gateway (:mod:`proxy.schema` gathers them)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Declarative base for every table of the gateway."""
