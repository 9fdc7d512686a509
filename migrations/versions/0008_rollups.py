"""Rollup tables: conversation, message and contact figures per 15-minute UTC slot.

Revision ID: 0008_rollups
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_rollups"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_conversations",
        sa.Column("slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("slot_ms", "channel"),
    )
    op.create_table(
        "rollup_messages",
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("start_slot_ms", "slot_ms", "channel"),
    )
    op.create_index("ix_rollup_messages_slot", "rollup_messages", ["slot_ms", "channel"])
    op.create_table(
        "rollup_users",
        sa.Column("slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("slot_ms", "channel", "contact_id"),
    )
    op.create_table(
        "rollup_starters",
        sa.Column("slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("slot_ms", "channel", "contact_id"),
    )
    op.create_table(
        "rollup_firsts",
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("first_started_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("contact_id", "channel"),
    )
    op.create_index("ix_rollup_firsts_started", "rollup_firsts", ["first_started_ms"])
    op.create_table(
        "rollup_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("built", sa.Boolean(), nullable=False),
        sa.Column("watermark_id", sa.BigInteger(), nullable=False),
        sa.Column("rescan_from_id", sa.BigInteger(), nullable=False),
        sa.Column("pending_id", sa.BigInteger(), nullable=False),
        sa.Column("pending_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("refreshed_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("rebuild_token", sa.String(length=32), nullable=True),
        sa.Column("rebuild_started_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    state = sa.table(
        "rollup_state",
        sa.column("id", sa.Integer()),
        sa.column("built", sa.Boolean()),
        sa.column("watermark_id", sa.BigInteger()),
        sa.column("rescan_from_id", sa.BigInteger()),
        sa.column("pending_id", sa.BigInteger()),
        sa.column("pending_at_ms", sa.BigInteger()),
        sa.column("refreshed_at_ms", sa.BigInteger()),
        sa.column("rebuild_started_at_ms", sa.BigInteger()),
    )
    # The refresher locks this row, so two refreshers never rebuild the same slots at once.
    op.bulk_insert(
        state,
        [
            {
                "id": 1,
                "built": False,
                "watermark_id": 0,
                "rescan_from_id": 0,
                "pending_id": 0,
                "pending_at_ms": 0,
                "refreshed_at_ms": 0,
                "rebuild_started_at_ms": 0,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("rollup_state")
    op.drop_index("ix_rollup_firsts_started", table_name="rollup_firsts")
    op.drop_table("rollup_firsts")
    op.drop_table("rollup_starters")
    op.drop_table("rollup_users")
    op.drop_index("ix_rollup_messages_slot", table_name="rollup_messages")
    op.drop_table("rollup_messages")
    op.drop_table("rollup_conversations")
