"""Conversion attributions, leads and orders for the business metrics' rollups.

Adds an index on leads by named conversation, which the lead rollup reads, and one on
conversion currencies. The rollups are marked unbuilt, so the next refresh fills the new
tables.

Revision ID: 0016_conversion_rollups
Revises: 0013_conversation_watermark
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_conversion_rollups"
down_revision: str | Sequence[str] | None = "0015_outcome_rollups"
branch_labels: str | Sequence[str] | None = None
# The index on leads needs the business tables.
depends_on: str | Sequence[str] | None = "0006_business"


def upgrade() -> None:
    op.create_table(
        "rollup_conversion_links",
        sa.Column("conversion_id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("value_micros", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("first_campaign", sa.String(length=255), nullable=True),
        sa.Column("last_campaign", sa.String(length=255), nullable=True),
        sa.Column("by_user", sa.SmallInteger(), nullable=False),
        sa.Column("first_link", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conversion_id", "conversation_id"),
    )
    op.create_index(
        "ix_rollup_conversion_links_slot",
        "rollup_conversion_links",
        [
            "start_slot_ms",
            "channel",
            "by_user",
            "first_link",
            "conversion_id",
            "conversation_id",
            "value_micros",
            "name",
            "first_campaign",
            "last_campaign",
        ],
    )
    op.create_table(
        "rollup_lead_links",
        sa.Column("lead_id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("start_slot_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("occurred_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("first_source", sa.String(length=255), nullable=True),
        sa.Column("last_source", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("lead_id"),
    )
    op.create_index(
        "ix_rollup_lead_links_slot",
        "rollup_lead_links",
        [
            "start_slot_ms",
            "channel",
            "contact_id",
            "occurred_at_ms",
            "kind",
            "origin",
            "score",
            "first_source",
            "last_source",
            "lead_id",
        ],
    )
    op.create_index("ix_rollup_lead_links_contact", "rollup_lead_links", ["contact_id"])
    op.create_table(
        "rollup_orders",
        sa.Column("conversion_id", sa.Integer(), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("occurred_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("value_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("conversion_id"),
    )
    op.create_index(
        "ix_rollup_orders_contact",
        "rollup_orders",
        ["contact_id", "occurred_at_ms", "value_micros", "conversion_id"],
    )
    op.create_index("ix_leads_named", "leads", ["channel", "conversation_external_id"])
    op.create_index("ix_conversions_currency", "conversions", ["currency"])
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_index("ix_conversions_currency", table_name="conversions")
    op.drop_index("ix_leads_named", table_name="leads")
    op.drop_table("rollup_orders")
    op.drop_table("rollup_lead_links")
    op.drop_table("rollup_conversion_links")
