"""Response-time histograms in business hours, and the schedule they are counted with.

The schedule row is created on first use with the default business hours. The rollups
are marked unbuilt, so the next refresh fills the new table.

Revision ID: 0019_business_rollups
Revises: 0013_conversation_watermark
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_business_rollups"
down_revision: str | Sequence[str] | None = "0018_ingest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_business_responses",
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("figure", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("total_ms", sa.Float(), nullable=False),
        sa.Column("min_ms", sa.Float(), nullable=False),
        sa.Column("max_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "figure", "role", "bucket"),
    )
    op.create_table(
        "rollup_business_schedule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("built_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("rebuild_token", sa.String(length=32), nullable=True),
        sa.Column("rebuild_started_at_ms", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_business_schedule")
    op.drop_table("rollup_business_responses")
