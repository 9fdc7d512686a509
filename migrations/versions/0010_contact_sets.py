"""Contact sets per UTC day and epoch week, as compressed bitsets, for distinct counts.

The rollups are marked unbuilt, so the next refresh rebuilds them, the sets included.

Revision ID: 0010_contact_sets
Revises: 0009_started_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_contact_sets"
down_revision: str | Sequence[str] | None = "0009_started_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_contact_sets",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("contacts", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "level", "start_ms", "channel"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def downgrade() -> None:
    op.drop_table("rollup_contact_sets")
