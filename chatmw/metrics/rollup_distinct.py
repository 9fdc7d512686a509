"""Distinct contacts per bucket from a slotted contact rollup and raw rows.

Distinct counts do not add up across slots. When some bucket contains a whole UTC day
or epoch week whose slots are all served, every bucket is counted from the day and week
bitmaps of ``rollup_contact_sets`` (``chatmw.metrics.contact_sets``) plus the contacts of
its other slots and raw rows. Otherwise (hour buckets, or day buckets in a zone whose
offset is not 0) a bucket served wholly from rollups is counted with COUNT(DISTINCT) over
its slots in SQL, and a bucket with a raw part counts the union of the contact sets of
its served slots and of its raw rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, func, select

from chatmw.metrics.contact_sets import count_distinct
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import (
    Buckets,
    Coverage,
    bucket_index,
    channel_condition,
    mixed_buckets,
)
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import RollupStarters

__all__ = ["distinct_contacts", "distinct_starters"]

# Contact tables with day and week sets in rollup_contact_sets, by the sets' kind.
_SET_KINDS = {"rollup_users": "users", "rollup_starters": "starters"}

# NOTE: the COUNT(DISTINCT) path reads one row per active contact and slot. On the
# 10-million-message store of bench/queries.py that took 0.5 to 2 s per 30-day query
# (SQLite, loaded 2-core machine), so hour buckets, and day buckets in a zone whose offset
# is not 0, are still slow on large stores.


def _whole_counts(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    table: Any,
    whole: set[int],
    per_channel: bool,
) -> dict[tuple[Any, int], int]:
    index = bucket_index(table.slot_ms, buckets.bounds)
    channels = (table.channel,) if per_channel else ()
    statement = (
        select(index, func.count(func.distinct(table.contact_id)), *channels)
        .where(
            table.slot_ms >= coverage.first_slot,
            table.slot_ms < coverage.end_slot,
            ~time_in_ranges(table.slot_ms, coverage.raw),
            *channel_condition(table.channel, flt),
        )
        .group_by(index, *channels)
    )
    result: dict[tuple[Any, int], int] = {}
    for bucket, contacts, *channel in connection.execute(statement):
        if int(bucket) in whole and contacts:
            result[(channel[0] if channel else None, int(bucket))] = int(contacts)
    return result


def _mixed_sets(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    table: Any,
    raw: Any,
    mixed: set[int],
) -> dict[int, dict[str, set[int]]]:
    contacts: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for index in sorted(mixed):
        start, end = buckets.span(index, coverage)
        if start >= end:
            continue
        rollups = select(table.slot_ms, table.channel, table.contact_id).where(
            table.slot_ms >= start, table.slot_ms < end, *channel_condition(table.channel, flt)
        )
        for slot, channel, contact_id in connection.execute(rollups):
            if slot in coverage.served:
                contacts[index][channel].add(contact_id)
    for at_ms, channel, contact_id in connection.execute(raw):
        contacts[buckets.index(at_ms)][channel].add(contact_id)
    return contacts


def distinct_contacts(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    buckets: Buckets,
    table: Any,
    raw: Any,
) -> tuple[dict[tuple[Any, int], int], dict[int, int]]:
    """Count distinct contacts per (channel, bucket) when grouped, and per bucket overall.

    ``table`` is a rollup model with ``slot_ms``, ``channel`` and ``contact_id``; ``raw``
    selects (time in ms, channel, contact id) of the raw rows in ``coverage.raw``. The
    per-channel counts are empty unless ``flt`` groups by channel.
    """
    kind = _SET_KINDS.get(table.__tablename__)
    if kind is not None:

        def raw_rows() -> Iterator[tuple[int, str, int]]:
            for at_ms, channel, contact_id in connection.execute(raw):
                yield buckets.index(at_ms), channel, contact_id

        spans = {index: buckets.span(index, coverage) for index in range(len(buckets.bounds) - 1)}
        counted = count_distinct(
            connection, kind, spans, coverage.served, flt.channels, raw_rows()
        )
        if counted is not None:
            per_channel, overall_counts = counted
            return (per_channel if flt.group_by is not None else {}), overall_counts
    mixed = mixed_buckets(coverage, buckets)
    whole = {index for index in range(len(buckets.bounds) - 1) if index not in mixed}
    grouped = flt.group_by is not None
    by_channel: dict[tuple[Any, int], int] = {}
    if grouped:
        by_channel = _whole_counts(connection, flt, coverage, buckets, table, whole, True)
    overall = {
        index: contacts
        for (_, index), contacts in _whole_counts(
            connection, flt, coverage, buckets, table, whole, False
        ).items()
    }
    for index, sets in _mixed_sets(connection, flt, coverage, buckets, table, raw, mixed).items():
        union: set[int] = set()
        for channel, contacts in sets.items():
            union |= contacts
            if grouped and contacts:
                by_channel[(channel, index)] = len(contacts)
        if union:
            overall[index] = len(union)
    return by_channel, overall


def distinct_starters(
    connection: Connection, flt: MetricFilter, coverage: Coverage, buckets: Buckets
) -> tuple[dict[tuple[Any, int], int], dict[int, int]]:
    """Count the distinct contacts of the conversations that started in each bucket.

    The counts are those of :func:`distinct_contacts` on ``rollup_starters``: a
    conversation without a contact is left out.
    """
    raw = select(Conversation.started_at_ms, Conversation.channel, Conversation.contact_id).where(
        Conversation.contact_id.is_not(None),
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    return distinct_contacts(connection, flt, coverage, buckets, RollupStarters, raw)
