"""Room for in-page updates: conversations and contacts get a fill factor of 70 on PostgreSQL.

The writer updates a conversation and its contact with every batch of their messages.
PostgreSQL can then keep the new row version on the same page, without touching the
indexes (a heap-only tuple update), only when the page has free space. Pages filled to 70 %
leave that space. The setting applies to pages written from now on. SQLite has no such
setting, so this revision changes nothing there.

Revision ID: 0024_update_room
Revises: 0023_contact_bitmaps
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0024_update_room"
down_revision: str | Sequence[str] | None = "0023_contact_bitmaps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("conversations", "contacts")
FILL_FACTOR = 70


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILL_FACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
