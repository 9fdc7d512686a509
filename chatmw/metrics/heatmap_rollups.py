"""The ``heatmap`` grids from rollups, with raw rows for the parts rollups do not cover."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.heatmap import local_slot
from chatmw.metrics.rollup_query import (
    Coverage,
    channel_condition,
    cover,
    raw_message_times,
)
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import RollupConversations, RollupMessages

__all__ = ["heatmap_counts", "Grids"]

# Per group key: (weekday, hour) -> count, for conversations and for messages.
Grids = dict[Any, dict[str, dict[tuple[int, int], int]]]


def _key(flt: MetricFilter, channel: str) -> Any:
    return channel if flt.group_by is not None else None


def _channel_columns(flt: MetricFilter, column: Any) -> tuple[Any, ...]:
    # Without a grouping every channel adds to the same cells, so SQL sums them.
    return (column,) if flt.group_by is not None else ()


def _add_conversations(
    connection: Connection, flt: MetricFilter, coverage: Coverage, grids: Grids
) -> None:
    channels = _channel_columns(flt, RollupConversations.channel)
    rollups = (
        select(RollupConversations.slot_ms, func.sum(RollupConversations.conversations), *channels)
        .where(
            RollupConversations.slot_ms >= coverage.first_slot,
            RollupConversations.slot_ms < coverage.end_slot,
            ~time_in_ranges(RollupConversations.slot_ms, coverage.raw),
            *channel_condition(RollupConversations.channel, flt),
        )
        .group_by(RollupConversations.slot_ms, *channels)
    )
    for slot, number, *channel in connection.execute(rollups):
        offset = coverage.offsets.slot_offset(slot)
        if offset is not None:
            cell = coverage.offsets.weekday_hour(slot, offset)
            grids[channel[0] if channel else None]["conversations"][cell] += int(number)
    raw = select(Conversation.started_at_ms, Conversation.channel).where(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    for at_ms, channel_name in connection.execute(raw):
        grids[_key(flt, channel_name)]["conversations"][local_slot(at_ms, flt.tz)] += 1


def _add_messages(
    connection: Connection, flt: MetricFilter, coverage: Coverage, grids: Grids
) -> None:
    channels = _channel_columns(flt, RollupMessages.channel)
    rollups = (
        select(RollupMessages.slot_ms, func.sum(RollupMessages.messages), *channels)
        .where(
            RollupMessages.start_slot_ms >= coverage.first_slot,
            RollupMessages.start_slot_ms < coverage.end_slot,
            ~time_in_ranges(RollupMessages.start_slot_ms, coverage.raw),
            *channel_condition(RollupMessages.channel, flt),
        )
        .group_by(RollupMessages.slot_ms, *channels)
    )
    # Message slots of served conversations that rollups do not count exactly.
    unserved: set[int] = set()
    for slot, number, *channel in connection.execute(rollups):
        offset = coverage.message_slot_offset(slot)
        if offset is None:
            unserved.add(slot)
            continue
        cell = coverage.offsets.weekday_hour(slot, offset)
        grids[channel[0] if channel else None]["messages"][cell] += int(number)

    for at_ms, channel in raw_message_times(connection, flt, coverage, unserved):
        grids[_key(flt, channel)]["messages"][local_slot(at_ms, flt.tz)] += 1


def heatmap_counts(engine: Engine, flt: MetricFilter) -> Grids | None:
    """Return per group the counts per (weekday, hour), or None where rollups do not apply."""
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        if coverage is None:
            return None
        grids: Grids = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
        _add_conversations(connection, flt, coverage, grids)
        _add_messages(connection, flt, coverage, grids)
    return grids
