"""Contacts and conversations: find or create them for a batch of events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, bindparam, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from chatmw.store.models import Contact, Conversation

__all__ = [
    "bulk_update",
    "insert_ignore",
    "upsert",
    "resolve_contacts",
    "resolve_named_conversations",
    "assign_sessions",
    "OpenConversation",
    "CHUNK",
]

# Rows per IN list or multi-row INSERT: below SQLite's default limit of 32766 variables.
CHUNK = 500


def _insert(session: Session, table: Table) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")


def insert_ignore(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                  conflict: Sequence[str]) -> None:
    """Insert ``rows``, skipping each row whose ``conflict`` columns already exist."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        _insert_ignore_unnest(session, table, rows, conflict)
        return
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        statement = _insert(session, table).on_conflict_do_nothing(index_elements=conflict)
        session.execute(statement, list(chunk))


def _insert_ignore_unnest(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                          conflict: Sequence[str]) -> None:
    # One INSERT ... SELECT FROM unnest(arrays) per batch: psycopg's executemany sends a
    # statement per row, and a multi-row VALUES list is compiled anew for every length.
    dialect = session.get_bind().dialect
    names = list(rows[0])
    casts = []
    parameters: dict[str, list[Any]] = {}
    for name in names:
        column_type = table.c[name].type
        values = [row.get(name) for row in rows]
        type_name = column_type.compile(dialect=dialect)
        if type_name in ("JSON", "JSONB"):
            processor = column_type.bind_processor(dialect)
            values = [None if v is None or processor is None else processor(v) for v in values]
            casts.append(f"CAST(CAST(:{name} AS TEXT[]) AS {type_name}[])")
        else:
            casts.append(f"CAST(:{name} AS {type_name}[])")
        parameters[name] = values
    statement = text(
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"SELECT * FROM unnest({', '.join(casts)}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    )
    session.execute(statement, parameters)


def upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]],
           conflict: Sequence[str], update_columns: Sequence[str]) -> None:
    """Insert ``rows``; where the ``conflict`` columns exist, overwrite ``update_columns``."""
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        if not chunk:
            continue
        statement = _insert(session, table)
        statement = statement.on_conflict_do_update(
            index_elements=conflict,
            set_={name: statement.excluded[name] for name in update_columns},
        )
        session.execute(statement, list(chunk))


def bulk_update(session: Session, table: Table, rows: Sequence[dict[str, Any]],
                columns: Sequence[str]) -> None:
    """Set ``columns`` on the rows of ``table`` whose ``id`` is each row's ``id``.

    PostgreSQL gets one ``UPDATE ... FROM unnest(arrays)`` statement, because executemany
    sends a statement per row; SQLite runs in process, where executemany is as fast.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        statement = (update(table).where(table.c.id == bindparam("_id"))
                     .values({name: bindparam(f"_{name}") for name in columns}))
        session.execute(statement, [{f"_{k}": v for k, v in row.items()} for row in rows])
        return
    names = ("id", *columns)
    arrays = ", ".join(
        f"CAST(:{name} AS {table.c[name].type.compile(dialect=dialect)}[])" for name in names)
    assignments = ", ".join(f"{name} = changes.{name}" for name in columns)
    statement = text(
        f"UPDATE {table.name} SET {assignments} "
        f"FROM unnest({arrays}) AS changes({', '.join(names)}) "
        f"WHERE {table.name}.id = changes.id"
    )
    session.execute(statement, {name: [row[name] for row in rows] for name in names})


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def resolve_contacts(session: Session, identities: dict[tuple[str, str], int]) -> dict[
        tuple[str, str], int]:
    """Return contact ids for ``(channel, external_id)`` pairs, creating missing contacts.

    ``identities`` maps each pair to the earliest time (ms) it was seen in the batch.
    Concurrent writers are safe: the unique constraint decides, and ids are read back.
    """
    if not identities:
        return {}
    table = Contact.__table__
    keys = sorted(identities)
    rows = [
        {"channel": channel, "external_id": external, "first_seen_ms": identities[(channel, external)],
         "last_seen_ms": identities[(channel, external)]}
        for channel, external in keys
    ]
    insert_ignore(session, table, rows, ["channel", "external_id"])
    found: dict[tuple[str, str], int] = {}
    for chunk in _chunks(keys):
        statement = select(Contact.channel, Contact.external_id, Contact.id).where(
            tuple_(Contact.channel, Contact.external_id).in_(list(chunk))
        )
        for channel, external, contact_id in session.execute(statement):
            found[(channel, external)] = contact_id
    return found


def resolve_named_conversations(
    session: Session, wanted: dict[tuple[str, str], tuple[int, int | None]]
) -> dict[tuple[str, str], int]:
    """Return conversation ids for ``(channel, external_id)``, creating missing ones.

    ``wanted`` maps each pair to ``(earliest time in ms, contact id)``.
    """
    if not wanted:
        return {}
    keys = sorted(wanted)
    rows = [
        {"channel": channel, "external_id": external, "contact_id": wanted[(channel, external)][1],
         "started_at_ms": wanted[(channel, external)][0],
         "last_message_at_ms": wanted[(channel, external)][0], "message_count": 0,
         "user_message_count": 0, "handed_off": False}
        for channel, external in keys
    ]
    insert_ignore(session, Conversation.__table__, rows, ["channel", "external_id"])
    found: dict[tuple[str, str], int] = {}
    for chunk in _chunks(keys):
        statement = select(Conversation.channel, Conversation.external_id, Conversation.id).where(
            tuple_(Conversation.channel, Conversation.external_id).in_(list(chunk))
        )
        for channel, external, conversation_id in session.execute(statement):
            found[(channel, external)] = conversation_id
    return found


@dataclass(slots=True)
class OpenConversation:
    """The latest conversation of a contact, as sessionisation sees it."""

    id: int
    started_at_ms: int
    last_message_at_ms: int
    ended_at_ms: int | None
    key: tuple[str, str] | None = None


def _lock_contacts(session: Session, contact_ids: Sequence[int]) -> None:
    # Two processes that sessionise the same contact at once would each start a conversation.
    # Row locks, taken in id order so that writers cannot deadlock, serialise them on
    # PostgreSQL. SQLite allows one writer at a time, so it needs no lock.
    if session.get_bind().dialect.name != "postgresql":
        return
    for chunk in _chunks(sorted(contact_ids)):
        session.execute(
            select(Contact.id).where(Contact.id.in_(list(chunk))).order_by(Contact.id).with_for_update()
        )


def _latest_conversations(session: Session, channel_contacts: Sequence[tuple[str, int]]) -> dict[
        tuple[str, int], OpenConversation]:
    latest: dict[tuple[str, int], OpenConversation] = {}
    by_channel: dict[str, list[int]] = defaultdict(list)
    for channel, contact_id in channel_contacts:
        by_channel[channel].append(contact_id)
    for channel, contact_ids in by_channel.items():
        for chunk in _chunks(contact_ids):
            statement = (
                select(Conversation.contact_id, Conversation.id, Conversation.started_at_ms,
                       Conversation.last_message_at_ms, Conversation.ended_at_ms)
                .where(Conversation.channel == channel, Conversation.contact_id.in_(list(chunk)))
                .order_by(Conversation.contact_id, Conversation.started_at_ms)
            )
            for contact_id, conversation_id, started, last, ended in session.execute(statement):
                # Rows come in start order, so the last one seen is the latest.
                latest[(channel, contact_id)] = OpenConversation(conversation_id, started, last, ended)
    return latest


def _covering_conversation(session: Session, channel: str, contact_id: int, at_ms: int,
                           gap_ms: int) -> OpenConversation | None:
    statement = (
        select(Conversation.id, Conversation.started_at_ms, Conversation.last_message_at_ms,
               Conversation.ended_at_ms)
        .where(
            Conversation.channel == channel,
            Conversation.contact_id == contact_id,
            Conversation.started_at_ms <= at_ms + gap_ms,
            or_(Conversation.last_message_at_ms >= at_ms - gap_ms,
                and_(Conversation.started_at_ms >= at_ms - gap_ms)),
        )
        .order_by(Conversation.started_at_ms.desc())
        .limit(1)
    )
    row = session.execute(statement).first()
    if row is None:
        return None
    return OpenConversation(row[0], row[1], row[2], row[3])


def assign_sessions(session: Session, items: Sequence[tuple[str, int, str, int]],
                    gap_ms: int) -> dict[int, int]:
    """Assign messages without a conversation id to conversations by silence.

    ``items`` are ``(channel, contact id, contact external id, time in ms)``, one per
    message, and the result maps each item's index to a conversation id. A message joins
    the contact's latest conversation on that channel when it comes at most ``gap_ms``
    after that conversation's last message, and starts a new conversation otherwise. A late
    message from before the latest conversation joins the conversation that covers its time.
    The conversations' start and end times are not updated here: the writer recomputes
    them from the stored messages.
    """
    if not items:
        return {}
    pairs = sorted({(channel, contact_id) for channel, contact_id, _, _ in items})
    _lock_contacts(session, [contact_id for _, contact_id in pairs])
    latest = _latest_conversations(session, pairs)
    order = sorted(range(len(items)), key=lambda index: items[index][3])
    assigned: dict[int, int] = {}
    # Conversations this batch starts are known by their new external id until inserted.
    pending: dict[int, tuple[str, str]] = {}
    new_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for index in order:
        channel, contact_id, external, at_ms = items[index]
        current = latest.get((channel, contact_id))
        if current is not None and at_ms < current.started_at_ms - gap_ms:
            covering = _covering_conversation(session, channel, contact_id, at_ms, gap_ms)
            if covering is not None:
                assigned[index] = covering.id
                continue
        elif current is not None and at_ms - current.last_message_at_ms <= gap_ms:
            current.last_message_at_ms = max(current.last_message_at_ms, at_ms)
            if current.id > 0:
                assigned[index] = current.id
            else:
                pending[index] = new_rows_key(current)
            continue
        external_id = f"{external}@{at_ms}"
        new_rows[(channel, external_id)] = {
            "channel": channel, "external_id": external_id, "contact_id": contact_id,
            "started_at_ms": at_ms, "last_message_at_ms": at_ms, "message_count": 0,
            "user_message_count": 0, "handed_off": False}
        created = OpenConversation(-len(new_rows), at_ms, at_ms, None)
        created.key = (channel, external_id)
        if current is None or at_ms >= current.started_at_ms:
            latest[(channel, contact_id)] = created
        pending[index] = (channel, external_id)
    if new_rows:
        insert_ignore(session, Conversation.__table__, list(new_rows.values()), ["channel", "external_id"])
        found = resolve_named_conversations(
            session, {key: (row["started_at_ms"], row["contact_id"]) for key, row in new_rows.items()})
        for index, key in pending.items():
            assigned[index] = found[key]
    return assigned


def new_rows_key(conversation: OpenConversation) -> tuple[str, str]:
    """Return the ``(channel, external_id)`` of a conversation this batch started."""
    if conversation.key is None:
        raise ValueError("conversation has no key: it was not started by this batch")
    return conversation.key
