"""The ``volume`` counts from rollups, with raw rows for the parts rollups do not cover."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from chatmw.events import to_ms
from chatmw.metrics.buckets import next_bucket
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import Coverage, bucket_index, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import RollupConversations, RollupMessages, RollupUsers

__all__ = ["volume_counts"]

Counts = dict[Any, dict[int, dict[str, int]]]


class _Buckets:
    """Bucket boundaries in ms, for finding the bucket of a time or a served slot."""

    def __init__(self, starts: Sequence[datetime], interval: str, flt: MetricFilter) -> None:
        self.bounds = [to_ms(start) for start in starts]
        self.bounds.append(to_ms(next_bucket(starts[-1], interval, flt.tz)))

    def index(self, moment_ms: int) -> int:
        return bisect_right(self.bounds, moment_ms) - 1

    def span(self, index: int, coverage: Coverage) -> tuple[int, int]:
        """Return the served slot range of bucket ``index`` inside the window."""
        start = max(self.bounds[index], coverage.first_slot)
        end = min(self.bounds[index + 1], coverage.end_slot)
        return start, end


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _channel_columns(flt: MetricFilter, column: Any) -> tuple[Any, ...]:
    # Without a grouping every channel adds to the same buckets, so SQL sums them.
    return (column,) if flt.group_by is not None else ()


def _add_rollup_counts(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: _Buckets,
    counts: Counts,
    figure: str,
) -> None:
    """Add the served slots' conversations or messages from rollups."""
    if figure == "conversations":
        slot, channel_column, number = (
            RollupConversations.slot_ms,
            RollupConversations.channel,
            RollupConversations.conversations,
        )
    else:
        slot, channel_column, number = (
            RollupMessages.slot_ms,
            RollupMessages.channel,
            RollupMessages.messages,
        )
    channels = _channel_columns(flt, channel_column)
    index = bucket_index(slot, buckets.bounds)
    statement = (
        select(index, func.sum(number), *channels)
        .where(
            slot >= coverage.first_slot,
            slot < coverage.end_slot,
            ~time_in_ranges(slot, coverage.raw),
            *channel_condition(channel_column, flt),
        )
        .group_by(index, *channels)
    )
    for bucket, total, *channel in connection.execute(statement):
        key = channel[0] if channel else None
        counts[key][int(bucket)][figure] += int(total)


def _add_conversations(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: _Buckets, counts: Counts
) -> None:
    _add_rollup_counts(connection, flt, coverage, buckets, counts, "conversations")
    raw = select(Conversation.started_at_ms, Conversation.channel).where(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    for at_ms, channel in connection.execute(raw):
        counts[_key(flt, channel)][buckets.index(at_ms)]["conversations"] += 1


def _add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: _Buckets, counts: Counts
) -> None:
    _add_rollup_counts(connection, flt, coverage, buckets, counts, "messages")
    raw = (
        select(Message.occurred_at_ms, Conversation.channel)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.kind.not_in(UNTIMED_KINDS),
            time_in_ranges(Message.occurred_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
    )
    for at_ms, channel in connection.execute(raw):
        counts[_key(flt, channel)][buckets.index(at_ms)]["messages"] += 1


def _mixed_buckets(coverage: Coverage, buckets: _Buckets) -> set[int]:
    """Return the buckets that contain part of the raw ranges."""
    mixed: set[int] = set()
    for start, end in coverage.raw:
        first = buckets.index(coverage.since_ms if start is None else start)
        last = buckets.index(end - 1)
        mixed.update(range(max(first, 0), last + 1))
    return mixed


def _distinct_users(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: _Buckets,
    whole: set[int],
    per_channel: bool,
) -> dict[tuple[Any, int], int]:
    """Count distinct contacts per bucket (and channel) over buckets served wholly from rollups."""
    index = bucket_index(RollupUsers.slot_ms, buckets.bounds)
    channels = (RollupUsers.channel,) if per_channel else ()
    statement = (
        select(index, func.count(func.distinct(RollupUsers.contact_id)), *channels)
        .where(
            RollupUsers.slot_ms >= coverage.first_slot,
            RollupUsers.slot_ms < coverage.end_slot,
            ~time_in_ranges(RollupUsers.slot_ms, coverage.raw),
            *channel_condition(RollupUsers.channel, flt),
        )
        .group_by(index, *channels)
    )
    result: dict[tuple[Any, int], int] = {}
    for bucket, users, *channel in connection.execute(statement):
        if int(bucket) in whole and users:
            result[(channel[0] if channel else None, int(bucket))] = int(users)
    return result


def _mixed_users(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: _Buckets,
    mixed: set[int],
) -> dict[int, dict[str, set[int]]]:
    """Return the contacts per bucket and channel of the buckets with a raw part."""
    contacts: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for index in sorted(mixed):
        start, end = buckets.span(index, coverage)
        if start >= end:
            continue
        rollups = select(RollupUsers.slot_ms, RollupUsers.channel, RollupUsers.contact_id).where(
            RollupUsers.slot_ms >= start,
            RollupUsers.slot_ms < end,
            *channel_condition(RollupUsers.channel, flt),
        )
        for slot, channel, contact_id in connection.execute(rollups):
            if slot in coverage.served:
                contacts[index][channel].add(contact_id)
    raw = (
        select(Message.occurred_at_ms, Conversation.channel, Message.contact_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.kind.not_in(UNTIMED_KINDS),
            Message.role == "user",
            Message.contact_id.is_not(None),
            time_in_ranges(Message.occurred_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
    )
    for at_ms, channel, contact_id in connection.execute(raw):
        contacts[buckets.index(at_ms)][channel].add(contact_id)
    return contacts


def _add_users(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: _Buckets,
    counts: Counts,
    overall_users: dict[int, int],
) -> None:
    mixed = _mixed_buckets(coverage, buckets)
    whole = {index for index in range(len(buckets.bounds) - 1) if index not in mixed}
    grouped = flt.group_by is not None
    for (channel, index), users in _distinct_users(
        connection, flt, coverage, buckets, whole, per_channel=grouped
    ).items():
        counts[_key(flt, channel)][index]["users"] = users
    if grouped:
        for (_, index), users in _distinct_users(
            connection, flt, coverage, buckets, whole, per_channel=False
        ).items():
            overall_users[index] = users
    for index, by_channel in _mixed_users(connection, flt, coverage, buckets, mixed).items():
        union: set[int] = set()
        for channel, contacts in by_channel.items():
            union |= contacts
            if grouped and contacts:
                counts[channel][index]["users"] = len(contacts)
        if union:
            if grouped:
                overall_users[index] = len(union)
            else:
                counts[None][index]["users"] = len(union)


def volume_counts(
    engine: Engine, flt: MetricFilter, interval: str, starts: Sequence[datetime]
) -> tuple[dict[datetime, dict[str, int]], dict[Any, dict[datetime, dict[str, int]]]] | None:
    """Return overall and per-group counts per bucket start, or None where rollups do not apply.

    The counts are those of the raw computation in ``chatmw.metrics.volume``: only groups
    with a conversation or a message in the window appear.
    """
    if not starts:
        return None
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        if coverage is None:
            return None
        buckets = _Buckets(starts, interval, flt)
        counts: Counts = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
        overall_users: dict[int, int] = {}
        _add_conversations(connection, flt, coverage, buckets, counts)
        _add_messages(connection, flt, coverage, buckets, counts)
        _add_users(connection, flt, coverage, buckets, counts, overall_users)

    groups: dict[Any, dict[datetime, dict[str, int]]] = {}
    overall: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, by_bucket in counts.items():
        if not any(values.get("conversations") or values.get("messages") for values in by_bucket.values()):
            continue
        groups[key] = {starts[index]: dict(values) for index, values in by_bucket.items()}
        for index, values in by_bucket.items():
            overall[starts[index]]["conversations"] += values.get("conversations", 0)
            overall[starts[index]]["messages"] += values.get("messages", 0)
            if flt.group_by is None:
                overall[starts[index]]["users"] = values.get("users", 0)
    for index, users in overall_users.items():
        overall[starts[index]]["users"] = users
    return overall, groups
