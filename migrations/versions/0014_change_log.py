"""The change log: conversations and contacts whose rows changed without a new message.

Adds ``rollup_changes`` and its three watermarks in ``rollup_state``. The rollups are
marked unbuilt, so the next refresh rebuilds them and sets the new watermarks.

Revision ID: 0014_change_log
Revises: 0013_conversation_watermark
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_change_log"
down_revision: str | Sequence[str] | None = "0013_conversation_watermark"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("change_watermark_id", "change_rescan_from_id", "change_pending_id")


def upgrade() -> None:
    op.create_table(
        "rollup_changes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("conversation_id", sa.Integer(), nullable=True),
        sa.Column("contact_id", sa.Integer(), nullable=True),
        sa.Column("start_ms", sa.BigInteger(), nullable=True),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("rollup_state") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    with op.batch_alter_table("rollup_state") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
    op.drop_table("rollup_changes")
