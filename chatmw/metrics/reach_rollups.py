"""Slot rows for the ``engagement`` metric: reached contacts, writers and engaged counts.

``rollup_proactive`` and ``rollup_writers`` are keyed by the conversation's start slot,
``rollup_exposed`` by the exposure's own slot, and ``rollup_engaged`` counts the
conversations with at least two user messages per start slot. A conversation's contact
is its own, or its first message's when it has none, as ``chatmw.metrics.engagement``
takes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from chatmw.store.models import Conversation, Exposure, Message
from chatmw.store.models_rollups import (
    RollupEngaged,
    RollupExposed,
    RollupProactive,
    RollupWriters,
)

__all__ = ["REACH_TABLES", "conversation_rows", "delete_reach", "insert_reach"]

REACH_TABLES = (RollupEngaged, RollupProactive, RollupWriters, RollupExposed)

Ranges = list[tuple[int | None, int]]


def _time_in_ranges(column: Any, ranges: Ranges) -> ColumnElement[bool]:
    from chatmw.metrics.rollup_refresh import time_in_ranges

    return time_in_ranges(column, ranges)


def _slot(column: Any) -> ColumnElement[Any]:
    from chatmw.metrics.rollup_refresh import slot_expression

    return slot_expression(column)


# The first message of each conversation: the earliest by time, then by id, as in the raw
# computation. The aliases are built once, because building one costs milliseconds.
_FIRST = aliased(Message)
_OPENER = aliased(Message)
_FIRST_ID = (
    select(_FIRST.id)
    .where(_FIRST.conversation_id == Conversation.id)
    .order_by(_FIRST.occurred_at_ms, _FIRST.id)
    .limit(1)
    .scalar_subquery()
)


def conversation_rows(where: ColumnElement[bool], channels: tuple[str, ...] = ()) -> Any:
    """Select start slot, channel, contact, first message's role and user messages.

    One row per conversation that ``where`` selects, in ``channels`` unless empty.
    """
    opener, first_id = _OPENER, _FIRST_ID
    contact = func.coalesce(Conversation.contact_id, opener.contact_id)
    statement = (
        select(
            _slot(Conversation.started_at_ms).label("slot_ms"),
            Conversation.channel,
            contact.label("contact_id"),
            opener.role,
            Conversation.user_message_count,
        )
        .outerjoin(opener, opener.id == first_id)
        .where(where)
    )
    if channels:
        statement = statement.where(Conversation.channel.in_(channels))
    return statement


def _insert_conversation_rows(connection: Connection, where: ColumnElement[bool]) -> None:
    engaged: dict[tuple[int, str], int] = {}
    proactive: set[tuple[int, str, int]] = set()
    writers: set[tuple[int, str, int]] = set()
    for slot, channel, contact_id, role, user_messages in connection.execute(
        conversation_rows(where)
    ):
        key = (int(slot), channel)
        if (user_messages or 0) >= 2:
            engaged[key] = engaged.get(key, 0) + 1
        if contact_id is None:
            continue
        if role is not None and role != "user":
            proactive.add((*key, int(contact_id)))
        if (user_messages or 0) >= 1:
            writers.add((*key, int(contact_id)))
    if engaged:
        connection.execute(
            insert(RollupEngaged),
            [
                {"start_slot_ms": slot, "channel": channel, "conversations": count}
                for (slot, channel), count in engaged.items()
            ],
        )
    for table, rows in ((RollupProactive, proactive), (RollupWriters, writers)):
        if rows:
            connection.execute(
                insert(table),
                [
                    {"start_slot_ms": slot, "channel": channel, "contact_id": contact_id}
                    for slot, channel, contact_id in sorted(rows)
                ],
            )


def _exposure_rows(where: ColumnElement[bool]) -> Any:
    return (
        select(
            _slot(Exposure.occurred_at_ms).label("slot_ms"), Exposure.channel, Exposure.contact_id
        )
        .where(where)
        .distinct()
    )


def _parts(ranges: Ranges) -> Iterable[Ranges]:
    for index in range(0, len(ranges), 50):
        yield ranges[index : index + 50]


def insert_reach(connection: Connection, ranges: Ranges) -> None:
    """Count the conversations that started, and the exposures, in ``ranges`` into empty rows."""
    for part in _parts(ranges):
        _insert_conversation_rows(connection, _time_in_ranges(Conversation.started_at_ms, part))
        connection.execute(
            insert(RollupExposed).from_select(
                ["slot_ms", "channel", "contact_id"],
                _exposure_rows(_time_in_ranges(Exposure.occurred_at_ms, part)),
            )
        )


def delete_reach(connection: Connection, slots: list[int]) -> None:
    """Delete the rows of ``slots`` from the engagement rollup tables."""
    for index in range(0, len(slots), 500):
        chunk = slots[index : index + 500]
        for table in (RollupEngaged, RollupProactive, RollupWriters):
            connection.execute(delete(table).where(table.start_slot_ms.in_(chunk)))
        connection.execute(delete(RollupExposed).where(RollupExposed.slot_ms.in_(chunk)))
