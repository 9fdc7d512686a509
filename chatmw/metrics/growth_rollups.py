"""The ``growth`` counts from rollups, with raw rows for the parts rollups do not cover."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_distinct import distinct_starters
from chatmw.metrics.rollup_query import (
    MAX_RAW_RANGES,
    Buckets,
    Coverage,
    bucket_index,
    channel_condition,
    cover,
    raw_message_times,
)
from chatmw.metrics.rollup_refresh import (
    changed_contacts,
    first_starts,
    slot_of,
    slot_ranges,
    time_in_ranges,
)
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import (
    SLOT_MS,
    RollupConversations,
    RollupFirsts,
    RollupMessages,
)

__all__ = ["growth_counts"]

Counts = dict[Any, dict[int, dict[str, int]]]


def _channels(flt: MetricFilter, column: Any) -> tuple[Any, ...]:
    # Without a grouping every channel adds to the same buckets, so SQL sums them.
    return (column,) if flt.group_by is not None else ()


def _add_conversations(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
) -> None:
    channels = _channels(flt, RollupConversations.channel)
    slot = RollupConversations.slot_ms
    index = bucket_index(slot, buckets.bounds)
    statement = (
        select(index, func.sum(RollupConversations.conversations), *channels)
        .where(
            slot >= coverage.first_slot,
            slot < coverage.end_slot,
            ~time_in_ranges(slot, coverage.raw),
            *channel_condition(RollupConversations.channel, flt),
        )
        .group_by(index, *channels)
    )
    for bucket, total, *key in connection.execute(statement):
        counts[key[0] if key else None][int(bucket)]["conversations"] += int(total)
    raw = select(Conversation.started_at_ms, Conversation.channel).where(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    for at_ms, channel in connection.execute(raw):
        counts[_key(flt, channel)][buckets.index(at_ms)]["conversations"] += 1


def _add_message(
    flt: MetricFilter, buckets: Buckets, counts: Counts, at_ms: int, channel: str, number: int
) -> None:
    # Messages are counted in the period of their own time; those after the last period
    # are not counted, as in the raw computation.
    index = buckets.index(at_ms)
    if 0 <= index < len(buckets.bounds) - 1:
        counts[_key(flt, channel)][index]["messages"] += number


def _served_starts(coverage: Coverage) -> list[ColumnElement[bool]]:
    start = RollupMessages.start_slot_ms
    return [
        start >= coverage.first_slot,
        start < coverage.end_slot,
        ~time_in_ranges(start, coverage.raw),
    ]


def _add_served_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
) -> set[int]:
    """Add the messages of served conversations from rollups; return the slots left to raw rows.

    Message slots that are dirty or that the time zone does not map exactly are left out
    of the sums, and the caller reads their messages from raw rows.
    """
    low, high = slot_of(buckets.bounds[0]), buckets.bounds[-1]
    channels = _channels(flt, RollupMessages.channel)
    slot = RollupMessages.slot_ms
    unserved = {
        start
        for start in range(max(low, 0), high, SLOT_MS)
        if coverage.message_slot_offset(start) is None
    }
    ranges = slot_ranges(unserved)
    if low >= 0 and len(ranges) <= MAX_RAW_RANGES:
        index = bucket_index(slot, buckets.bounds)
        summed = (
            select(index, func.sum(RollupMessages.messages), *channels)
            .where(
                *_served_starts(coverage), slot >= low, slot < high, ~time_in_ranges(slot, ranges)
            )
            .where(*channel_condition(RollupMessages.channel, flt))
            .group_by(index, *channels)
        )
        for bucket, number, *key in connection.execute(summed):
            counts[key[0] if key else None][int(bucket)]["messages"] += int(number)
        return unserved

    # Too many unserved slots to leave out in SQL: check each slot's rows here.
    unserved = set()
    per_slot = (
        select(slot, func.sum(RollupMessages.messages), *channels)
        .where(*_served_starts(coverage), slot >= low, slot < high)
        .where(*channel_condition(RollupMessages.channel, flt))
        .group_by(slot, *channels)
    )
    for start, number, *key in connection.execute(per_slot):
        if coverage.message_slot_offset(start) is None:
            unserved.add(start)
        else:
            _add_message(flt, buckets, counts, start, key[0] if key else "", int(number))
    return unserved


def _add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
) -> None:
    """Count the messages of conversations that started in the window, by their own time."""
    unserved = _add_served_messages(connection, flt, coverage, buckets, counts)

    for at_ms, channel in raw_message_times(connection, flt, coverage, unserved):
        _add_message(flt, buckets, counts, at_ms, channel, 1)


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _add_new_from_rollups(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    counts: Counts,
    overall_new: dict[int, int],
    changed: set[int],
) -> None:
    """Count new users from ``rollup_firsts``, except the contacts in ``changed``."""
    channel_filter = channel_condition(RollupFirsts.channel, flt)
    unchanged = [RollupFirsts.contact_id.not_in(sorted(changed))] if changed else []
    if len(flt.channels) <= 1:
        _add_new_ranked(connection, flt, buckets, counts, overall_new, unchanged)
        return
    candidates = select(RollupFirsts.contact_id).where(
        RollupFirsts.first_started_ms >= flt.since_ms,
        RollupFirsts.first_started_ms < flt.until_ms,
        *channel_filter,
        *unchanged,
    )

    # Each candidate's first start over the filtered channels; it may lie before the window.
    earliest = (
        select(
            RollupFirsts.contact_id.label("contact_id"),
            func.min(RollupFirsts.first_started_ms).label("first_ms"),
        )
        .where(RollupFirsts.contact_id.in_(candidates), *channel_filter)
        .group_by(RollupFirsts.contact_id)
        .subquery()
    )

    in_window = [earliest.c.first_ms >= flt.since_ms, earliest.c.first_ms < flt.until_ms]
    index = bucket_index(earliest.c.first_ms, buckets.bounds)
    overall = select(index, func.count()).where(*in_window).group_by(index)
    for bucket, number in connection.execute(overall):
        overall_new[int(bucket)] = overall_new.get(int(bucket), 0) + int(number)
    if flt.group_by is None:
        return

    # A contact is new in each group whose conversation starts at its first start.
    index = bucket_index(RollupFirsts.first_started_ms, buckets.bounds)
    grouped = (
        select(index, RollupFirsts.channel, func.count())
        .join(earliest, earliest.c.contact_id == RollupFirsts.contact_id)
        .where(RollupFirsts.first_started_ms == earliest.c.first_ms, *in_window, *channel_filter)
        .group_by(index, RollupFirsts.channel)
    )
    for bucket, channel, number in connection.execute(grouped):
        counts[channel][int(bucket)]["new_users"] += int(number)


def _add_new_ranked(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    counts: Counts,
    overall_new: dict[int, int],
    unchanged: list[ColumnElement[bool]],
) -> None:
    """Count new users over all channels or over one, from one index range of rows.

    Over all channels a contact is new where its row of ``first_rank`` 0 starts, and new in
    each channel group whose row has rank 0 or 1 (the same first start). Over one channel
    each contact has one row, at its first start there.
    """
    first = RollupFirsts.first_started_ms
    window = [first >= flt.since_ms, first < flt.until_ms, *unchanged]
    if flt.channels:
        overall_rows = [RollupFirsts.channel == flt.channels[0]]
        group_rows = overall_rows
    else:
        overall_rows = [RollupFirsts.first_rank == 0]
        group_rows = [RollupFirsts.first_rank <= 1]
    index = bucket_index(first, buckets.bounds)
    overall = select(index, func.count()).where(*overall_rows, *window).group_by(index)
    for bucket, number in connection.execute(overall):
        overall_new[int(bucket)] = overall_new.get(int(bucket), 0) + int(number)
    if flt.group_by is None:
        return
    grouped = (
        select(index, RollupFirsts.channel, func.count())
        .where(*group_rows, *window)
        .group_by(index, RollupFirsts.channel)
    )
    for bucket, channel, number in connection.execute(grouped):
        counts[channel][int(bucket)]["new_users"] += int(number)


def _add_new_from_raw(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    counts: Counts,
    overall_new: dict[int, int],
    changed: set[int],
) -> None:
    """Count new users among the ``changed`` contacts from the raw conversations."""
    firsts: dict[int, dict[str, int]] = defaultdict(dict)
    ordered = sorted(changed)
    for offset in range(0, len(ordered), 500):
        statement = first_starts(Conversation.contact_id.in_(ordered[offset : offset + 500]))
        if flt.channels:
            statement = statement.where(Conversation.channel.in_(flt.channels))
        for contact_id, channel, first_ms in connection.execute(statement):
            firsts[contact_id][channel] = int(first_ms)
    since, until = flt.since_ms, flt.until_ms
    for by_channel in firsts.values():
        first = min(by_channel.values())
        if since is None or until is None or not since <= first < until:
            continue
        index = buckets.index(first)
        overall_new[index] = overall_new.get(index, 0) + 1
        if flt.group_by is None:
            continue
        for channel, at_ms in by_channel.items():
            if at_ms == first:
                counts[channel][index]["new_users"] += 1


def _add_users(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    counts: Counts,
    overall_users: dict[int, int],
) -> None:
    by_channel, overall = distinct_starters(connection, flt, coverage, buckets)
    for (channel, index), users in by_channel.items():
        counts[channel][index]["users"] = users
    overall_users.update(overall)


def growth_counts(
    engine: Engine, flt: MetricFilter, period: str, starts: Sequence[datetime]
) -> tuple[dict[datetime, dict[str, int]], dict[Any, dict[datetime, dict[str, int]]]] | None:
    """Return overall and per-group counts per period start, or None where rollups do not apply.

    The counts are those of the raw computation in ``chatmw.metrics.growth``: only groups
    with a conversation that started in the window appear.
    """
    if not starts:
        return None
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        if coverage is None:
            return None
        buckets = Buckets(starts, period, flt.tz)
        counts: Counts = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
        overall_users: dict[int, int] = {}
        overall_new: dict[int, int] = {}
        _add_conversations(connection, flt, coverage, buckets, counts)
        _add_messages(connection, flt, coverage, buckets, counts)
        _add_users(connection, flt, coverage, buckets, counts, overall_users)
        changed = changed_contacts(connection)
        _add_new_from_rollups(connection, flt, buckets, counts, overall_new, changed)
        _add_new_from_raw(connection, flt, buckets, counts, overall_new, changed)

    groups: dict[Any, dict[datetime, dict[str, int]]] = {}
    overall: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, by_bucket in counts.items():
        if not any(values.get("conversations") for values in by_bucket.values()):
            continue
        groups[key] = {starts[index]: dict(values) for index, values in by_bucket.items()}
        for index, values in by_bucket.items():
            overall[starts[index]]["conversations"] += values.get("conversations", 0)
            overall[starts[index]]["messages"] += values.get("messages", 0)
    for index, users in overall_users.items():
        overall[starts[index]]["users"] = users
    for index, users in overall_new.items():
        overall[starts[index]]["new_users"] = users
    return overall, groups
