"""Sentiment sums per conversation start slot and channel.

The rollups are marked unbuilt, so the next refresh fills the new table.

Revision ID: 0012_sentiment_rollups
Revises: 0011_first_rank
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_sentiment_rollups"
down_revision: str | Sequence[str] | None = "0011_first_rank"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = (
    "messages",
    "scored",
    "positive",
    "neutral",
    "negative",
    "conv_scored",
    "conv_positive",
    "conv_neutral",
    "conv_negative",
    "shift_count",
    "improved",
    "worsened",
    "unchanged",
)


def upgrade() -> None:
    op.create_table(
        "rollup_sentiment",
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in _COUNTS),
        sa.Column("score_sum", sa.Float(), nullable=False),
        sa.Column("conv_mean_e4", sa.BigInteger(), nullable=False),
        sa.Column("shift_e4", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("start_slot_ms", "channel"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_sentiment")
