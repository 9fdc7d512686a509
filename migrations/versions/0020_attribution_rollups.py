"""The touch labels of each conversation, and their day and week sets, for ``attribution``.

The rollups are marked unbuilt, so the next refresh fills the new tables.

Revision ID: 0020_attribution_rollups
Revises: 0019_business_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020_attribution_rollups"
down_revision: str | Sequence[str] | None = "0019_business_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = tuple(
    f"{touch}_{field}"
    for touch in ("first", "last")
    for field in ("source", "medium", "campaign", "ad")
)


def upgrade() -> None:
    op.create_table(
        "rollup_attribution",
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=True),
        *(sa.Column(name, sa.String(length=255), nullable=False) for name in LABELS),
        sa.PrimaryKeyConstraint("conversation_id"),
    )
    op.create_index(
        "ix_rollup_attribution_slot", "rollup_attribution", ["start_slot_ms", "channel"]
    )
    op.create_table(
        "rollup_attribution_sets",
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("touch", sa.String(length=8), nullable=False),
        sa.Column("field", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("conversations", sa.BigInteger(), nullable=False),
        sa.Column("named_conversions", sa.BigInteger(), nullable=False),
        sa.Column("named_micros", sa.BigInteger(), nullable=False),
        sa.Column("contacts", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "touch", "field", "value"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_attribution_sets")
    op.drop_index("ix_rollup_attribution_slot", table_name="rollup_attribution")
    op.drop_table("rollup_attribution")
