"""Survey tables: surveys, survey_sends, web_outbox, survey_config.

Revision ID: 0005_surveys
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_surveys"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "surveys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=True),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("locale", sa.String(length=16), nullable=False),
        sa.Column("basis_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("due_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("sent_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("answer_deadline_ms", sa.BigInteger(), nullable=True),
        sa.Column("comment_window_ms", sa.BigInteger(), nullable=False),
        sa.Column("comment_deadline_ms", sa.BigInteger(), nullable=True),
        sa.Column("answered_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("commented_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("reasks", sa.Integer(), nullable=False),
        sa.Column("score_range", sa.String(length=8), nullable=True),
        sa.Column("used_template", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["contact_id"], ["contacts.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("conversation_id", name="uq_surveys_conversation"),
    )
    op.create_index("ix_surveys_contact", "surveys", ["contact_id", "sent_at_ms"])
    op.create_index("ix_surveys_state", "surveys", ["state"])
    op.create_table(
        "survey_sends",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("survey_id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("due_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("sent_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("platform_message_id", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["survey_id"], ["surveys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("survey_id", "purpose", name="uq_survey_sends_purpose"),
    )
    op.create_index("ix_survey_sends_due", "survey_sends", ["state", "due_at_ms"])
    op.create_table(
        "web_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("delivered_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_web_outbox_pending", "web_outbox", ["user_id", "delivered_at_ms"])
    op.create_table(
        "survey_config",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("survey_config")
    op.drop_index("ix_web_outbox_pending", table_name="web_outbox")
    op.drop_table("web_outbox")
    op.drop_index("ix_survey_sends_due", table_name="survey_sends")
    op.drop_table("survey_sends")
    op.drop_index("ix_surveys_state", table_name="surveys")
    op.drop_index("ix_surveys_contact", table_name="surveys")
    op.drop_table("surveys")
