"""Cache tables: entries, tags for purging, hit/miss counters.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("upstream", sa.String(32), nullable=False),
        sa.Column("identity", sa.String(128), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("last_access", sa.Float(), nullable=False),
    )
    op.create_index("ix_cache_entries_endpoint", "cache_entries", ["endpoint"])
    op.create_index("ix_cache_entries_expires_at", "cache_entries", ["expires_at"])
    op.create_index("ix_cache_entries_last_access", "cache_entries", ["last_access"])
    op.create_table(
        "cache_tags",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
    )
    op.create_index("ix_cache_tags_kind_value", "cache_tags", ["kind", "value"])
    op.create_table(
        "cache_counters",
        sa.Column("endpoint", sa.String(200), primary_key=True),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("misses", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cache_counters")
    op.drop_index("ix_cache_tags_kind_value", table_name="cache_tags")
    op.drop_table("cache_tags")
    op.drop_table("cache_entries")
