"""Rollups keyed by conversation start: messages by role, participants and response times.

Each row counts the conversations that started in one slot, with all their messages,
whatever the messages' own times. A late or changed message dirties its conversation's
start slot (``chatmw.metrics.rollup_refresh.changes_after``), so recomputing the dirty
slots from raw rows keeps these rows exact, as for the other rollups.

Response-time histograms, in calendar time (``rollup_responses``) and in business hours
(``rollup_business_responses``, see ``chatmw.metrics.business_rollups``), also have hour,
day and week rows, each the sum of the rows one level below in it, so that a 30-day
window reads at most 68 rows per channel, figure, role and bucket instead of 2,880. The
refresher recomputes the hours, days and weeks that contain a dirty slot after the slots
themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, case, delete, func, insert, literal_column, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.business_rollups import business_slot_rows
from chatmw.metrics.histogram import Bin, SlotKey, add_slot_duration, slot_rows
from chatmw.metrics.rollup_refresh import slot_expression, time_in_ranges
from chatmw.metrics.sentiment_rollups import delete_sentiment, insert_sentiment
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_HOUR,
    LEVEL_SLOT,
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
    RollupBusinessResponses,
    RollupOutcomes,
    RollupParticipants,
    RollupQueryTypes,
    RollupResponses,
    RollupSentiment,
    RollupStarted,
    RollupSurveys,
)

__all__ = [
    "STARTED_TABLES",
    "delete_started",
    "insert_started",
    "recount_business",
    "aligned_ranges",
    "FIRST_RESPONSE",
    "REPLY_TIME",
    "role_count",
]

STARTED_TABLES = (
    RollupStarted,
    RollupParticipants,
    RollupResponses,
    RollupBusinessResponses,
    RollupSentiment,
    RollupOutcomes,
    RollupSurveys,
    RollupQueryTypes,
)
# Histogram tables with slot rows and their hour, day and week sums.
HistogramTable = type[RollupResponses] | type[RollupBusinessResponses]
_HISTOGRAM_TABLES: tuple[HistogramTable, ...] = (RollupResponses, RollupBusinessResponses)
FIRST_RESPONSE = "first_response"
REPLY_TIME = "reply_time"
# Ranges per statement, as in chatmw.metrics.rollup_refresh.
_RANGES_PER_STATEMENT = 50

Ranges = list[tuple[int | None, int]]


def aligned_ranges(ranges: Iterable[tuple[int | None, int]], width: int) -> list[tuple[int, int]]:
    """Widen ``ranges`` to multiples of ``width`` and merge them; ranges before 0 are left out."""
    widened: list[tuple[int, int]] = []
    for start, end in sorted((s, e) for s, e in ranges if s is not None and s >= 0):
        low = start - start % width
        high = end + (-end) % width
        if widened and low <= widened[-1][1]:
            widened[-1] = (widened[-1][0], max(widened[-1][1], high))
        else:
            widened.append((low, high))
    return widened


def _parts(ranges: Ranges) -> Iterable[Ranges]:
    for index in range(0, len(ranges), _RANGES_PER_STATEMENT):
        yield ranges[index : index + _RANGES_PER_STATEMENT]


def delete_started(connection: Connection, ranges: Ranges) -> None:
    """Delete the rows of the slots in ``ranges`` and of the hours, days and weeks around them."""
    # Imported here: chatmw.metrics.outcome_rollups imports this module.
    from chatmw.metrics.outcome_rollups import delete_outcomes

    delete_outcomes(connection, ranges)
    for part in _parts(ranges):
        connection.execute(
            delete(RollupStarted).where(time_in_ranges(RollupStarted.start_slot_ms, part))
        )
        connection.execute(
            delete(RollupParticipants).where(time_in_ranges(RollupParticipants.start_slot_ms, part))
        )
        delete_sentiment(connection, part)
    for table in _HISTOGRAM_TABLES:
        _delete_histograms(connection, table, ranges)


def _delete_histograms(connection: Connection, table: HistogramTable, ranges: Ranges) -> None:
    """Delete the slot rows of ``ranges`` and the hour, day and week rows around them."""
    for part in _parts(ranges):
        connection.execute(
            delete(table).where(table.level == LEVEL_SLOT, time_in_ranges(table.start_ms, part))
        )
    for level in (LEVEL_HOUR, LEVEL_DAY, LEVEL_WEEK):
        for part in _parts(list(aligned_ranges(ranges, LEVEL_WIDTH_MS[level]))):
            connection.execute(
                delete(table).where(table.level == level, time_in_ranges(table.start_ms, part))
            )


def _timed() -> ColumnElement[bool]:
    return Message.kind.not_in(UNTIMED_KINDS)


def role_count(role: str) -> Any:
    """Return SQL counting the messages of ``role`` in a group."""
    return func.sum(case((Message.role == role, 1), else_=0))


def _started_counts(where: ColumnElement[bool]) -> Any:
    start_slot = slot_expression(Conversation.started_at_ms)
    return (
        select(
            start_slot,
            Conversation.channel,
            func.count(),
            role_count("user"),
            role_count("bot"),
            role_count("agent"),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(_timed(), where)
        .group_by(start_slot, Conversation.channel)
    )


def _participant_rows(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Conversation.started_at_ms),
            Conversation.channel,
            Message.contact_id,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(_timed(), Message.role == "user", Message.contact_id.is_not(None), where)
        .distinct()
    )


def _response_rows(connection: Connection, where: ColumnElement[bool]) -> list[dict[str, Any]]:
    """Return the slot-level histogram rows of the conversations ``where`` selects."""
    firsts = select(
        slot_expression(Conversation.started_at_ms),
        Conversation.channel,
        Conversation.first_response_role,
        Conversation.first_response_ms,
    ).where(Conversation.first_response_ms.is_not(None), where)
    replies = (
        select(
            slot_expression(Conversation.started_at_ms),
            Conversation.channel,
            Message.role,
            Message.response_ms,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.response_ms.is_not(None), where)
    )
    bins: dict[SlotKey, Bin] = {}
    for figure, statement in ((FIRST_RESPONSE, firsts), (REPLY_TIME, replies)):
        for start_slot, channel, role, value in connection.execute(statement):
            add_slot_duration(bins, start_slot, channel, figure, role, value)
    return slot_rows(bins, LEVEL_SLOT)


def _sum_level(
    connection: Connection, table: HistogramTable, level: int, ranges: list[tuple[int, int]]
) -> None:
    """Insert the ``level`` rows of ``ranges`` as sums of the rows one level below."""
    width = literal_column(str(LEVEL_WIDTH_MS[level]))
    # Inlined constants keep the GROUP BY text equal to the selected expression (PostgreSQL).
    start = table.start_ms.op("/")(width).op("*")(width)
    keys = (table.channel, table.figure, table.role, table.bucket)
    for part in _parts(list(ranges)):
        rows = (
            select(
                literal_column(str(level)),
                start,
                *keys,
                func.sum(table.count),
                func.sum(table.total_ms),
                func.min(table.min_ms),
                func.max(table.max_ms),
            )
            .where(table.level == level - 1, time_in_ranges(table.start_ms, part))
            .group_by(start, *keys)
        )
        columns = [
            "level",
            "start_ms",
            "channel",
            "figure",
            "role",
            "bucket",
            "count",
            "total_ms",
            "min_ms",
            "max_ms",
        ]
        connection.execute(insert(table).from_select(columns, rows))


def insert_started(connection: Connection, ranges: Ranges) -> None:
    """Count the conversations that started in ``ranges`` into the emptied rollup rows.

    ``ranges`` are whole slots. The hour, day and week rows around them must be empty too
    (:func:`delete_started`), because they are summed again from the rows below them.
    """
    for part in _parts(ranges):
        by_start = time_in_ranges(Conversation.started_at_ms, part)
        connection.execute(
            insert(RollupStarted).from_select(
                [
                    "start_slot_ms",
                    "channel",
                    "messages",
                    "user_messages",
                    "bot_messages",
                    "agent_messages",
                ],
                _started_counts(by_start),
            )
        )
        connection.execute(
            insert(RollupParticipants).from_select(
                ["start_slot_ms", "channel", "contact_id"], _participant_rows(by_start)
            )
        )
        rows = _response_rows(connection, by_start)
        if rows:
            connection.execute(insert(RollupResponses), rows)
        business = business_slot_rows(connection, by_start)
        if business:
            connection.execute(insert(RollupBusinessResponses), business)
        insert_sentiment(connection, part)
    for table in _HISTOGRAM_TABLES:
        _sum_levels(connection, table, ranges)
    from chatmw.metrics.outcome_rollups import insert_outcomes

    insert_outcomes(connection, ranges)


def _sum_levels(connection: Connection, table: HistogramTable, ranges: Ranges) -> None:
    for level in (LEVEL_HOUR, LEVEL_DAY, LEVEL_WEEK):
        _sum_level(connection, table, level, aligned_ranges(ranges, LEVEL_WIDTH_MS[level]))


def recount_business(connection: Connection, ranges: Ranges) -> None:
    """Count the business-hours histograms of the conversations that started in ``ranges`` again.

    ``ranges`` are whole slots; their rows and the hour, day and week rows around them are
    deleted and summed again, with the schedule stored in ``rollup_business_schedule``.
    """
    _delete_histograms(connection, RollupBusinessResponses, ranges)
    for part in _parts(ranges):
        business = business_slot_rows(connection, time_in_ranges(Conversation.started_at_ms, part))
        if business:
            connection.execute(insert(RollupBusinessResponses), business)
    _sum_levels(connection, RollupBusinessResponses, ranges)
