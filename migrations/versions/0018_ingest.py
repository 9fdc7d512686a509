"""Drop the foreign keys of messages on conversations and contacts.

The writer resolves a batch's conversation and contact ids in the batch's own transaction
before it inserts the messages, so the database checks of these keys only repeat work. On
PostgreSQL they cost about two thirds of the insert of a batch of messages (one lookup and
row lock per message and key). Their ON DELETE actions (CASCADE on conversations, SET NULL
on contacts) are done explicitly by erasure and retention (chatmw/security/erasure.py).

SQLite cannot drop a constraint in place, so the messages table is copied without them.

Revision ID: 0018_ingest
Revises: 0017_cohort_rollups
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_ingest"
down_revision: str | Sequence[str] | None = "0017_cohort_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Names for the unnamed foreign keys of the initial schema, so the SQLite copy can drop them.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_DROPPED = (("conversation_id", "conversations", "CASCADE"), ("contact_id", "contacts", "SET NULL"))


def _has_statistics(bind: sa.Connection) -> bool:
    """Whether ANALYZE has stored planner statistics of the messages table on SQLite."""
    if not sa.inspect(bind).has_table("sqlite_stat1"):
        return False
    row = bind.exec_driver_sql("SELECT 1 FROM sqlite_stat1 WHERE tbl = 'messages' LIMIT 1")
    return row.first() is not None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        analysed = _has_statistics(bind)
        with op.batch_alter_table("messages", naming_convention=_NAMING) as batch:
            for column, parent, _ in _DROPPED:
                batch.drop_constraint(f"fk_messages_{column}_{parent}", type_="foreignkey")
        if analysed:
            # The copy drops the table's statistics; without them the planner may choose
            # other indexes for queries that join messages.
            op.execute("ANALYZE messages")
        return
    for foreign_key in sa.inspect(op.get_bind()).get_foreign_keys("messages"):
        if foreign_key["constrained_columns"] in (["conversation_id"], ["contact_id"]):
            op.drop_constraint(foreign_key["name"], "messages", type_="foreignkey")


def downgrade() -> None:
    # NOTE: messages whose conversation or contact was deleted by something other than
    # erasure and retention make this fail; delete them first.
    with op.batch_alter_table("messages", naming_convention=_NAMING) as batch:
        for column, parent, action in _DROPPED:
            batch.create_foreign_key(
                f"fk_messages_{column}_{parent}", parent, [column], ["id"], ondelete=action
            )
