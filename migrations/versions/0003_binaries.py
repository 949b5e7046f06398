"""Kept binaries: one row per file of a binary download, tags for purging.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "binary_files",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("upstream", sa.String(32), nullable=False),
        sa.Column("identity", sa.String(128), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("endpoint", sa.String(200), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("content_disposition", sa.Text(), nullable=False),
        sa.Column("validation", sa.String(16), nullable=False),
        sa.Column("fetched_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_binary_files_endpoint", "binary_files", ["endpoint"])
    op.create_index("ix_binary_files_last_used_at", "binary_files", ["last_used_at"])
    op.create_table(
        "binary_tags",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
    )
    op.create_index("ix_binary_tags_kind_value", "binary_tags", ["kind", "value"])


def downgrade() -> None:
    op.drop_index("ix_binary_tags_kind_value", table_name="binary_tags")
    op.drop_table("binary_tags")
    op.drop_index("ix_binary_files_last_used_at", table_name="binary_files")
    op.drop_index("ix_binary_files_endpoint", table_name="binary_files")
    op.drop_table("binary_files")
