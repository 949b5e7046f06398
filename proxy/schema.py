"""The gateway's whole schema: every table module imported, so ``Base.metadata`` is complete.

Apart from :mod:`proxy.tables` (the base the table modules import) so that no import circle
runs through it: Alembic and the migration test import this module, the table modules never do.
"""

from __future__ import annotations

# Imported for their side effect: each module registers its tables on Base.metadata.
import proxy.accounts.tables
import proxy.binary.tables
import proxy.cache.tables
import proxy.feeds.tables  # noqa: F401
from proxy.tables import Base


def all_tables() -> type[Base]:
    """``Base`` with every table of the gateway registered on its metadata."""
    return Base
