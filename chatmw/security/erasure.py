"""Erasure of one person, and purging of data older than a retention period.

What is removed, for a person on one channel:

1. the steps and user tables registered in a :class:`DataRegistry` (features add theirs);
2. rows of any table with a ``user_id`` column (and, where it has one, a ``channel``
   column) that name the person, and rows with a ``conversation_external_id`` that names
   one of the person's conversations;
3. delivery statuses of the messages in the person's conversations;
4. every row that references, through a foreign key, the person's contacts,
   conversations or messages, found by reading the database's own foreign keys (so a
   table added later is covered without registering it), the messages of those contacts
   and conversations and the attributes of those conversations (whose ids have no foreign
   key, see ``UNCHECKED_REFERENCES``), and then those rows themselves;
5. unparsed payloads whose body contains the platform id (when it is known);
6. the person's rows in the metric rollups, which are then marked for a rebuild.

Points 2 and 4 work from the schema in the database, not from imported model modules, so
a feature whose module was not imported in this process is still covered.

Retention (:func:`purge_older_than`) removes conversations whose last message is older
than the cutoff (with everything that references them), contacts last seen before it,
and touches, exposures, statuses and payloads that happened before it. A conversation
still active after the cutoff is kept whole, its older messages included. The metric
rollups are marked for a rebuild, because they still count the removed rows.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Engine, MetaData, Table, delete, select
from sqlalchemy.orm import Session

from chatmw.store.identity import CHUNK

__all__ = [
    "DataRegistry",
    "ErasureSubject",
    "ErasureReport",
    "REGISTRY",
    "erase_person",
    "purge_older_than",
    "parse_user",
]

logger = logging.getLogger("chatmw")

# Tables that hold no personal data and are never erased or purged.
KEPT_TABLES = frozenset({"alembic_version", "api_keys", "chatmw_secrets", "erasure_records"})
ROOT_TABLES = ("contacts", "conversations", "messages")
# Rollup tables keyed by contact id (see chatmw/store/models_rollups.py).
ROLLUP_CONTACT_TABLES = (
    "rollup_users",
    "rollup_starters",
    "rollup_firsts",
    "rollup_participants",
    "rollup_changes",
    "rollup_lead_links",
    "rollup_orders",
    "rollup_proactive",
    "rollup_writers",
    "rollup_exposed",
    "rollup_attribution",
)
# Rollup tables whose rows contain contacts as bitmaps, emptied whole.
ROLLUP_BITSET_TABLES = ("rollup_contact_sets", "rollup_attribution_sets")
# Columns that date a row of a table with a user_id column, for retention.
TIME_COLUMNS = ("occurred_at_ms", "created_at_ms", "received_at_ms")
DAY_MS = 86_400_000
# Columns that hold ids of another table without a foreign key, as (table, column, parent
# table). The writer resolves these ids in the transaction that inserts the row, so the
# database does not check them. The closure deletes their rows with the parents.
UNCHECKED_REFERENCES = (("messages", "conversation_id", "conversations"),
                        ("messages", "contact_id", "contacts"),
                        ("conversation_attributes", "conversation_id", "conversations"))


@dataclass(frozen=True, slots=True)
class ErasureSubject:
    """The person being erased: their stored ids, and the rows found for them."""

    channel: str
    stored_ids: tuple[str, ...]
    raw_user_id: str | None
    contact_ids: tuple[int, ...]
    conversation_ids: tuple[int, ...]
    conversation_external_ids: tuple[str, ...]
    message_ids: tuple[int, ...]


@dataclass(slots=True)
class ErasureReport:
    """The result of one erasure: rows removed per table, and the confirmation code."""

    channel: str
    removed: dict[str, int]
    confirmation_code: str

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    def as_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "removed": dict(sorted(self.removed.items())),
                "total": self.total, "confirmation_code": self.confirmation_code}


ErasureStep = Callable[[Session, ErasureSubject], int]
RetentionStep = Callable[[Session, int], int]


@dataclass(slots=True)
class DataRegistry:
    """Tables and steps that features add, so that erasure and retention cover their data.

    Tables linked by a foreign key to contacts, conversations or messages, and tables with
    a ``user_id`` column, are found without registering. Register what those rules miss,
    such as a table keyed by an e-mail address or data kept outside the database.
    """

    erasure_steps: dict[str, ErasureStep] = field(default_factory=dict)
    user_tables: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    retention_steps: dict[str, RetentionStep] = field(default_factory=dict)
    retention_tables: dict[str, str] = field(default_factory=dict)

    def add_erasure_step(self, name: str, step: ErasureStep) -> None:
        """Run ``step(session, subject)`` in every erasure; it returns the rows it removed."""
        self.erasure_steps[name] = step

    def add_user_table(self, table: str, user_column: str = "user_id",
                       channel_column: str | None = "channel") -> None:
        """Erase rows of ``table`` whose ``user_column`` names the person."""
        self.user_tables[table] = (user_column, channel_column)

    def add_retention_table(self, table: str, time_column: str) -> None:
        """Purge rows of ``table`` whose ``time_column`` (epoch ms) is before the cutoff."""
        self.retention_tables[table] = time_column

    def add_retention_step(self, name: str, step: RetentionStep) -> None:
        """Run ``step(session, cutoff_ms)`` in every purge; it returns the rows it removed."""
        self.retention_steps[name] = step


# The registry the CLI and the admin API use; features add to it when imported.
REGISTRY = DataRegistry()


def parse_user(value: str) -> tuple[str, str]:
    """Split ``CHANNEL:ID`` (for example ``whatsapp:4915100000001``) into its parts."""
    channel, separator, user_id = value.partition(":")
    if not separator or not channel or not user_id:
        raise ValueError(f"expected CHANNEL:ID (for example whatsapp:4915100000001), got {value!r}")
    return channel, user_id


# Schema helpers


def _reflect(session: Session) -> MetaData:
    metadata = MetaData()
    metadata.reflect(bind=session.connection())
    return metadata


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), CHUNK):
        yield values[start:start + CHUNK]


def _select_ids(session: Session, column: Column[Any], where: Column[Any],
                values: Iterable[Any]) -> set[Any]:
    found: set[Any] = set()
    for chunk in _chunks(sorted(set(values), key=str)):
        found.update(session.scalars(select(column).where(where.in_(chunk))))
    return found


def _delete_in(session: Session, table: Table, column: Column[Any], values: Iterable[Any],
               extra: Any = None) -> int:
    removed = 0
    for chunk in _chunks(sorted(set(values), key=str)):
        statement = delete(table).where(column.in_(chunk))
        if extra is not None:
            statement = statement.where(extra)
        removed += session.execute(statement).rowcount or 0
    return removed


def _single_pk(table: Table) -> Column[Any] | None:
    columns = list(table.primary_key.columns)
    return columns[0] if len(columns) == 1 else None


def _add(removed: dict[str, int], name: str, count: int) -> None:
    if count:
        removed[name] = removed.get(name, 0) + count


def _delete_closure(session: Session, metadata: MetaData, roots: dict[str, set[Any]],
                    removed: dict[str, int]) -> None:
    """Delete the ``roots`` rows (primary keys per table) and every row referencing them."""
    targets = {name: set(ids) for name, ids in roots.items() if ids}
    leaves: list[tuple[Table, Column[Any], set[Any]]] = []
    unchecked = _unchecked_references(metadata)
    references = _foreign_key_references(metadata) + unchecked
    pending = list(targets)
    while pending:
        parent = pending.pop(0)
        for table, column, parent_name in references:
            if parent_name != parent:
                continue
            pk = _single_pk(table)
            if pk is None:
                leaves.append((table, column, set(targets[parent])))
                continue
            found = _select_ids(session, pk, column, targets[parent])
            new = found - targets.get(table.name, set())
            if new:
                targets.setdefault(table.name, set()).update(new)
                pending.append(table.name)
    # Children before parents: the reverse of the dependency order.
    for table in reversed(metadata.sorted_tables):
        for leaf, column, ids in leaves:
            if leaf is table:
                _add(removed, table.name, _delete_in(session, table, column, ids))
        pk = _single_pk(table)
        if pk is not None and targets.get(table.name):
            _add(removed, table.name, _delete_in(session, table, pk, targets[table.name]))
    # Rows stored since the reads above, by a writer (on PostgreSQL) whose transaction had
    # updated a removed row: the delete of that row waited for its commit. A writer that
    # updates a row after its delete finds it missing and writes its batch again.
    for table, column, parent in unchecked:
        if targets.get(parent):
            _add(removed, table.name, _delete_in(session, table, column, targets[parent]))


def _foreign_key_references(metadata: MetaData) -> list[tuple[Table, Column[Any], str]]:
    # Each (table, column, parent table name) of a foreign key.
    return [(table, foreign_key.parent, foreign_key.column.table.name)
            for table in metadata.sorted_tables if table.name not in KEPT_TABLES
            for foreign_key in table.foreign_keys]


def _unchecked_references(metadata: MetaData) -> list[tuple[Table, Column[Any], str]]:
    # The UNCHECKED_REFERENCES of this database that no foreign key covers.
    references = []
    for name, column_name, parent in UNCHECKED_REFERENCES:
        table = metadata.tables.get(name)
        if table is None or column_name not in table.c:
            continue
        column = table.c[column_name]
        if not any(fk.column.table.name == parent for fk in column.foreign_keys):
            references.append((table, column, parent))
    return references


# Erasure


def _find_subject(session: Session, metadata: MetaData, channel: str,
                  stored_ids: tuple[str, ...], conversation_ids: tuple[str, ...],
                  raw_user_id: str | None) -> ErasureSubject:
    contacts = metadata.tables["contacts"]
    conversations = metadata.tables["conversations"]
    messages = metadata.tables["messages"]
    contact_ids = set(session.scalars(select(contacts.c.id).where(
        contacts.c.channel == channel, contacts.c.external_id.in_(stored_ids))))
    owned = _select_ids(session, conversations.c.id, conversations.c.contact_id, contact_ids)
    named = set(session.scalars(select(conversations.c.id).where(
        conversations.c.channel == channel, conversations.c.external_id.in_(conversation_ids))))
    conversation_set = owned | named
    external = _select_ids(session, conversations.c.external_id, conversations.c.id,
                           conversation_set)
    message_ids = (_select_ids(session, messages.c.id, messages.c.conversation_id, conversation_set)
                   | _select_ids(session, messages.c.id, messages.c.contact_id, contact_ids))
    return ErasureSubject(
        channel=channel, stored_ids=stored_ids, raw_user_id=raw_user_id,
        contact_ids=tuple(sorted(contact_ids)), conversation_ids=tuple(sorted(conversation_set)),
        conversation_external_ids=tuple(sorted(external)), message_ids=tuple(sorted(message_ids)))


def _erase_user_columns(session: Session, metadata: MetaData, subject: ErasureSubject,
                        registry: DataRegistry, removed: dict[str, int]) -> None:
    rules: dict[str, tuple[str, str | None]] = {}
    for table in metadata.sorted_tables:
        if table.name in KEPT_TABLES or table.name in ROOT_TABLES:
            continue
        if "user_id" in table.c:
            rules[table.name] = ("user_id", "channel" if "channel" in table.c else None)
    rules.update(registry.user_tables)
    ids = set(subject.stored_ids) | ({subject.raw_user_id} if subject.raw_user_id else set())
    for name, (user_column, channel_column) in rules.items():
        table = metadata.tables.get(name)
        if table is None:
            continue
        extra = table.c[channel_column] == subject.channel if channel_column else None
        _add(removed, name, _delete_in(session, table, table.c[user_column], ids, extra))
    for table in metadata.sorted_tables:
        if table.name in KEPT_TABLES or "conversation_external_id" not in table.c:
            continue
        extra = table.c.channel == subject.channel if "channel" in table.c else None
        _add(removed, table.name, _delete_in(session, table, table.c.conversation_external_id,
                                             subject.conversation_external_ids, extra))


def _erase_statuses(session: Session, metadata: MetaData, subject: ErasureSubject,
                    removed: dict[str, int]) -> None:
    messages, statuses = metadata.tables["messages"], metadata.tables["message_statuses"]
    pairs: set[tuple[str, str]] = set()
    for chunk in _chunks(list(subject.message_ids)):
        pairs.update(session.execute(
            select(messages.c.channel, messages.c.platform_message_id)
            .where(messages.c.id.in_(chunk), messages.c.platform_message_id.is_not(None))))
    by_channel: dict[str, set[str]] = {}
    for channel, platform_id in pairs:
        by_channel.setdefault(channel, set()).add(platform_id)
    for channel, platform_ids in by_channel.items():
        _add(removed, "message_statuses", _delete_in(
            session, statuses, statuses.c.platform_message_id, platform_ids,
            statuses.c.channel == channel))


def _erase_raw_payloads(session: Session, metadata: MetaData, subject: ErasureSubject,
                        removed: dict[str, int]) -> None:
    table = metadata.tables.get("raw_payloads")
    if table is None or not subject.raw_user_id:
        return
    needle = subject.raw_user_id.encode("utf-8")
    matching: list[int] = []
    last_id = 0
    while True:  # scanned in pages in Python: a LIKE on bytes is not portable
        rows = session.execute(select(table.c.id, table.c.body)
                               .where(table.c.channel == subject.channel, table.c.id > last_id)
                               .order_by(table.c.id).limit(CHUNK)).all()
        if not rows:
            break
        matching.extend(row_id for row_id, body in rows if body and needle in bytes(body))
        last_id = rows[-1][0]
    _add(removed, "raw_payloads", _delete_in(session, table, table.c.id, matching))


def _invalidate_rollups(session: Session, metadata: MetaData, contact_ids: Iterable[int],
                        removed: dict[str, int]) -> None:
    """Remove the contacts' rollup rows and mark the rollups unbuilt.

    The refresher cannot see deleted raw rows, so metrics read raw rows until its next
    refresh rebuilds every rollup row.
    """
    if "rollup_state" not in metadata.tables:
        return
    # Updating the state row first waits for a rebuild step that holds its lock, and stops
    # the rebuild, so no rebuild step inserts the contacts' rows again after the delete.
    session.execute(
        metadata.tables["rollup_state"].update().values(built=False, rebuild_token=None))
    # The day and week bitmaps contain the contacts too; the rebuild makes them again.
    for name in ROLLUP_BITSET_TABLES:
        if name in metadata.tables:
            _add(removed, name, session.execute(metadata.tables[name].delete()).rowcount or 0)
    contacts = set(contact_ids)
    for name in ROLLUP_CONTACT_TABLES:
        if contacts and name in metadata.tables:
            table = metadata.tables[name]
            _add(removed, name, _delete_in(session, table, table.c.contact_id, contacts))


def erase_person(engine: Engine, channel: str, user_id: str, *,
                 stored_ids: Sequence[str] = (), conversation_ids: Sequence[str] = (),
                 raw_user_id: str | None = None, registry: DataRegistry = REGISTRY,
                 origin: str = "api", confirmation_code: str | None = None) -> ErasureReport:
    """Remove everything stored about ``user_id`` on ``channel`` in one transaction.

    - ``user_id``: the id as stored.
    - ``stored_ids``: other ids the person may be stored under (the platform id).
    - ``conversation_ids``: conversation ids that may name them (a user id used as
      conversation id, and its pseudonym).
    - ``raw_user_id``: the platform id, searched for in unparsed payloads.

    :meth:`chatmw.security.privacy.Privacy.erasure_ids` builds these arguments. An
    ``erasure_records`` row with the counts, but without any id of the person, is kept.
    """
    ids = tuple(dict.fromkeys([user_id, *stored_ids]))
    code = confirmation_code or secrets.token_hex(12)
    removed: dict[str, int] = {}
    requested_ms = int(time.time() * 1000)
    with Session(engine) as session, session.begin():
        metadata = _reflect(session)
        subject = _find_subject(session, metadata, channel, ids,
                                tuple(dict.fromkeys([*ids, *conversation_ids])), raw_user_id)
        for name, step in registry.erasure_steps.items():
            _add(removed, name, step(session, subject))
        _erase_user_columns(session, metadata, subject, registry, removed)
        _erase_statuses(session, metadata, subject, removed)
        _delete_closure(session, metadata, {
            "contacts": set(subject.contact_ids), "conversations": set(subject.conversation_ids),
            "messages": set(subject.message_ids)}, removed)
        _erase_raw_payloads(session, metadata, subject, removed)
        _invalidate_rollups(session, metadata, subject.contact_ids, removed)
        if "erasure_records" in metadata.tables:
            session.execute(metadata.tables["erasure_records"].insert().values(
                confirmation_code=code, origin=origin, channel=channel,
                requested_at_ms=requested_ms, completed_at_ms=int(time.time() * 1000),
                removed=removed))
    report = ErasureReport(channel=channel, removed=removed, confirmation_code=code)
    logger.info("erasure %s (%s) on %s: %d rows removed", code, origin, channel, report.total)
    return report


# Retention


def purge_older_than(engine: Engine, days: float, *, registry: DataRegistry = REGISTRY,
                     now_ms: int | None = None) -> dict[str, int]:
    """Remove data older than ``days`` days (see the module documentation); rows per table."""
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - int(days * DAY_MS)
    removed: dict[str, int] = {}
    with Session(engine) as session, session.begin():
        metadata = _reflect(session)
        for name, step in registry.retention_steps.items():
            _add(removed, name, step(session, cutoff))
        _purge_dated(session, metadata, registry, cutoff, removed)
        conversations, contacts = metadata.tables["conversations"], metadata.tables["contacts"]
        old_conversations = set(session.scalars(
            select(conversations.c.id).where(conversations.c.last_message_at_ms < cutoff)))
        old_contacts = set(session.scalars(
            select(contacts.c.id).where(contacts.c.last_seen_ms < cutoff)))
        # A contact with a conversation still inside the period stays.
        active: set[int] = set()
        for chunk in _chunks(sorted(old_contacts)):
            for conversation_id, contact_id in session.execute(
                    select(conversations.c.id, conversations.c.contact_id)
                    .where(conversations.c.contact_id.in_(chunk))):
                if conversation_id not in old_conversations:
                    active.add(contact_id)
        _delete_closure(session, metadata, {"conversations": old_conversations,
                                            "contacts": old_contacts - active}, removed)
        _invalidate_rollups(session, metadata, old_contacts - active, removed)
    logger.info("retention purge before %d: %d rows removed", cutoff, sum(removed.values()))
    return removed


def _purge_dated(session: Session, metadata: MetaData, registry: DataRegistry, cutoff: int,
                 removed: dict[str, int]) -> None:
    rules: dict[str, str] = {"touches": "occurred_at_ms", "exposures": "occurred_at_ms",
                             "message_statuses": "occurred_at_ms",
                             "raw_payloads": "received_at_ms"}
    for table in metadata.sorted_tables:
        if table.name in KEPT_TABLES or table.name in ROOT_TABLES or "user_id" not in table.c:
            continue
        column = next((name for name in TIME_COLUMNS if name in table.c), None)
        if column is not None:
            rules.setdefault(table.name, column)
    rules.update(registry.retention_tables)
    for name, column in rules.items():
        table = metadata.tables.get(name)
        if table is None:
            continue
        # Rows that other rows reference go through the closure below instead.
        pk = _single_pk(table)
        if pk is not None and _is_referenced(metadata, table):
            ids = set(session.scalars(select(pk).where(table.c[column] < cutoff)))
            _delete_closure(session, metadata, {name: ids}, removed)
            continue
        result = session.execute(delete(table).where(table.c[column] < cutoff))
        _add(removed, name, result.rowcount or 0)


def _is_referenced(metadata: MetaData, table: Table) -> bool:
    return any(fk.column.table is table for other in metadata.sorted_tables
               for fk in other.foreign_keys)
