"""Rank each contact's first start per channel against its first start on any channel.

The rollups are marked unbuilt, so the next refresh fills the new column.

Revision ID: 0011_first_rank
Revises: 0010_contact_sets
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_first_rank"
down_revision: str | Sequence[str] | None = "0010_contact_sets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollup_firsts") as batch:
        batch.add_column(
            sa.Column("first_rank", sa.SmallInteger(), nullable=False, server_default="2")
        )
    op.create_index("ix_rollup_firsts_rank", "rollup_firsts", ["first_rank", "first_started_ms"])
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_index("ix_rollup_firsts_rank", table_name="rollup_firsts")
    with op.batch_alter_table("rollup_firsts") as batch:
        batch.drop_column("first_rank")
