"""The rollup refresher: finds changed slots and recomputes them from raw rows.

A rollup row depends only on the raw rows whose times fall in its slots, so a slot is
refreshed by deleting its rows and counting the raw rows again. Inserting a duplicate
event changes no raw row, and a late message dirties the slots it and its conversation
touch, so the rollups match the raw rows after every refresh. docs/rollups.md describes
the design.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Exposure, Message
from chatmw.store.models_rollups import (
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
    SLOT_MS,
    RollupChange,
    RollupContactSets,
    RollupConversations,
    RollupFirsts,
    RollupMessages,
    RollupStarters,
    RollupState,
    RollupUsers,
)

__all__ = [
    "RefreshReport",
    "Refresher",
    "refresh",
    "rebuild",
    "invalidate",
    "slot_of",
    "slot_expression",
    "changes_after",
    "changed_contacts",
    "Changes",
    "first_starts",
    "ranked_first_starts",
    "FIRSTS_COLUMNS",
    "slot_ranges",
    "time_in_ranges",
    "lock_state",
    "time_chunks",
    "analyze_tables",
    "ROLLUP_TABLES",
    "REBUILD_LEASE_MS",
    "BEFORE_EPOCH_SLOT",
    "OVERLAP_MS",
    "REFRESH_INTERVAL_S",
]

logger = logging.getLogger("chatmw")

# Every time before the Unix epoch shares this one slot; queries never read it from rollups.
BEFORE_EPOCH_SLOT = -SLOT_MS
# Messages are read again for this long after a refresh first saw their id range. A writer
# transaction that takes ids and commits later than this is counted only after a rebuild.
OVERLAP_MS = 5 * 60 * 1000
# Seconds between two refreshes of the runtime's refresher thread.
REFRESH_INTERVAL_S = 30.0
# The span of raw rows (7 days of event time, the week rows of rollup_responses) counted per
# transaction of a rebuild. It bounds how long one rebuild step holds SQLite's write lock.
REBUILD_CHUNK_MS = LEVEL_WIDTH_MS[LEVEL_WEEK]
# Contacts per transaction when rebuilding rollup_firsts.
REBUILD_CONTACTS = 50_000
# A rebuild claimed longer ago than this (1 hour) is taken to have died; another may start.
REBUILD_LEASE_MS = 60 * 60 * 1000
# Slots deleted or read per statement.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class RefreshReport:
    """The outcome of one refresh: a full rebuild, or the number of slots recomputed."""

    rebuilt: bool
    slots: int
    watermark_id: int
    seconds: float


def slot_of(moment_ms: int) -> int:
    """Return the start of the rollup slot containing ``moment_ms``."""
    if moment_ms < 0:
        return BEFORE_EPOCH_SLOT
    return moment_ms - moment_ms % SLOT_MS


def slot_expression(column: Any) -> ColumnElement[Any]:
    """Return SQL computing :func:`slot_of` of an integer millisecond column."""
    # Integer division truncates in SQLite and PostgreSQL alike, so only times >= 0 use it.
    # The constants are inlined: PostgreSQL matches a GROUP BY expression to the selected one
    # only when their text is the same, and bound parameters get distinct names.
    width = literal_column(str(SLOT_MS))
    return case(
        (column < literal_column("0"), literal_column(str(BEFORE_EPOCH_SLOT))),
        else_=column.op("/")(width).op("*")(width),
    )


def slot_ranges(slots: Iterable[int]) -> list[tuple[int | None, int]]:
    """Merge slots into ``[start, end)`` millisecond ranges; ``None`` starts before the epoch."""
    ranges: list[tuple[int | None, int]] = []
    for slot in sorted(set(slots)):
        if slot == BEFORE_EPOCH_SLOT:
            ranges.append((None, 0))
            continue
        # The range before the epoch stays apart: the hour, day and week rows around slot
        # 0 are found from ranges that start at 0 or later (``aligned_ranges``).
        if ranges and ranges[-1][0] is not None and ranges[-1][1] == slot:
            ranges[-1] = (ranges[-1][0], slot + SLOT_MS)
        else:
            ranges.append((slot, slot + SLOT_MS))
    return ranges


def time_in_ranges(column: Any, ranges: Iterable[tuple[int | None, int]]) -> ColumnElement[bool]:
    """Return SQL true when ``column`` lies in one of ``ranges``."""
    conditions = [
        column < end if start is None else and_(column >= start, column < end)
        for start, end in ranges
    ]
    return or_(*conditions) if conditions else false()


@dataclass(slots=True)
class Changes:
    """The slots and contacts whose rollup rows messages above a watermark may have changed."""

    slots: set[int]
    contacts: set[int]


# NOTE: changes are found through new message ids, new conversation ids and the change
# log (``rollup_changes``), which records the changes that leave no new id: conversation
# updates, start moves with their old start, survey rows, conversions, leads, touches.
# A change made without chatmw.store.changes.record_changes stays unseen until the next
# rebuild, as does a row that commits more than OVERLAP_MS after taking its id.
def changes_after(
    connection: Connection,
    after_id: int,
    through_id: int | None = None,
    after_conversation_id: int | None = None,
    through_conversation_id: int | None = None,
    after_change_id: int | None = None,
    through_change_id: int | None = None,
    after_exposure_id: int | None = None,
    through_exposure_id: int | None = None,
) -> Changes:
    """Return the slots and contacts whose rollups may be stale after messages above ``after_id``.

    The slots are those of the new messages and, for each of their conversations, the
    slots of all its messages and of its start. A late message can move the start, and
    the old start was the time of one of the older messages, so both slots are included.
    The contacts are the owners of those conversations, whose first conversation may have
    moved. Conversations created above ``after_conversation_id`` count as changed too.
    The slots also include the start slots of the contacts' other conversations that
    these conversations may have made repeats, or stopped being repeats, for the
    ``resolution`` rollups (``chatmw.metrics.outcome_rollups.repeat_slots``).

    With ``after_change_id``, change-log rows above it are read as well: a recorded
    conversation counts as changed, plus the slot of its recorded start before the
    change, and a recorded contact adds the start slots of all its conversations and
    itself to the contacts.

    Exposures above ``after_exposure_id`` add their own slots.
    """
    tail = select(Message.conversation_id, Message.occurred_at_ms).where(Message.id > after_id)
    if through_id is not None:
        tail = tail.where(Message.id <= through_id)
    changes = Changes(set(), set())
    conversations: set[int] = set()
    for conversation_id, at_ms in connection.execute(tail):
        changes.slots.add(slot_of(at_ms))
        conversations.add(conversation_id)
    if after_conversation_id is not None:
        # Conversation rows created since, with or without a message.
        created = select(Conversation.id).where(Conversation.id > after_conversation_id)
        if through_conversation_id is not None:
            created = created.where(Conversation.id <= through_conversation_id)
        conversations.update(connection.execute(created).scalars())
    if after_change_id is not None:
        _add_logged(connection, changes, conversations, after_change_id, through_change_id)
    if after_exposure_id is not None:
        exposures = select(Exposure.occurred_at_ms).where(Exposure.id > after_exposure_id)
        if through_exposure_id is not None:
            exposures = exposures.where(Exposure.id <= through_exposure_id)
        changes.slots.update(slot_of(at_ms) for (at_ms,) in connection.execute(exposures))
    ids = sorted(conversations)
    # contact -> (first, last) time of each changed conversation, over its start and messages
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for index in range(0, len(ids), _CHUNK):
        chunk = ids[index : index + _CHUNK]
        bounds: dict[int, tuple[int, int]] = {}
        times = select(Message.conversation_id, Message.occurred_at_ms).where(
            Message.conversation_id.in_(chunk)
        )
        for conversation_id, at_ms in connection.execute(times):
            changes.slots.add(slot_of(at_ms))
            low, high = bounds.get(conversation_id, (at_ms, at_ms))
            bounds[conversation_id] = (min(low, at_ms), max(high, at_ms))
        starts = select(Conversation.id, Conversation.started_at_ms, Conversation.contact_id).where(
            Conversation.id.in_(chunk)
        )
        for conversation_id, at_ms, contact_id in connection.execute(starts):
            changes.slots.add(slot_of(at_ms))
            if contact_id is not None:
                changes.contacts.add(contact_id)
                low, high = bounds.get(conversation_id, (at_ms, at_ms))
                spans[contact_id].append((min(low, at_ms), max(high, at_ms)))
    if spans:
        # Imported here: chatmw.metrics.outcome_rollups imports this module.
        from chatmw.metrics.outcome_rollups import repeat_slots

        changes.slots.update(repeat_slots(connection, spans))
    return changes


def _add_logged(
    connection: Connection,
    changes: Changes,
    conversations: set[int],
    after_change_id: int,
    through_change_id: int | None,
) -> None:
    """Add the change-log rows above ``after_change_id`` to ``changes`` and ``conversations``."""
    logged = select(RollupChange.conversation_id, RollupChange.contact_id, RollupChange.start_ms)
    logged = logged.where(RollupChange.id > after_change_id)
    if through_change_id is not None:
        logged = logged.where(RollupChange.id <= through_change_id)
    contacts: set[int] = set()
    for conversation_id, contact_id, start_ms in connection.execute(logged):
        if conversation_id is not None:
            conversations.add(int(conversation_id))
        if start_ms is not None:
            changes.slots.add(slot_of(int(start_ms)))
        if contact_id is not None:
            contacts.add(int(contact_id))
    changes.contacts.update(contacts)
    ordered = sorted(contacts)
    for index in range(0, len(ordered), _CHUNK):
        chunk = ordered[index : index + _CHUNK]
        starts = select(Conversation.started_at_ms).where(Conversation.contact_id.in_(chunk))
        changes.slots.update(slot_of(at_ms) for (at_ms,) in connection.execute(starts))


def changed_contacts(connection: Connection) -> set[int]:
    """Return the contacts whose rollup rows may be stale since the last refresh."""
    watermark, conversations, logged = connection.execute(
        select(
            RollupState.watermark_id,
            RollupState.conversation_watermark_id,
            RollupState.change_watermark_id,
        ).where(RollupState.id == 1)
    ).one()
    return changes_after(
        connection, int(watermark), None, int(conversations), after_change_id=int(logged)
    ).contacts


def _timed() -> ColumnElement[bool]:
    return Message.kind.not_in(UNTIMED_KINDS)


def _message_counts(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Conversation.started_at_ms).label("start_slot_ms"),
            slot_expression(Message.occurred_at_ms).label("slot_ms"),
            Conversation.channel,
            func.count().label("messages"),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(_timed(), where)
        .group_by(
            slot_expression(Conversation.started_at_ms),
            slot_expression(Message.occurred_at_ms),
            Conversation.channel,
        )
    )


def _user_rows(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Message.occurred_at_ms).label("slot_ms"),
            Conversation.channel,
            Message.contact_id,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(_timed(), Message.role == "user", Message.contact_id.is_not(None), where)
        .distinct()
    )


def _starter_rows(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Conversation.started_at_ms).label("slot_ms"),
            Conversation.channel,
            Conversation.contact_id,
        )
        .where(Conversation.contact_id.is_not(None), where)
        .distinct()
    )


def first_starts(where: ColumnElement[bool]) -> Any:
    """Select each contact's first conversation start per channel among conversations ``where``."""
    return (
        select(
            Conversation.contact_id,
            Conversation.channel,
            func.min(Conversation.started_at_ms).label("first_started_ms"),
        )
        .where(Conversation.contact_id.is_not(None), where)
        .group_by(Conversation.contact_id, Conversation.channel)
    )


FIRSTS_COLUMNS = [
    "contact_id",
    "channel",
    "first_started_ms",
    "first_rank",
    "second_started_ms",
    "second_any_ms",
]


def ranked_first_starts(where: ColumnElement[bool]) -> Any:
    """Select the rows of ``RollupFirsts`` (:data:`FIRSTS_COLUMNS`) of the conversations ``where``.

    ``where`` must select every conversation of each contact it selects at all, so that
    each contact's earliest and second starts are among the rows.
    """
    started = Conversation.started_at_ms
    numbered = (
        select(
            Conversation.contact_id,
            Conversation.channel,
            started.label("started_ms"),
            func.row_number()
            .over(partition_by=(Conversation.contact_id, Conversation.channel), order_by=started)
            .label("on_channel"),
            func.row_number()
            .over(partition_by=Conversation.contact_id, order_by=started)
            .label("on_any"),
        )
        .where(Conversation.contact_id.is_not(None), where)
        .subquery()
    )
    firsts = (
        select(
            numbered.c.contact_id,
            numbered.c.channel,
            func.min(numbered.c.started_ms).label("first_started_ms"),
            func.min(case((numbered.c.on_channel == 2, numbered.c.started_ms))).label("second"),
            func.min(case((numbered.c.on_any == 2, numbered.c.started_ms))).label("second_any"),
        )
        .group_by(numbered.c.contact_id, numbered.c.channel)
        .subquery()
    )
    earliest = func.min(firsts.c.first_started_ms).over(partition_by=firsts.c.contact_id)
    order = func.row_number().over(
        partition_by=firsts.c.contact_id,
        order_by=(firsts.c.first_started_ms, firsts.c.channel),
    )
    rank = case((firsts.c.first_started_ms != earliest, 2), (order == 1, 0), else_=1)
    second_any = func.max(firsts.c.second_any).over(partition_by=firsts.c.contact_id)
    return select(
        firsts.c.contact_id,
        firsts.c.channel,
        firsts.c.first_started_ms,
        rank,
        firsts.c.second,
        second_any,
    )


def _conversation_counts(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Conversation.started_at_ms).label("slot_ms"),
            Conversation.channel,
            func.count().label("conversations"),
        )
        .where(where)
        .group_by(slot_expression(Conversation.started_at_ms), Conversation.channel)
    )


def _ensure_state(connection: Connection) -> None:
    # The migration inserts the row; a store whose tables were emptied gets it back here.
    insert_module = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(
        insert_module.insert(RollupState)
        .values(
            id=1,
            built=False,
            watermark_id=0,
            rescan_from_id=0,
            pending_id=0,
            pending_at_ms=0,
            refreshed_at_ms=0,
            rebuild_started_at_ms=0,
        )
        .on_conflict_do_nothing()
    )


def lock_state(connection: Connection) -> RollupStateRow:
    """Lock the ``rollup_state`` row (creating it if missing) and return its columns.

    On SQLite the insert that creates a missing row takes the database's write lock.
    """
    _ensure_state(connection)
    row = connection.execute(
        select(
            RollupState.built,
            RollupState.watermark_id,
            RollupState.rescan_from_id,
            RollupState.pending_id,
            RollupState.pending_at_ms,
            RollupState.conversation_watermark_id,
            RollupState.conversation_rescan_from_id,
            RollupState.conversation_pending_id,
            RollupState.change_watermark_id,
            RollupState.change_rescan_from_id,
            RollupState.change_pending_id,
            RollupState.exposure_watermark_id,
            RollupState.exposure_rescan_from_id,
            RollupState.exposure_pending_id,
        )
        .where(RollupState.id == 1)
        .with_for_update()
    ).one()
    return RollupStateRow(bool(row[0]), *(int(value) for value in row[1:]))


@dataclass(slots=True)
class RollupStateRow:
    """The columns of ``rollup_state`` the refresher reads."""

    built: bool
    watermark_id: int
    rescan_from_id: int
    pending_id: int
    pending_at_ms: int
    conversation_watermark_id: int
    conversation_rescan_from_id: int
    conversation_pending_id: int
    change_watermark_id: int
    change_rescan_from_id: int
    change_pending_id: int
    exposure_watermark_id: int
    exposure_rescan_from_id: int
    exposure_pending_id: int


def _max_change_id(connection: Connection) -> int:
    return int(connection.execute(select(func.coalesce(func.max(RollupChange.id), 0))).scalar_one())


def _max_conversation_id(connection: Connection) -> int:
    return int(connection.execute(select(func.coalesce(func.max(Conversation.id), 0))).scalar_one())


def _max_exposure_id(connection: Connection) -> int:
    return int(connection.execute(select(func.coalesce(func.max(Exposure.id), 0))).scalar_one())


def _max_message_id(connection: Connection) -> int:
    return int(connection.execute(select(func.coalesce(func.max(Message.id), 0))).scalar_one())


def _claim_rebuild(connection: Connection, now_ms: int) -> tuple[str, int] | None:
    """Claim the rebuild and empty the rollups; return the claim token and the watermark.

    Returns None while another rebuild holds a claim younger than :data:`REBUILD_LEASE_MS`.
    The caller has locked the state row.
    """
    token, started_ms = connection.execute(
        select(RollupState.rebuild_token, RollupState.rebuild_started_at_ms).where(
            RollupState.id == 1
        )
    ).one()
    if token is not None and now_ms - int(started_ms) < REBUILD_LEASE_MS:
        return None
    token = secrets.token_hex(8)
    watermark = _max_message_id(connection)
    from chatmw.metrics.attribution_rollups import ATTRIBUTION_TABLES
    from chatmw.metrics.conversion_rollups import BUSINESS_TABLES
    from chatmw.metrics.dropoff_rollups import DROPOFF_TABLES
    from chatmw.metrics.reach_rollups import REACH_TABLES
    from chatmw.metrics.rollup_started import STARTED_TABLES

    tables = (RollupConversations, RollupMessages, RollupUsers, RollupStarters, RollupFirsts)
    rolled = (
        *STARTED_TABLES,
        *BUSINESS_TABLES,
        *REACH_TABLES,
        *ATTRIBUTION_TABLES,
        *DROPOFF_TABLES,
    )
    for table in (*tables, *rolled, RollupContactSets):
        connection.execute(delete(table))
    from chatmw.metrics.business_rollups import claim_business_for_rebuild

    claim_business_for_rebuild(connection, token, now_ms)
    # Conversations and exposures created and changes logged from here on have higher
    # ids, so the next refresh finds them. The rebuild counts the changes logged so far
    # from raw rows.
    conversations = _max_conversation_id(connection)
    exposures = _max_exposure_id(connection)
    logged = _max_change_id(connection)
    connection.execute(delete(RollupChange).where(RollupChange.id <= logged))
    connection.execute(
        update(RollupState)
        .where(RollupState.id == 1)
        .values(
            built=False,
            rebuild_token=token,
            rebuild_started_at_ms=now_ms,
            conversation_watermark_id=conversations,
            conversation_rescan_from_id=conversations,
            conversation_pending_id=conversations,
            change_watermark_id=logged,
            change_rescan_from_id=logged,
            change_pending_id=logged,
            exposure_watermark_id=exposures,
            exposure_rescan_from_id=exposures,
            exposure_pending_id=exposures,
        )
    )
    return token, watermark


def _owns_rebuild(connection: Connection, token: str) -> bool:
    owner = connection.execute(
        select(RollupState.rebuild_token).where(RollupState.id == 1).with_for_update()
    ).scalar_one_or_none()
    return owner == token


# The times that place a raw row in a rollup row; each has an index.
_TIME_COLUMNS = (Conversation.started_at_ms, Message.occurred_at_ms, Exposure.occurred_at_ms)


def time_chunks(connection: Connection) -> list[tuple[int | None, int]]:
    """Return ``[start, end)`` ranges covering every conversation start, message and exposure."""
    known = []
    for column in _TIME_COLUMNS:
        bounds = connection.execute(select(func.min(column), func.max(column))).one()
        known.extend(int(value) for value in bounds if value is not None)
    if not known:
        return []
    first, last = min(known), max(known)
    chunks: list[tuple[int | None, int]] = [(None, 0)] if first < 0 else []
    # Chunks are the weeks of rollup_responses, so each of its rows is in one chunk. Weeks
    # without a row are skipped through the time indexes, so a stray time years away from
    # the rest adds one chunk, not one per week between them.
    start = max(first, 0) - max(first, 0) % REBUILD_CHUNK_MS
    while start <= last:
        chunks.append((start, start + REBUILD_CHUNK_MS))
        following = _next_time(connection, start + REBUILD_CHUNK_MS)
        if following is None:
            break
        start = following - following % REBUILD_CHUNK_MS
    return chunks


def _next_time(connection: Connection, after_ms: int) -> int | None:
    """Return the earliest conversation start, message or exposure time at or after ``after_ms``."""
    found = [
        connection.execute(select(func.min(column)).where(column >= after_ms)).scalar()
        for column in _TIME_COLUMNS
    ]
    known = [int(value) for value in found if value is not None]
    return min(known) if known else None


def _insert_chunk(connection: Connection, chunk: tuple[int | None, int]) -> None:
    by_start = time_in_ranges(Conversation.started_at_ms, [chunk])
    by_time = time_in_ranges(Message.occurred_at_ms, [chunk])
    # Every rollup row falls in exactly one chunk: by its start slot, or by its message slot.
    statements = (
        (
            RollupConversations,
            ["slot_ms", "channel", "conversations"],
            _conversation_counts(by_start),
        ),
        (
            RollupMessages,
            ["start_slot_ms", "slot_ms", "channel", "messages"],
            _message_counts(by_time),
        ),
        (RollupUsers, ["slot_ms", "channel", "contact_id"], _user_rows(by_time)),
        (RollupStarters, ["slot_ms", "channel", "contact_id"], _starter_rows(by_start)),
    )
    for table, columns, rows in statements:
        connection.execute(insert(table).from_select(columns, rows))
    from chatmw.metrics.attribution_rollups import insert_attribution
    from chatmw.metrics.contact_sets import refresh_sets
    from chatmw.metrics.conversion_rollups import insert_business
    from chatmw.metrics.dropoff_rollups import insert_dropoff
    from chatmw.metrics.reach_rollups import insert_reach
    from chatmw.metrics.rollup_started import insert_started

    insert_started(connection, [chunk])
    insert_business(connection, [chunk])
    insert_dropoff(connection, [chunk])
    insert_reach(connection, [chunk])
    insert_attribution(connection, [chunk])
    refresh_sets(connection, [chunk])


def _next_contact(engine: Engine, low: int | None) -> int | None:
    """Return the lowest contact id of a conversation from ``low`` up, skipping unused ids."""
    statement = select(func.min(Conversation.contact_id))
    if low is not None:
        statement = statement.where(Conversation.contact_id >= low)
    with engine.connect() as connection:
        found = connection.execute(statement).scalar()
    return None if found is None else int(found)


def _rebuild(engine: Engine, token: str, watermark: int, now_ms: int) -> bool:
    """Count every raw row into the emptied rollups, one chunk per transaction.

    Short transactions keep SQLite's single write lock free for the writer between chunks.
    Returns False when the claim was lost (another rebuild or an invalidation took over).
    """
    with engine.connect() as connection:
        chunks = time_chunks(connection)
        last_contact = connection.execute(select(func.max(Conversation.contact_id))).scalar()
    for chunk in chunks:
        with engine.begin() as connection:
            if not _owns_rebuild(connection, token):
                return False
            _insert_chunk(connection, chunk)
    low = None if last_contact is None else _next_contact(engine, None)
    while low is not None:
        high = low + REBUILD_CONTACTS
        with engine.begin() as connection:
            if not _owns_rebuild(connection, token):
                return False
            # The last range has no upper bound: PostgreSQL's contact ids are int4, and the
            # bound past the highest id may not fit it.
            contacts = and_(Conversation.contact_id >= low,
                            *([Conversation.contact_id < high] if high <= last_contact else []))
            connection.execute(
                insert(RollupFirsts).from_select(FIRSTS_COLUMNS, ranked_first_starts(contacts))
            )
        low = _next_contact(engine, high) if high <= last_contact else None
    from chatmw.metrics.business_rollups import finish_business_rebuild

    with engine.begin() as connection:
        if not _owns_rebuild(connection, token):
            return False
        finish_business_rebuild(connection, token)
        from chatmw.metrics.conversion_rollups import rebuild_orders

        rebuild_orders(connection)
        connection.execute(
            update(RollupState)
            .where(RollupState.id == 1)
            .values(
                built=True,
                rebuild_token=None,
                watermark_id=watermark,
                rescan_from_id=watermark,
                pending_id=watermark,
                pending_at_ms=now_ms,
                refreshed_at_ms=now_ms,
            )
        )
    return True


def _delete_slots(connection: Connection, slots: list[int]) -> None:
    for index in range(0, len(slots), _CHUNK):
        chunk = slots[index : index + _CHUNK]
        connection.execute(
            delete(RollupConversations).where(RollupConversations.slot_ms.in_(chunk))
        )
        connection.execute(delete(RollupUsers).where(RollupUsers.slot_ms.in_(chunk)))
        connection.execute(delete(RollupStarters).where(RollupStarters.slot_ms.in_(chunk)))
        connection.execute(
            delete(RollupMessages).where(
                or_(RollupMessages.slot_ms.in_(chunk), RollupMessages.start_slot_ms.in_(chunk))
            )
        )


def _recompute(connection: Connection, slots: set[int]) -> None:
    """Replace the rollup rows of ``slots`` with counts of the raw rows."""
    from chatmw.metrics.attribution_rollups import delete_attribution, insert_attribution
    from chatmw.metrics.contact_sets import refresh_sets
    from chatmw.metrics.conversion_rollups import delete_business, insert_business
    from chatmw.metrics.dropoff_rollups import delete_dropoff, insert_dropoff
    from chatmw.metrics.reach_rollups import delete_reach, insert_reach
    from chatmw.metrics.rollup_started import delete_started, insert_started

    ordered = sorted(slots)
    _delete_slots(connection, ordered)
    delete_reach(connection, ordered)
    ranges = slot_ranges(ordered)
    delete_started(connection, ranges)
    insert_started(connection, ranges)
    delete_business(connection, ranges)
    insert_business(connection, ranges)
    delete_dropoff(connection, ranges)
    insert_dropoff(connection, ranges)
    insert_reach(connection, ranges)
    delete_attribution(connection, ranges)
    insert_attribution(connection, ranges)
    for index in range(0, len(ranges), 50):
        part = ranges[index : index + 50]
        connection.execute(
            insert(RollupConversations).from_select(
                ["slot_ms", "channel", "conversations"],
                _conversation_counts(time_in_ranges(Conversation.started_at_ms, part)),
            )
        )
        connection.execute(
            insert(RollupUsers).from_select(
                ["slot_ms", "channel", "contact_id"],
                _user_rows(time_in_ranges(Message.occurred_at_ms, part)),
            )
        )
        connection.execute(
            insert(RollupStarters).from_select(
                ["slot_ms", "channel", "contact_id"],
                _starter_rows(time_in_ranges(Conversation.started_at_ms, part)),
            )
        )

    # A message row is stale when its message slot or its conversation's start slot is
    # dirty: count the first kind by message time, the second by conversation start, and
    # keep each row once.
    counts: dict[tuple[int, int, str], int] = defaultdict(int)
    for index in range(0, len(ranges), 50):
        part = ranges[index : index + 50]
        by_time = _message_counts(time_in_ranges(Message.occurred_at_ms, part))
        for start_slot, slot, channel, messages in connection.execute(by_time):
            counts[(int(start_slot), int(slot), channel)] = int(messages)
        by_start = _message_counts(time_in_ranges(Conversation.started_at_ms, part))
        for start_slot, slot, channel, messages in connection.execute(by_start):
            if int(slot) not in slots:
                counts[(int(start_slot), int(slot), channel)] = int(messages)
    rows = [
        {"start_slot_ms": start, "slot_ms": slot, "channel": channel, "messages": messages}
        for (start, slot, channel), messages in counts.items()
    ]
    if rows:
        connection.execute(insert(RollupMessages), rows)
    # The day and week contact sets are unions of the slot rows recomputed above.
    refresh_sets(connection, ranges)


def _recompute_firsts(connection: Connection, contacts: set[int]) -> None:
    """Replace the first conversation starts of ``contacts`` with those of the raw rows."""
    ordered = sorted(contacts)
    for index in range(0, len(ordered), _CHUNK):
        chunk = ordered[index : index + _CHUNK]
        connection.execute(delete(RollupFirsts).where(RollupFirsts.contact_id.in_(chunk)))
        connection.execute(
            insert(RollupFirsts).from_select(
                FIRSTS_COLUMNS, ranked_first_starts(Conversation.contact_id.in_(chunk))
            )
        )


def refresh(engine: Engine, now_ms: int | None = None) -> RefreshReport:
    """Bring the rollups up to date with the raw rows; build them first if they are not built.

    While another process rebuilds the rollups, this returns at once with nothing done.
    Business-hours histograms counted for a schedule other than the registered one are
    counted again after the other rollups are up to date
    (``chatmw.metrics.business_rollups.rebuild_stale_business``).
    """
    from chatmw.metrics.business_rollups import rebuild_stale_business

    started = time.perf_counter()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    with engine.begin() as connection:
        state = lock_state(connection)
        if state.built:
            watermark, slots = _refresh_slots(connection, state, now_ms)
        else:
            claim = _claim_rebuild(connection, now_ms)
    if state.built:
        rebuild_stale_business(engine, now_ms)
        return RefreshReport(False, slots, watermark, time.perf_counter() - started)
    if claim is None:
        logger.info("rollups: another rebuild is running; refresh skipped")
        return RefreshReport(False, 0, state.watermark_id, time.perf_counter() - started)
    token, watermark = claim
    if not _rebuild(engine, token, watermark, now_ms):
        logger.info("rollups: rebuild stopped because the rollups were invalidated")
        return RefreshReport(False, 0, watermark, time.perf_counter() - started)
    analyze_tables(engine)
    # A schedule registered during the rebuild leaves the business-hours histograms stale.
    rebuild_stale_business(engine, now_ms)
    return RefreshReport(True, 0, watermark, time.perf_counter() - started)


# Every rollup table, for planner statistics after a rebuild.
ROLLUP_TABLES = (
    "rollup_conversations",
    "rollup_messages",
    "rollup_users",
    "rollup_starters",
    "rollup_firsts",
    "rollup_started",
    "rollup_participants",
    "rollup_responses",
    "rollup_business_responses",
    "rollup_contact_sets",
    "rollup_sentiment",
    "rollup_outcomes",
    "rollup_surveys",
    "rollup_query_types",
    "rollup_conversion_links",
    "rollup_lead_links",
    "rollup_orders",
    "rollup_engaged",
    "rollup_proactive",
    "rollup_writers",
    "rollup_exposed",
    "rollup_attribution",
    "rollup_attribution_sets",
    "rollup_dropoff",
    "rollup_dropoff_open",
    "rollup_dropoff_steps",
    "rollup_step_sets",
)


def analyze_tables(engine: Engine, names: Iterable[str] = ROLLUP_TABLES) -> None:
    """Refresh planner statistics after a rebuild, so range scans on slots use the indexes."""
    if engine.dialect.name == "postgresql":
        # VACUUM cannot run in a transaction. It also sets the visibility map, so that
        # PostgreSQL reads slot ranges from the primary key index alone.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for name in names:
                connection.exec_driver_sql(f"VACUUM ANALYZE {name}")
        return
    with engine.begin() as connection:
        for name in names:
            connection.exec_driver_sql(f"ANALYZE {name}")


def _refresh_slots(connection: Connection, state: RollupStateRow, now_ms: int) -> tuple[int, int]:
    """Recompute the slots changed since the last refresh; return the watermark and slot count."""

    watermark = max(_max_message_id(connection), state.watermark_id)
    conversation_mark = max(_max_conversation_id(connection), state.conversation_watermark_id)
    change_mark = max(_max_change_id(connection), state.change_watermark_id)
    exposure_mark = max(_max_exposure_id(connection), state.exposure_watermark_id)
    changes = changes_after(
        connection,
        state.rescan_from_id,
        watermark,
        state.conversation_rescan_from_id,
        conversation_mark,
        state.change_rescan_from_id,
        change_mark,
        state.exposure_rescan_from_id,
        exposure_mark,
    )
    slots = changes.slots
    if slots:
        _recompute(connection, slots)
    _recompute_firsts(connection, changes.contacts)
    from chatmw.metrics.conversion_rollups import recompute_business_contacts

    recompute_business_contacts(connection, changes.contacts)
    rescan_from, pending, pending_at = state.rescan_from_id, state.pending_id, state.pending_at_ms
    conversation_rescan = state.conversation_rescan_from_id
    conversation_pending = state.conversation_pending_id
    change_rescan, change_pending = state.change_rescan_from_id, state.change_pending_id
    exposure_rescan, exposure_pending = state.exposure_rescan_from_id, state.exposure_pending_id
    if now_ms - pending_at >= OVERLAP_MS:
        rescan_from, pending, pending_at = pending, watermark, now_ms
        conversation_rescan, conversation_pending = conversation_pending, conversation_mark
        change_rescan, change_pending = change_pending, change_mark
        exposure_rescan, exposure_pending = exposure_pending, exposure_mark
    connection.execute(
        update(RollupState)
        .where(RollupState.id == 1)
        .values(
            watermark_id=watermark,
            rescan_from_id=rescan_from,
            pending_id=pending,
            pending_at_ms=pending_at,
            refreshed_at_ms=now_ms,
            conversation_watermark_id=conversation_mark,
            conversation_rescan_from_id=conversation_rescan,
            conversation_pending_id=conversation_pending,
            change_watermark_id=change_mark,
            change_rescan_from_id=change_rescan,
            change_pending_id=change_pending,
            exposure_watermark_id=exposure_mark,
            exposure_rescan_from_id=exposure_rescan,
            exposure_pending_id=exposure_pending,
        )
    )
    if change_rescan > state.change_rescan_from_id:
        # No refresh reads the rows at or below the rescan point again.
        connection.execute(delete(RollupChange).where(RollupChange.id <= change_rescan))
    return watermark, len(slots)


def rebuild(engine: Engine, now_ms: int | None = None) -> RefreshReport:
    """Recompute every rollup row from the raw rows."""
    invalidate(engine)
    return refresh(engine, now_ms)


def invalidate(engine: Engine) -> None:
    """Mark the rollups unbuilt: queries read raw rows until the next refresh rebuilds them.

    Call it after deleting raw rows (erasure, retention), which the refresher cannot see.
    """
    with engine.begin() as connection:
        _ensure_state(connection)
        connection.execute(
            update(RollupState).where(RollupState.id == 1).values(built=False, rebuild_token=None)
        )


class Refresher:
    """A daemon thread that refreshes the rollups every ``interval_s`` seconds."""

    def __init__(self, engine: Engine, interval_s: float = REFRESH_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"rollup refresh interval must be positive, got {interval_s!r}")
        self.engine = engine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; the first refresh runs at once, and always runs to its end."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="chatmw-rollups", daemon=True)
        self._thread.start()
        logger.info("rollups: refresher started, every %.0f s", self.interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread, waiting at most ``timeout_s`` for a running refresh."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        logger.info("rollups: refresher stopped")

    def _run(self) -> None:
        # The first refresh runs even when stop() comes at once, so a started refresher
        # always leaves the rollups built.
        while True:
            try:
                report = refresh(self.engine)
                logger.debug(
                    "rollups: refreshed %d slots to message id %d in %.2f s",
                    report.slots,
                    report.watermark_id,
                    report.seconds,
                )
            except Exception:  # noqa: BLE001 - the thread keeps running; queries stay exact
                logger.exception("rollups: refresh failed; retrying in %.0f s", self.interval_s)
            if self._stop.wait(self.interval_s):
                return
