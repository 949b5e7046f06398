"""Update feeds: how far each upstream's feeds were followed, shared by the replicas.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feed_positions",
        sa.Column("upstream", sa.String(32), primary_key=True),
        sa.Column("last_success", sa.Float(), nullable=True),
        sa.Column("last_attempt", sa.Float(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("seen", sa.Text(), nullable=False),
        sa.Column("form", sa.String(8), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("feed_positions")
