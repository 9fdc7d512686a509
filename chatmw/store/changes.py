"""The change log: conversations and contacts whose rows changed without a new message.

The rollup refresher finds new messages and conversations through their ids. Other
changes (a conversation update, a survey answer, a conversion) leave no new id, so the
code that makes them calls :func:`record_changes` in the same transaction. The refresher
then marks dirty the slots of each recorded conversation, and the start slots of every
conversation of each recorded contact (``chatmw.metrics.rollup_refresh.changes_after``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

__all__ = ["record_changes"]


def record_changes(
    connection: Connection | Session,
    conversations: Iterable[tuple[int, int | None]] = (),
    contacts: Iterable[int | None] = (),
) -> int:
    """Add change-log rows for ``conversations`` and ``contacts``; return the rows added.

    ``conversations`` are ``(conversation id, start in ms before the change)`` pairs, with
    ``None`` as the start when the change cannot have moved it. ``contacts`` are contact
    ids whose conversations all changed (``None`` entries are skipped). Repeated entries
    are written once, by one statement in the caller's transaction, so the rows commit
    or roll back with the change itself.
    """
    starts: dict[int, set[int | None]] = {}
    for conversation_id, start_ms in conversations:
        starts.setdefault(int(conversation_id), set()).add(
            None if start_ms is None else int(start_ms)
        )
    rows: list[tuple[int | None, int | None, int | None]] = []
    for conversation_id, known in sorted(starts.items()):
        # The current start is always dirtied, so a None entry adds nothing to a real one.
        moved = sorted(start for start in known if start is not None)
        for start_ms in moved or [None]:
            rows.append((conversation_id, None, start_ms))
    for contact_id in sorted({int(contact) for contact in contacts if contact is not None}):
        rows.append((None, contact_id, None))
    if rows:
        bind = connection.connection() if isinstance(connection, Session) else connection
        _insert(bind, rows, int(time.time() * 1000))
    return len(rows)


def _insert(
    connection: Connection, rows: list[tuple[int | None, int | None, int | None]], at_ms: int
) -> None:
    # The writer logs a few hundred rows per batch. The driver's executemany on SQLite, and
    # one JSON document on PostgreSQL, took about a third of the time of SQLAlchemy's
    # executemany of the same rows when the writer was timed on batches with updates.
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_INSERT, {"rows": json.dumps(rows), "at_ms": at_ms})
        return
    connection.exec_driver_sql(_SQLITE_INSERT, [(*row, at_ms) for row in rows])


_SQLITE_INSERT = (
    "INSERT INTO rollup_changes (conversation_id, contact_id, start_ms, at_ms) VALUES (?, ?, ?, ?)"
)
_PG_INSERT = text(
    "INSERT INTO rollup_changes (conversation_id, contact_id, start_ms, at_ms) "
    "SELECT CAST(e.v->>0 AS INTEGER), CAST(e.v->>1 AS INTEGER), CAST(e.v->>2 AS BIGINT), "
    "CAST(:at_ms AS BIGINT) FROM jsonb_array_elements(CAST(:rows AS JSONB)) AS e(v)"
)
