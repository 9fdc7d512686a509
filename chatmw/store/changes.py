"""The change log: conversations and contacts whose rows changed without a new message.

The rollup refresher finds new messages and conversations through their ids. Other
changes (a conversation update, a survey answer, a conversion) leave no new id, so the
code that makes them calls :func:`record_changes` in the same transaction. The refresher
then marks dirty the slots of each recorded conversation, and the start slots of every
conversation of each recorded contact (``chatmw.metrics.rollup_refresh.changes_after``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import Connection, insert
from sqlalchemy.orm import Session

from chatmw.store.models_rollups import RollupChange

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
    are written once, in one executemany statement of the caller's transaction, so the
    rows commit or roll back with the change itself.
    """
    starts: dict[int, set[int | None]] = {}
    for conversation_id, start_ms in conversations:
        starts.setdefault(int(conversation_id), set()).add(
            None if start_ms is None else int(start_ms)
        )
    at_ms = int(time.time() * 1000)
    rows: list[dict[str, int | None]] = []
    for conversation_id, known in sorted(starts.items()):
        # The current start is always dirtied, so a None entry adds nothing to a real one.
        moved = sorted(start for start in known if start is not None)
        for start_ms in moved or [None]:
            rows.append(_row(conversation_id, None, start_ms, at_ms))
    for contact_id in sorted({int(contact) for contact in contacts if contact is not None}):
        rows.append(_row(None, contact_id, None, at_ms))
    if rows:
        connection.execute(insert(RollupChange.__table__), rows)
    return len(rows)


def _row(
    conversation_id: int | None, contact_id: int | None, start_ms: int | None, at_ms: int
) -> dict[str, int | None]:
    return {
        "conversation_id": conversation_id,
        "contact_id": contact_id,
        "start_ms": start_ms,
        "at_ms": at_ms,
    }
