"""Attribution sets hold Roaring bitmaps of contacts and their value sums as decimal digits.

``rollup_attribution_sets`` is created again with ``named_micros`` as text, because the
sum of the conversion values of a label can exceed 64 bits. The rollups are marked
unbuilt, so the next refresh fills the table in the new format.

Revision ID: 0022_attribution_bitmaps
Revises: 0021_dropoff_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022_attribution_bitmaps"
down_revision: str | Sequence[str] | None = "0021_dropoff_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create(micros: sa.types.TypeEngine) -> None:
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
        sa.Column("named_micros", micros, nullable=False),
        sa.Column("contacts", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start_ms", "channel", "touch", "field", "value"),
    )
    op.execute("UPDATE rollup_state SET built = false, rebuild_token = NULL")


def upgrade() -> None:
    op.drop_table("rollup_attribution_sets")
    _create(sa.String(length=64))


def downgrade() -> None:
    op.drop_table("rollup_attribution_sets")
    _create(sa.BigInteger())
