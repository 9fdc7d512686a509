"""Resolution, survey and query type counts per conversation start slot, hour, day and week.

The rollups are marked unbuilt, so the next refresh fills the new tables.

Revision ID: 0015_outcome_rollups
Revises: 0013_conversation_watermark
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_outcome_rollups"
down_revision: str | Sequence[str] | None = "0014_change_log"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _keys() -> list[sa.Column]:
    return [
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
    ]


def _counts(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Integer(), nullable=False) for name in names]


def upgrade() -> None:
    op.create_table(
        "rollup_outcomes",
        *_keys(),
        *_counts(
            "conversations",
            "resolved",
            "resolved_handed_off",
            "resolved_repeated",
            "first_contact_resolved",
        ),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel"),
    )
    op.create_table(
        "rollup_surveys",
        *_keys(),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("answered", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        *_counts("surveys", "sent"),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "kind", "answered", "score"),
    )
    op.create_table(
        "rollup_query_types",
        *_keys(),
        sa.Column("intent", sa.String(length=128), nullable=False),
        sa.Column("rule_type", sa.String(length=255), nullable=False),
        *_counts("conversations", "resolved", "csat_responses", "csat_satisfied"),
        sa.Column("csat_score_sum", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "intent", "rule_type"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_query_types")
    op.drop_table("rollup_surveys")
    op.drop_table("rollup_outcomes")
