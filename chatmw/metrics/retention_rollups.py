"""Retention cohorts from rollups, with raw rows for the contacts and times they do not cover.

A cohort is the set of contacts whose first conversation starts in a period of the window.
``rollup_firsts`` gives each contact's first start and second start (over all channels
or on one channel), so cohort sizes and same-period returns are counted from one index
range. The contacts who returned in a later period are the cohort's bitmap intersected with
the bitmap of contacts who started a conversation in that period. That bitmap takes whole UTC
days and epoch weeks from ``rollup_contact_sets`` (kind ``starters``), the other served
slots from ``rollup_starters`` and the raw ranges from raw conversations. Contacts changed
since the refresher's watermark are counted from their raw conversations instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, case, func, literal_column, select

from chatmw.metrics.contact_sets import ContactBitmap, intersection_count
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import Buckets, Coverage, bucket_index, cover
from chatmw.metrics.rollup_refresh import changed_contacts, time_in_ranges
from chatmw.metrics.window_sets import span_sets, with_ids
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import RollupFirsts

__all__ = ["CohortCounts", "retention_counts"]


@dataclass(slots=True)
class CohortCounts:
    """Per cohort index: users, users back in the same period, and users back k periods later."""

    sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    same_period: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    returned: dict[int, dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )


def _first_columns(flt: MetricFilter) -> tuple[list[Any], Any]:
    """Return the conditions that pick one row per contact, and its second-start column."""
    if flt.channels:
        return [RollupFirsts.channel == flt.channels[0]], RollupFirsts.second_started_ms
    return [RollupFirsts.first_rank == 0], RollupFirsts.second_any_ms


def _id_list(connection: Connection, column: Any) -> Any:
    """Return SQL that aggregates ``column`` into one value per group (see :func:`_ids`)."""
    if connection.dialect.name == "postgresql":
        return func.array_agg(column)
    return func.group_concat(column)


def _ids(value: Any) -> list[int]:
    # PostgreSQL returns array_agg as a list, SQLite group_concat as comma-separated text.
    if isinstance(value, str):
        return [int(part) for part in value.split(",")]
    return list(value)


def _cohort_members(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    changed: set[int],
    counts: dict[Any, CohortCounts],
) -> dict[tuple[Any, int], int]:
    """Count cohort sizes and same-period returns; return each cohort's contacts as a bitmap.

    One row per cohort and channel carries its contact ids, so the cost per cohort
    contact is one index entry read in SQL and one integer parsed here.
    """
    rows, second = _first_columns(flt)
    first = RollupFirsts.first_started_ms
    index = bucket_index(first, buckets.bounds)
    # The second start lies in the cohort's own period when it is in the same bucket.
    same_period = case(
        (
            (second < flt.until_ms) & (bucket_index(second, buckets.bounds) == index),
            literal_column("1"),
        ),
        else_=literal_column("0"),
    )
    unchanged = [RollupFirsts.contact_id.not_in(sorted(changed))] if changed else []
    statement = (
        select(
            index,
            RollupFirsts.channel,
            func.count(),
            func.sum(same_period),
            _id_list(connection, RollupFirsts.contact_id),
        )
        .where(*rows, first >= flt.since_ms, first < flt.until_ms, *unchanged)
        .group_by(index, RollupFirsts.channel)
    )
    keys_of = (None,) if flt.group_by is None else None
    members: dict[tuple[Any, int], ContactBitmap] = {}
    for bucket, channel, size, back, contact_ids in connection.execute(statement):
        cohort = int(bucket)
        bits = with_ids(None, _ids(contact_ids))
        for key in keys_of or (None, channel):
            counts[key].sizes[cohort] += int(size)
            counts[key].same_period[cohort] += int(back or 0)
            members[(key, cohort)] = with_ids(members.get((key, cohort)), bits)
    return members


def _period_starters(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets
) -> dict[int, ContactBitmap]:
    """Return, per period index from 1, the contacts who started a conversation in it."""
    # NOTE: periods whose edges are not UTC midnight read the slot rows of their partial
    # days. Day periods in a zone whose offset is not 0 thus read about one row per
    # conversation of the window, which is no faster than the raw path.
    spans = {index: buckets.span(index, coverage) for index in range(1, len(buckets.bounds) - 1)}
    starters: dict[int, ContactBitmap] = {}
    for (_, index, _), bits in span_sets(
        connection, ("starters",), spans, coverage.served, flt.channels
    ).items():
        starters[index] = with_ids(starters.get(index), bits)
    raw = select(Conversation.started_at_ms, Conversation.contact_id).where(
        Conversation.contact_id.is_not(None),
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
    )
    if flt.channels:
        raw = raw.where(Conversation.channel.in_(flt.channels))
    ids: dict[int, list[int]] = defaultdict(list)
    for started_ms, contact_id in connection.execute(raw):
        index = buckets.index(started_ms)
        if index >= 1:
            ids[index].append(contact_id)
    for index, contact_ids in ids.items():
        starters[index] = with_ids(starters.get(index), contact_ids)
    return starters


def _add_changed(
    connection: Connection,
    flt: MetricFilter,
    buckets: Buckets,
    changed: set[int],
    counts: dict[Any, CohortCounts],
) -> set[str]:
    """Count the cohorts of the ``changed`` contacts from their raw conversations.

    Returns the channels of their first conversations that started before ``until``.
    """
    ordered = sorted(changed)
    starts: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for offset in range(0, len(ordered), 500):
        statement = select(
            Conversation.contact_id, Conversation.started_at_ms, Conversation.channel
        ).where(
            Conversation.contact_id.in_(ordered[offset : offset + 500]),
            Conversation.started_at_ms < flt.until_ms,
        )
        if flt.channels:
            statement = statement.where(Conversation.channel.in_(flt.channels))
        for contact_id, started_ms, channel in connection.execute(statement):
            starts[contact_id].append((int(started_ms), channel))
    first_channels: set[str] = set()
    for conversations in starts.values():
        conversations.sort()
        first_ms, channel = conversations[0]
        first_channels.add(channel)
        if not flt.since_ms <= first_ms < flt.until_ms:  # type: ignore[operator]
            continue
        cohort = buckets.index(first_ms)
        offsets = {buckets.index(started) - cohort for started, _ in conversations[1:]}
        keys = (None, channel) if flt.group_by is not None else (None,)
        for key in keys:
            counts[key].sizes[cohort] += 1
            if 0 in offsets:
                counts[key].same_period[cohort] += 1
            for offset in offsets - {0}:
                counts[key].returned[cohort][offset] += 1
    return first_channels


def _group_keys(connection: Connection, flt: MetricFilter, changed: set[int]) -> set[Any]:
    """Return the channels of the first conversations of contacts that started before ``until``.

    The raw computation lists a group for each of them, with empty cohorts where no user
    of the group is new in the window.
    """
    rows, _ = _first_columns(flt)
    unchanged = [RollupFirsts.contact_id.not_in(sorted(changed))] if changed else []
    candidates: list[str] = list(flt.channels)
    if not candidates:
        # Loose index scan over (first_rank, channel): one seek per channel.
        last = ""
        while True:
            channel = connection.execute(
                select(func.min(RollupFirsts.channel)).where(
                    RollupFirsts.first_rank == 0, RollupFirsts.channel > last
                )
            ).scalar()
            if channel is None:
                break
            candidates.append(channel)
            last = channel
    keys: set[Any] = set()
    for channel in candidates:
        exists = (
            select(RollupFirsts.contact_id)
            .where(
                *rows,
                RollupFirsts.channel == channel,
                RollupFirsts.first_started_ms < flt.until_ms,
                *unchanged,
            )
            .limit(1)
        )
        if connection.execute(exists).first() is not None:
            keys.add(channel)
    return keys


def retention_counts(
    engine: Engine, flt: MetricFilter, starts: Sequence[datetime], period: str
) -> tuple[dict[Any, CohortCounts], set[Any]] | None:
    """Return cohort counts per group key (None for all users) and the group keys, or None.

    ``starts`` are the local starts of the periods from ``since`` to ``until``. Returns None
    where rollups do not apply: the filters that ``cover`` rejects, and more than one
    channel in the channel filter.
    """
    if len(flt.channels) > 1 or not starts:
        return None
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        if coverage is None:
            return None
        buckets = Buckets(starts, period, flt.tz)
        changed = changed_contacts(connection)
        counts: dict[Any, CohortCounts] = defaultdict(CohortCounts)
        counts[None] = CohortCounts()
        members = _cohort_members(connection, flt, buckets, changed, counts)
        starters = _period_starters(connection, flt, coverage, buckets)
        keys = _add_changed(connection, flt, buckets, changed, counts)
        if flt.group_by is not None:
            keys.update(_group_keys(connection, flt, changed))

    periods = len(starts)
    for (key, cohort), bits in members.items():
        for position in range(cohort + 1, periods):
            starter_bits = starters.get(position)
            back = 0 if starter_bits is None else intersection_count(bits, starter_bits)
            if back:
                counts[key].returned[cohort][position - cohort] += back
    return dict(counts), keys
