"""Drop the foreign key of conversation_attributes on conversations.

The writer inserts a batch's conversation attributes in the transaction that resolved the
batch's conversations, so the database check of this key only repeats that work. On
PostgreSQL it took about half of the server time of the attribute upsert (one lookup and
row lock per row). Its ON DELETE CASCADE is done explicitly by erasure and retention
(chatmw/security/erasure.py, ``UNCHECKED_REFERENCES``), as for the messages since
0018_ingest.

SQLite cannot drop a constraint in place, so the table is copied without it.

Revision ID: 0025_attribute_keys
Revises: 0024_update_room
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025_attribute_keys"
down_revision: str | Sequence[str] | None = "0024_update_room"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "conversation_attributes"
# A name for the unnamed foreign key of the initial schema, so the SQLite copy can drop it.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_KEY = "fk_conversation_attributes_conversation_id_conversations"


def _has_statistics(bind: sa.Connection) -> bool:
    """Return whether ANALYZE has stored planner statistics of the table on SQLite."""
    if not sa.inspect(bind).has_table("sqlite_stat1"):
        return False
    row = bind.exec_driver_sql(f"SELECT 1 FROM sqlite_stat1 WHERE tbl = '{_TABLE}' LIMIT 1")
    return row.first() is not None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        analysed = _has_statistics(bind)
        with op.batch_alter_table(_TABLE, naming_convention=_NAMING) as batch:
            batch.drop_constraint(_KEY, type_="foreignkey")
        if analysed:
            # The copy drops the table's statistics, which the planner uses for its joins.
            op.execute(f"ANALYZE {_TABLE}")
        return
    for foreign_key in sa.inspect(bind).get_foreign_keys(_TABLE):
        if foreign_key["constrained_columns"] == ["conversation_id"]:
            op.drop_constraint(foreign_key["name"], _TABLE, type_="foreignkey")


def downgrade() -> None:
    # NOTE: attributes whose conversation was deleted by something other than erasure and
    # retention make this fail; delete them first.
    with op.batch_alter_table(_TABLE, naming_convention=_NAMING) as batch:
        batch.create_foreign_key(_KEY, "conversations", ["conversation_id"], ["id"],
                                 ondelete="CASCADE")
