"""Drop-off counts per conversation start slot, hour, day and week, and their step sets.

The rollups are marked unbuilt, so the next refresh fills the new tables.

Revision ID: 0021_dropoff_rollups
Revises: 0020_attribution_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021_dropoff_rollups"
down_revision: str | Sequence[str] | None = "0020_attribution_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _keys() -> list[sa.Column]:
    return [
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "rollup_dropoff",
        *_keys(),
        sa.Column("step", sa.String(length=128), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.Column("ended", sa.Integer(), nullable=False),
        sa.Column("open", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "step"),
    )
    op.create_table(
        "rollup_dropoff_open",
        sa.Column("last_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("step", sa.String(length=128), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("last_slot_ms", "start_slot_ms", "channel", "step"),
    )
    op.create_index("ix_rollup_dropoff_open_start", "rollup_dropoff_open", ["start_slot_ms"])
    op.create_table(
        "rollup_dropoff_steps",
        *_keys(),
        sa.Column("step_set_id", sa.Integer(), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "step_set_id"),
    )
    op.create_table(
        "rollup_step_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fingerprint", name="uq_rollup_step_sets_fingerprint"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_step_sets")
    op.drop_table("rollup_dropoff_steps")
    op.drop_index("ix_rollup_dropoff_open_start", table_name="rollup_dropoff_open")
    op.drop_table("rollup_dropoff_open")
    op.drop_table("rollup_dropoff")
