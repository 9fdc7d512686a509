"""Resolution, survey and query type counts of a filter's conversations, from rollups.

The served slots of the window are read from ``rollup_outcomes``, ``rollup_surveys`` and
``rollup_query_types`` (week, day, hour and slot rows). The conversations that started in
the raw ranges are counted from raw rows by the same functions that count slot rows.
Each function returns counts per channel, or None when rollups do not apply (see
``chatmw.metrics.rollup_query.cover``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.outcome_rollups import (
    OUTCOMES,
    QUERY_TYPES,
    SURVEYS,
    OutcomeCounts,
    SurveyCounts,
    TypeCounts,
    collect_outcomes,
    collect_query_types,
    collect_surveys,
)
from chatmw.metrics.rollup_levels import LeveledSums
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.models import Conversation

__all__ = [
    "outcome_sums",
    "survey_sums",
    "surveys_in",
    "query_type_sums",
    "rolled_sums",
    "raw_where",
]

Result = TypeVar("Result")


def _with_coverage(
    engine: Engine, flt: MetricFilter, read: Callable[[Connection, Coverage], Result]
) -> Result | None:
    # Start slots are counted in UTC: the time zone does not change which conversations
    # started in the window.
    utc = dataclasses.replace(flt, tz=ZoneInfo("UTC"))
    with engine.connect() as connection:
        coverage = cover(connection, utc)
        if coverage is None:
            return None
        return read(connection, coverage)


def rolled_sums(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    table: LeveledSums,
    where: list[ColumnElement[bool]] | None = None,
) -> list[tuple[Any, ...]]:
    """Return the sums of ``table`` over the served slots, per key (channel first)."""
    served = table.served(coverage)
    if served is None:
        return []
    keys = [getattr(table.table, name) for name in table.keys]
    statement = (
        select(*keys, *(func.sum(getattr(table.table, name)) for name in table.sums))
        .where(served, *channel_condition(table.table.channel, flt), *(where or []))
        .group_by(*keys)
    )
    return [tuple(row) for row in connection.execute(statement)]


def raw_where(flt: MetricFilter, coverage: Coverage) -> ColumnElement[bool] | None:
    """Return SQL selecting the conversations of ``flt`` that started in the raw ranges."""
    if not coverage.raw:
        return None
    in_raw = time_in_ranges(Conversation.started_at_ms, coverage.raw)
    if flt.channels:
        in_raw = in_raw & Conversation.channel.in_(flt.channels)
    return in_raw


def outcome_sums(engine: Engine, flt: MetricFilter) -> dict[str, OutcomeCounts] | None:
    """Return the resolution counts per channel with the default repeat window, or None."""

    def read(connection: Connection, coverage: Coverage) -> dict[str, OutcomeCounts]:
        by_channel: dict[str, OutcomeCounts] = defaultdict(OutcomeCounts)
        for channel, *values in rolled_sums(connection, flt, coverage, OUTCOMES):
            by_channel[channel].add(OutcomeCounts(*(int(value or 0) for value in values)))
        in_raw = raw_where(flt, coverage)
        if in_raw is not None:
            for (_, channel), counts in collect_outcomes(connection, in_raw).items():
                by_channel[channel].add(counts)
        return {channel: counts for channel, counts in by_channel.items() if counts.conversations}

    return _with_coverage(engine, flt, read)


def survey_sums(engine: Engine, flt: MetricFilter, kind: str) -> dict[str, SurveyCounts] | None:
    """Return the surveys of ``kind`` per channel, or None without rollups."""
    return _with_coverage(
        engine, flt, lambda connection, coverage: surveys_in(connection, flt, coverage, kind)
    )


def surveys_in(
    connection: Connection, flt: MetricFilter, coverage: Coverage, kind: str
) -> dict[str, SurveyCounts]:
    """Return the surveys of ``kind`` per channel of the conversations ``coverage`` splits.

    ``coverage`` must come from ``cover`` on ``flt`` in UTC.
    """
    by_channel: dict[str, SurveyCounts] = defaultdict(SurveyCounts)
    rows = rolled_sums(connection, flt, coverage, SURVEYS, [SURVEYS.table.kind == kind])
    for channel, _, answered, score, surveys, sent in rows:
        item = by_channel[channel]
        item.surveys += int(surveys or 0)
        item.sent += int(sent or 0)
        if answered:
            item.scores[int(score)] = item.scores.get(int(score), 0) + int(surveys or 0)
    in_raw = raw_where(flt, coverage)
    if in_raw is not None:
        for (_, channel, found), counts in collect_surveys(connection, in_raw).items():
            if found == kind:
                by_channel[channel].add(counts)
    return {channel: counts for channel, counts in by_channel.items() if counts.surveys}


def query_type_sums(
    engine: Engine, flt: MetricFilter
) -> dict[str, dict[tuple[str, str], TypeCounts]] | None:
    """Return channel -> (intent, rule type) -> counts, or None without rollups.

    A missing or empty intent or rule type is ``""``.
    """

    def read(
        connection: Connection, coverage: Coverage
    ) -> dict[str, dict[tuple[str, str], TypeCounts]]:
        by_channel: dict[str, dict[tuple[str, str], TypeCounts]] = defaultdict(
            lambda: defaultdict(TypeCounts)
        )
        for channel, intent, rule_type, *values in rolled_sums(
            connection, flt, coverage, QUERY_TYPES
        ):
            part = TypeCounts(*(int(value or 0) for value in values))
            by_channel[channel][(intent, rule_type)].add(part)
        in_raw = raw_where(flt, coverage)
        if in_raw is not None:
            for (_, channel, intent, rule_type), counts in collect_query_types(
                connection, in_raw
            ).items():
                by_channel[channel][(intent, rule_type)].add(counts)
        return {
            channel: {key: counts for key, counts in types.items() if counts.conversations}
            for channel, types in by_channel.items()
            if any(counts.conversations for counts in types.values())
        }

    return _with_coverage(engine, flt, read)
