"""Summary totals and response-time histograms from the rollups keyed by conversation start.

The window's served slots are read from rollups: response histograms from week rows where
a whole week is served, then day rows, hour rows, and slot rows elsewhere. The
conversations that started in the raw part of the window (its ragged edges and the
slots changed since the last refresh) are read from raw rows and added.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, or_, select, union_all

from chatmw.metrics.contact_sets import count_distinct
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.histogram import Bin, Histogram, add_value
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.rollup_started import FIRST_RESPONSE, REPLY_TIME, role_count
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_HOUR,
    LEVEL_SLOT,
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
    SLOT_MS,
    RollupBusinessResponses,
    RollupConversations,
    RollupParticipants,
    RollupResponses,
    RollupStarted,
)

__all__ = [
    "StartedFigures",
    "Responses",
    "started_figures",
    "add_conversations",
    "add_messages",
    "add_responses",
    "add_rolled_histograms",
    "new_responses",
    "EXACT_PARAM_HELP",
]

TOTALS = ("conversations", "messages", "user_messages", "bot_messages", "agent_messages", "users")
EXACT_PARAM_HELP = (
    "true computes percentiles from every raw duration instead of rollup histograms "
    "(slower on large stores)"
)

# group key -> figure -> responding role -> histogram
Responses = dict[Any, dict[str, dict[str, Histogram]]]


@dataclass(slots=True)
class StartedFigures:
    """Per-group totals and response histograms of the conversations that started in a window.

    ``users`` is the number of distinct users over all groups; a user in two groups counts
    once there and once in each group's totals.
    """

    totals: dict[Any, dict[str, int]]
    users: int
    responses: Responses


def _level_ranges(coverage: Coverage) -> dict[int, list[tuple[int, int]]]:
    """Cover the served slots with the fewest week, day, hour and slot rows."""
    ranges: dict[int, list[tuple[int, int]]] = {level: [] for level in LEVEL_WIDTH_MS}

    def add(level: int, start: int, width: int) -> None:
        spans = ranges[level]
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], start + width)
        else:
            spans.append((start, start + width))

    slot = coverage.first_slot
    while slot < coverage.end_slot:
        for level in (LEVEL_WEEK, LEVEL_DAY, LEVEL_HOUR):
            width = LEVEL_WIDTH_MS[level]
            whole = (
                slot % width == 0
                and slot + width <= coverage.end_slot
                and all(start in coverage.served for start in range(slot, slot + width, SLOT_MS))
            )
            if whole:
                add(level, slot, width)
                slot += width
                break
        else:
            if slot in coverage.served:
                add(LEVEL_SLOT, slot, SLOT_MS)
            slot += SLOT_MS
    return ranges


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _empty_totals() -> dict[str, int]:
    return dict.fromkeys(TOTALS, 0)


def add_conversations(
    connection: Connection, flt: MetricFilter, coverage: Coverage, totals: dict[Any, dict[str, int]]
) -> None:
    """Add the conversations that started in the window to ``totals`` per group key."""
    rolled = (
        select(RollupConversations.channel, func.sum(RollupConversations.conversations))
        .where(
            *coverage.served_conditions(RollupConversations.slot_ms),
            *channel_condition(RollupConversations.channel, flt),
        )
        .group_by(RollupConversations.channel)
    )
    raw = (
        select(Conversation.channel, func.count())
        .where(
            time_in_ranges(Conversation.started_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
        .group_by(Conversation.channel)
    )
    for statement in (rolled, raw):
        for channel, count in connection.execute(statement):
            if count:
                group = totals.setdefault(_key(flt, channel), _empty_totals())
                group["conversations"] += int(count)


def add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, totals: dict[Any, dict[str, int]]
) -> None:
    """Add the timed messages of the conversations started in the window, in all and by role."""
    rolled = (
        select(
            RollupStarted.channel,
            func.sum(RollupStarted.messages),
            func.sum(RollupStarted.user_messages),
            func.sum(RollupStarted.bot_messages),
            func.sum(RollupStarted.agent_messages),
        )
        .where(
            *coverage.served_conditions(RollupStarted.start_slot_ms),
            *channel_condition(RollupStarted.channel, flt),
        )
        .group_by(RollupStarted.channel)
    )
    raw = (
        select(
            Conversation.channel,
            func.count(),
            role_count("user"),
            role_count("bot"),
            role_count("agent"),
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.kind.not_in(UNTIMED_KINDS),
            time_in_ranges(Conversation.started_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
        .group_by(Conversation.channel)
    )
    names = ("messages", "user_messages", "bot_messages", "agent_messages")
    for statement in (rolled, raw):
        for channel, *counts in connection.execute(statement):
            if not counts[0]:
                continue
            group = totals.setdefault(_key(flt, channel), _empty_totals())
            for name, count in zip(names, counts, strict=True):
                group[name] += int(count or 0)


def _count_users(
    connection: Connection, flt: MetricFilter, coverage: Coverage, totals: dict[Any, dict[str, int]]
) -> int:
    """Set each group's distinct users and return the distinct users over all groups."""
    raw = (
        select(Conversation.channel, Message.contact_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.kind.not_in(UNTIMED_KINDS),
            Message.role == "user",
            Message.contact_id.is_not(None),
            time_in_ranges(Conversation.started_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
    )
    counted = count_distinct(
        connection,
        "participants",
        {0: (coverage.first_slot, coverage.end_slot)},
        coverage.served,
        flt.channels,
        [(0, channel, contact_id) for channel, contact_id in connection.execute(raw)]
        if coverage.raw
        else [],
    )
    if counted is not None:
        by_channel, overall = counted
        if flt.group_by is not None:
            for (channel, _), users in by_channel.items():
                totals.setdefault(channel, _empty_totals())["users"] = users
        return overall.get(0, 0)
    # Without a whole served day, SQL counts the slot rows and raw rows together.
    rolled = select(RollupParticipants.channel, RollupParticipants.contact_id).where(
        *coverage.served_conditions(RollupParticipants.start_slot_ms),
        *channel_condition(RollupParticipants.channel, flt),
    )
    contacts = union_all(rolled, raw).subquery()
    if flt.group_by is not None:
        per_channel = select(
            contacts.c.channel, func.count(func.distinct(contacts.c.contact_id))
        ).group_by(contacts.c.channel)
        for channel, users in connection.execute(per_channel):
            totals.setdefault(channel, _empty_totals())["users"] = int(users)
    overall = select(func.count(func.distinct(contacts.c.contact_id)))
    return int(connection.execute(overall).scalar_one())


def new_responses() -> Responses:
    """Return an empty mapping of group key -> figure -> role -> histogram."""
    return defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))


def add_rolled_histograms(
    connection: Connection,
    table: type[RollupResponses] | type[RollupBusinessResponses],
    flt: MetricFilter,
    coverage: Coverage,
    responses: Responses,
) -> None:
    """Add the histograms of ``table`` over the served slots of ``coverage`` to ``responses``."""
    levels = [
        (table.level == level) & time_in_ranges(table.start_ms, spans)
        for level, spans in _level_ranges(coverage).items()
        if spans
    ]
    if not levels:
        return
    rolled = (
        select(
            table.channel,
            table.figure,
            table.role,
            table.bucket,
            func.sum(table.count),
            func.sum(table.total_ms),
            func.min(table.min_ms),
            func.max(table.max_ms),
        )
        .where(or_(*levels), *channel_condition(table.channel, flt))
        .group_by(table.channel, table.figure, table.role, table.bucket)
    )
    for channel, figure, role, bucket, count, total, low, high in connection.execute(rolled):
        histogram = responses[_key(flt, channel)][figure][role]
        part = Bin(int(count), float(total), float(low), float(high))
        found = histogram.get(int(bucket))
        if found is None:
            histogram[int(bucket)] = part
        else:
            found.add(part.count, part.total, part.low, part.high)


def add_responses(
    connection: Connection, flt: MetricFilter, coverage: Coverage, responses: Responses
) -> None:
    """Add the response-time histograms of the conversations that started in the window."""
    add_rolled_histograms(connection, RollupResponses, flt, coverage, responses)
    if not coverage.raw:
        return
    in_raw = [
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    ]
    firsts = select(
        Conversation.channel, Conversation.first_response_role, Conversation.first_response_ms
    ).where(Conversation.first_response_ms.is_not(None), *in_raw)
    replies = (
        select(Conversation.channel, Message.role, Message.response_ms)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.response_ms.is_not(None), *in_raw)
    )
    for figure, statement in ((FIRST_RESPONSE, firsts), (REPLY_TIME, replies)):
        for channel, role, value in connection.execute(statement):
            add_value(responses[_key(flt, channel)][figure][role or ""], value)


def started_figures(
    engine: Engine, flt: MetricFilter, totals: bool = True
) -> StartedFigures | None:
    """Return the figures of the conversations ``flt`` covers, or None where rollups do not apply.

    Rollups apply under the conditions of ``chatmw.metrics.rollup_query.cover``. Without
    ``totals`` only the response histograms are read.
    """
    # Start slots are counted in UTC: the time zone does not change which conversations started
    # in the window.
    utc = dataclasses.replace(flt, tz=ZoneInfo("UTC"))
    responses = new_responses()
    by_group: dict[Any, dict[str, int]] = {}
    with engine.connect() as connection:
        coverage = cover(connection, utc)
        if coverage is None:
            return None
        users = 0
        if totals:
            add_conversations(connection, flt, coverage, by_group)
            add_messages(connection, flt, coverage, by_group)
            users = _count_users(connection, flt, coverage, by_group)
        add_responses(connection, flt, coverage, responses)
    return StartedFigures(by_group, users, responses)
