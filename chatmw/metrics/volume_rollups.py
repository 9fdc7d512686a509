"""The ``volume`` counts from rollups, with raw rows for the parts rollups do not cover."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_distinct import distinct_contacts
from chatmw.metrics.rollup_query import Buckets, Coverage, bucket_index, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import RollupConversations, RollupMessages, RollupUsers

__all__ = ["volume_counts"]

Counts = dict[Any, dict[int, dict[str, int]]]


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _channel_columns(flt: MetricFilter, column: Any) -> tuple[Any, ...]:
    # Without a grouping every channel adds to the same buckets, so SQL sums them.
    return (column,) if flt.group_by is not None else ()


def _add_rollup_counts(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
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
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
) -> None:
    _add_rollup_counts(connection, flt, coverage, buckets, counts, "conversations")
    raw = select(Conversation.started_at_ms, Conversation.channel).where(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    for at_ms, channel in connection.execute(raw):
        counts[_key(flt, channel)][buckets.index(at_ms)]["conversations"] += 1


def _add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets, counts: Counts
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


def _add_users(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    counts: Counts,
    overall_users: dict[int, int],
) -> None:
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
    by_channel, overall = distinct_contacts(connection, flt, coverage, buckets, RollupUsers, raw)
    for (channel, index), users in by_channel.items():
        counts[channel][index]["users"] = users
    for index, users in overall.items():
        if flt.group_by is None:
            counts[None][index]["users"] = users
        else:
            overall_users[index] = users


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
        buckets = Buckets(starts, interval, flt.tz)
        counts: Counts = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
        overall_users: dict[int, int] = {}
        _add_conversations(connection, flt, coverage, buckets, counts)
        _add_messages(connection, flt, coverage, buckets, counts)
        _add_users(connection, flt, coverage, buckets, counts, overall_users)

    groups: dict[Any, dict[datetime, dict[str, int]]] = {}
    overall: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, by_bucket in counts.items():
        if not any(
            values.get("conversations") or values.get("messages") for values in by_bucket.values()
        ):
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
