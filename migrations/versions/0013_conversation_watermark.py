"""Watermarks over conversation ids, so rollups see conversations created without a message.

The rollups are marked unbuilt, so the next refresh rebuilds them and sets the new
watermarks.

Revision ID: 0013_conversation_watermark
Revises: 0012_sentiment_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_conversation_watermark"
down_revision: str | Sequence[str] | None = "0012_sentiment_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("conversation_watermark_id", "conversation_rescan_from_id", "conversation_pending_id")


def upgrade() -> None:
    with op.batch_alter_table("rollup_state") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    with op.batch_alter_table("rollup_state") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
