"""Rollups for retention and engagement: second starts, reach tables, exposure watermarks.

``rollup_firsts`` gets the second conversation start per channel and over all channels,
an index on ``(first_rank, channel)`` and two covering indexes for cohorts. New tables keep the contacts of proactive
conversations, of conversations with a user message and of exposures, and the count of
conversations with at least two user messages. ``rollup_state`` gets watermarks over
exposure ids. The rollups are marked unbuilt, so the next refresh rebuilds them.

Revision ID: 0017_cohort_rollups
Revises: 0013_conversation_watermark
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_cohort_rollups"
down_revision: str | Sequence[str] | None = "0016_conversion_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATE_COLUMNS = ("exposure_watermark_id", "exposure_rescan_from_id", "exposure_pending_id")
# Covering indexes for retention cohorts: over all channels, and on one channel.
_COHORT_INDEXES = (
    (
        "ix_rollup_firsts_cohort",
        ("first_rank", "first_started_ms", "channel", "contact_id", "second_any_ms"),
    ),
    (
        "ix_rollup_firsts_channel_cohort",
        ("channel", "first_started_ms", "contact_id", "second_started_ms"),
    ),
)
_CONTACT_TABLES = (
    ("rollup_proactive", "start_slot_ms"),
    ("rollup_writers", "start_slot_ms"),
    ("rollup_exposed", "slot_ms"),
)


def upgrade() -> None:
    with op.batch_alter_table("rollup_firsts") as batch:
        batch.add_column(sa.Column("second_started_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("second_any_ms", sa.BigInteger(), nullable=True))
    op.create_index("ix_rollup_firsts_rank_channel", "rollup_firsts", ["first_rank", "channel"])
    for name, columns in _COHORT_INDEXES:
        op.create_index(name, "rollup_firsts", list(columns))
    with op.batch_alter_table("rollup_state") as batch:
        for name in _STATE_COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "rollup_engaged",
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("conversations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("start_slot_ms", "channel"),
    )
    for name, slot in _CONTACT_TABLES:
        op.create_table(
            name,
            sa.Column(slot, sa.BigInteger(), nullable=False),
            sa.Column("channel", sa.String(length=32), nullable=False),
            sa.Column("contact_id", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint(slot, "channel", "contact_id"),
        )
    op.execute("DELETE FROM rollup_firsts")
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    for name, _ in _CONTACT_TABLES:
        op.drop_table(name)
    op.drop_table("rollup_engaged")
    with op.batch_alter_table("rollup_state") as batch:
        for name in _STATE_COLUMNS:
            batch.drop_column(name)
    for name, _ in _COHORT_INDEXES:
        op.drop_index(name, table_name="rollup_firsts")
    op.drop_index("ix_rollup_firsts_rank_channel", table_name="rollup_firsts")
    with op.batch_alter_table("rollup_firsts") as batch:
        batch.drop_column("second_any_ms")
        batch.drop_column("second_started_ms")
