"""The ``growth`` counts from rollups, with raw rows for the parts rollups do not cover."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_distinct import distinct_contacts
from chatmw.metrics.rollup_query import Buckets, Coverage, bucket_index, channel_condition, cover
from chatmw.metrics.rollup_refresh import (
    changes_after,
    first_starts,
    slot_of,
    slot_ranges,
    time_in_ranges,
)
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import (
    RollupConversations,
    RollupFirsts,
    RollupMessages,
    RollupStarters,
    RollupState,
)

__all__ = ["growth_counts"]

Counts = dict[Any, dict[int, dict[str, int]]]


def _channels(flt: MetricFilter, column: Any) -> tuple[Any, ...]:
    # Without a grouping every channel adds to the same buckets, so SQL sums them.
    return (column,) if flt.group_by is not None else ()


def _add_sums(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    counts: Counts,
    figure: str,
    slot: Any,
    channel: Any,
    number: Any,
) -> None:
    channels = _channels(flt, channel)
    index = bucket_index(slot, buckets.bounds)
    statement = (
        select(index, func.sum(number), *channels)
        .where(
            slot >= coverage.first_slot,
            slot < coverage.end_slot,
            ~time_in_ranges(slot, coverage.raw),
            *channel_condition(channel, flt),
        )
        .group_by(index, *channels)
    )
    for bucket, total, *key in connection.execute(statement):
        counts[key[0] if key else None][int(bucket)][figure] += int(total)


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


def _add_message(flt: MetricFilter, buckets: Buckets, counts: Counts, at_ms: int, channel: str, number: int) -> None:
    # Messages are counted in the period of their own time; those after the last period
    # are not counted, as in the raw computation.
    index = buckets.index(at_ms)
    if 0 <= index < len(buckets.bounds) - 1:
        counts[_key(flt, channel)][index]["messages"] += number


def _add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
) -> None:
    """Count the messages of conversations that started in the window, by their own time."""
    channels = _channels(flt, RollupMessages.channel)
    rollups = (
        select(RollupMessages.slot_ms, func.sum(RollupMessages.messages), *channels)
        .where(
            RollupMessages.start_slot_ms >= coverage.first_slot,
            RollupMessages.start_slot_ms < coverage.end_slot,
            ~time_in_ranges(RollupMessages.start_slot_ms, coverage.raw),
            RollupMessages.slot_ms >= slot_of(buckets.bounds[0]),
            RollupMessages.slot_ms < buckets.bounds[-1],
            *channel_condition(RollupMessages.channel, flt),
        )
        .group_by(RollupMessages.slot_ms, *channels)
    )
    # Message slots of served conversations that rollups do not count exactly.
    unserved: set[int] = set()
    for slot, number, *key in connection.execute(rollups):
        if coverage.message_slot_offset(slot) is None:
            unserved.add(slot)
        else:
            _add_message(flt, buckets, counts, slot, key[0] if key else "", int(number))

    columns = (Message.occurred_at_ms, Conversation.channel, Conversation.started_at_ms)
    timed = Message.kind.not_in(UNTIMED_KINDS)
    by_start = (
        select(*columns)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(timed, time_in_ranges(Conversation.started_at_ms, coverage.raw))
        .where(*channel_condition(Conversation.channel, flt))
    )
    for at_ms, channel, _ in connection.execute(by_start):
        _add_message(flt, buckets, counts, at_ms, channel, 1)
    if not unserved:
        return
    by_time = (
        select(*columns)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            timed,
            time_in_ranges(Message.occurred_at_ms, slot_ranges(unserved)),
            Conversation.started_at_ms >= coverage.first_slot,
            Conversation.started_at_ms < coverage.end_slot,
        )
        .where(*channel_condition(Conversation.channel, flt))
    )
    for at_ms, channel, started_ms in connection.execute(by_time):
        if slot_of(started_ms) in coverage.served:
            _add_message(flt, buckets, counts, at_ms, channel, 1)


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _first_starts(connection: Connection, flt: MetricFilter) -> dict[int, dict[str, int]]:
    """Return, per contact whose first start may lie in the window, its first start per channel.

    Contacts changed after the watermark are read from the raw conversations.
    """
    state = select(RollupState.watermark_id).where(RollupState.id == 1).scalar_subquery()
    watermark = int(connection.execute(select(state)).scalar_one())
    changed = changes_after(connection, watermark).contacts
    candidates = select(RollupFirsts.contact_id).where(
        RollupFirsts.first_started_ms >= flt.since_ms,
        RollupFirsts.first_started_ms < flt.until_ms,
        *channel_condition(RollupFirsts.channel, flt),
    )
    rows = select(RollupFirsts.contact_id, RollupFirsts.channel, RollupFirsts.first_started_ms).where(
        RollupFirsts.contact_id.in_(candidates), *channel_condition(RollupFirsts.channel, flt)
    )
    firsts: dict[int, dict[str, int]] = defaultdict(dict)
    for contact_id, channel, first_ms in connection.execute(rows):
        if contact_id not in changed:
            firsts[contact_id][channel] = int(first_ms)
    ordered = sorted(changed)
    for index in range(0, len(ordered), 500):
        chunk = ordered[index : index + 500]
        fresh = first_starts(Conversation.contact_id.in_(chunk))
        if flt.channels:
            fresh = fresh.where(Conversation.channel.in_(flt.channels))
        for contact_id, channel, first_ms in connection.execute(fresh):
            firsts[contact_id][channel] = int(first_ms)
    return firsts


def _add_new_users(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    counts: Counts,
    overall_new: dict[int, int],
) -> None:
    since, until = flt.since_ms, flt.until_ms
    for by_channel in _first_starts(connection, flt).values():
        first = min(by_channel.values())
        if since is None or until is None or not since <= first < until:
            continue
        index = buckets.index(first)
        overall_new[index] = overall_new.get(index, 0) + 1
        if flt.group_by is None:
            continue
        # The contact is new in each group whose conversation starts at its first start.
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
    raw = select(Conversation.started_at_ms, Conversation.channel, Conversation.contact_id).where(
        Conversation.contact_id.is_not(None),
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    by_channel, overall = distinct_contacts(connection, flt, coverage, buckets, RollupStarters, raw)
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
        _add_new_users(connection, flt, buckets, counts, overall_new)

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
