"""Survey addresses: platform ids of pseudonymised users, to send surveys to.

Revision ID: 0005_survey_addresses
Revises: 0005_surveys
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_survey_addresses"
down_revision: str | Sequence[str] | None = "0005_surveys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "survey_addresses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("platform_id", sa.String(length=255), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("channel", "user_id", name="uq_survey_addresses_user"),
    )


def downgrade() -> None:
    op.drop_table("survey_addresses")
