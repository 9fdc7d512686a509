"""Rollups of the ``attribution`` metric: touch labels per conversation, sets per day and week.

``rollup_attribution`` keeps one row per conversation, keyed by its start slot like the
other rollups of started conversations. A row contains the conversation's channel and
contact, and the label of each touch field (source, medium, campaign, ad) of its first
and last touch as the metric shows it (``(none)`` without a touch or value). A dirty
start slot is recomputed from raw rows, so the rows follow late messages, moved starts
and touch changes.

``rollup_attribution_sets`` sums those rows per UTC day and epoch week, channel, touch,
field and label: the number of conversations and their contacts as a compressed bitset
(``chatmw.metrics.contact_sets.encode``). The sets of a day and of its week are rebuilt
from the slot rows whenever a slot of that day is recomputed.

A query reads the sets of the whole days and weeks of its window that are served, the
slot rows of the other served slots, and raw rows for the rest, so its work grows with
the number of labels, channels and days rather than with the number of conversations.
Conversions come from ``rollup_conversion_links`` joined to the slot rows.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, delete, func, insert, literal, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from chatmw.events_business import format_micros
from chatmw.metrics.business_query import raw_links, serves_days, serves_filter
from chatmw.metrics.contact_sets import count_union, decode, encode, plan_spans
from chatmw.metrics.filters import TOUCH_FIELDS, MetricFilter
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import slot_expression, time_in_ranges
from chatmw.metrics.rollup_started import aligned_ranges
from chatmw.metrics.scope import UNKNOWN_GROUP
from chatmw.store.models import Conversation, Touch
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
    RollupAttribution,
    RollupAttributionSets,
    RollupConversionLinks,
)

__all__ = [
    "ATTRIBUTION_TABLES",
    "TOUCHES",
    "LABEL_COLUMNS",
    "conversation_labels",
    "delete_attribution",
    "insert_attribution",
    "refresh_attribution_sets",
    "rolled_attribution",
]

ATTRIBUTION_TABLES = (RollupAttribution, RollupAttributionSets)
TOUCHES = ("first", "last")
# The label columns of rollup_attribution, as (touch, field, column name).
LABEL_COLUMNS = tuple(
    (touch, name, f"{touch}_{name}") for touch in TOUCHES for name in TOUCH_FIELDS
)
_ROW_COLUMNS = (
    "conversation_id",
    "start_slot_ms",
    "channel",
    "contact_id",
    *(column for _, _, column in LABEL_COLUMNS),
)
DAY_MS = LEVEL_WIDTH_MS[LEVEL_DAY]
WEEK_MS = LEVEL_WIDTH_MS[LEVEL_WEEK]
# Ranges per statement, as in chatmw.metrics.rollup_refresh.
_RANGES = 50

Ranges = list[tuple[int | None, int]]


def _parts(ranges: Ranges) -> Iterable[Ranges]:
    for index in range(0, len(ranges), _RANGES):
        yield ranges[index : index + _RANGES]


def conversation_labels(where: ColumnElement[bool]) -> Any:
    """Select the rows of ``rollup_attribution`` (``_ROW_COLUMNS`` order) from raw rows."""
    first, last = aliased(Touch), aliased(Touch)
    labels = [
        func.coalesce(
            getattr(first if touch == "first" else last, TOUCH_FIELDS[name]),
            literal(UNKNOWN_GROUP),
        )
        for touch, name, _ in LABEL_COLUMNS
    ]
    return (
        select(
            Conversation.id,
            slot_expression(Conversation.started_at_ms),
            Conversation.channel,
            Conversation.contact_id,
            *labels,
        )
        .outerjoin(first, first.id == Conversation.first_touch_id)
        .outerjoin(last, last.id == Conversation.last_touch_id)
        .where(where)
    )


def delete_attribution(connection: Connection, ranges: Ranges) -> None:
    """Delete the conversation rows of the start slots in ``ranges``."""
    for part in _parts(ranges):
        connection.execute(
            delete(RollupAttribution).where(time_in_ranges(RollupAttribution.start_slot_ms, part))
        )


def insert_attribution(connection: Connection, ranges: Ranges) -> None:
    """Insert the rows of the conversations that started in ``ranges``, and rebuild their sets.

    The rows of ``ranges`` must be deleted first (or the table empty).
    """
    for part in _parts(ranges):
        connection.execute(
            insert(RollupAttribution).from_select(
                list(_ROW_COLUMNS),
                conversation_labels(time_in_ranges(Conversation.started_at_ms, part)),
            )
        )
    refresh_attribution_sets(connection, ranges)


@dataclass(slots=True)
class _Sums:
    """Conversations and contacts per (touch, field, label), as bitsets and id lists."""

    conversations: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    bits: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    ids: dict[tuple[str, str, str], list[int]] = field(default_factory=lambda: defaultdict(list))

    def add_row(self, contact_id: int | None, labels: Iterable[str]) -> None:
        """Add one conversation with the labels of ``LABEL_COLUMNS``."""
        for (touch, name, _), label in zip(LABEL_COLUMNS, labels, strict=True):
            key = (touch, name, label)
            self.conversations[key] += 1
            if contact_id is not None:
                self.ids[key].append(int(contact_id))


def _bitset_blob(bits: int) -> bytes:
    """Return the bitset ``bits`` compressed as :func:`chatmw.metrics.contact_sets.encode` does."""
    return zlib.compress(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), 1)


def refresh_attribution_sets(connection: Connection, ranges: Ranges) -> None:
    """Rebuild the day and week sets that contain ``ranges`` from the slot rows.

    Ranges before the epoch get no sets, because queries never read those slots from rollups.
    """
    days = aligned_ranges(ranges, DAY_MS)
    weeks = aligned_ranges(ranges, WEEK_MS)
    for level, spans in ((LEVEL_DAY, days), (LEVEL_WEEK, weeks)):
        for part in _parts(list(spans)):
            connection.execute(
                delete(RollupAttributionSets).where(
                    RollupAttributionSets.level == level,
                    time_in_ranges(RollupAttributionSets.start_ms, part),
                )
            )
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    rows: list[dict[str, Any]] = []
    for low, high in days:
        for day in range(low, high, DAY_MS):
            sums: dict[str, _Sums] = defaultdict(_Sums)
            statement = select(
                RollupAttribution.channel, RollupAttribution.contact_id, *labels
            ).where(
                RollupAttribution.start_slot_ms >= day,
                RollupAttribution.start_slot_ms < day + DAY_MS,
            )
            for channel, contact_id, *values in connection.execute(statement):
                sums[channel].add_row(contact_id, values)
            rows.extend(
                {
                    "level": LEVEL_DAY,
                    "start_ms": day,
                    "channel": channel,
                    "touch": touch,
                    "field": name,
                    "value": label,
                    "conversations": count,
                    "contacts": encode(channel_sums.ids.get((touch, name, label), [])),
                }
                for channel, channel_sums in sums.items()
                for (touch, name, label), count in channel_sums.conversations.items()
            )
    if rows:
        connection.execute(insert(RollupAttributionSets), rows)
    rows = []
    for low, high in weeks:
        for week in range(low, high, WEEK_MS):
            counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
            unions: dict[tuple[str, str, str, str], int] = defaultdict(int)
            statement = select(
                RollupAttributionSets.channel,
                RollupAttributionSets.touch,
                RollupAttributionSets.field,
                RollupAttributionSets.value,
                RollupAttributionSets.conversations,
                RollupAttributionSets.contacts,
            ).where(
                RollupAttributionSets.level == LEVEL_DAY,
                RollupAttributionSets.start_ms >= week,
                RollupAttributionSets.start_ms < week + WEEK_MS,
            )
            for channel, touch, name, label, count, blob in connection.execute(statement):
                key = (channel, touch, name, label)
                counts[key] += int(count)
                unions[key] |= decode(blob)
            rows.extend(
                {
                    "level": LEVEL_WEEK,
                    "start_ms": week,
                    "channel": channel,
                    "touch": touch,
                    "field": name,
                    "value": label,
                    "conversations": count,
                    "contacts": _bitset_blob(unions[key]),
                }
                for key, count in counts.items()
                for channel, touch, name, label in [key]
            )
    if rows:
        connection.execute(insert(RollupAttributionSets), rows)


def _add_periods(
    connection: Connection, flt: MetricFilter, periods: list[tuple[int, int]], sums: _Sums
) -> None:
    """Add the day and week sets of ``periods`` (level, start) to ``sums``."""
    if not periods:
        return
    by_level: dict[int, list[int]] = defaultdict(list)
    for level, start in periods:
        by_level[level].append(start)
    sets = RollupAttributionSets
    statement = select(sets.touch, sets.field, sets.value, sets.conversations, sets.contacts).where(
        or_(
            *(
                (sets.level == level) & sets.start_ms.in_(sorted(starts))
                for level, starts in by_level.items()
            )
        ),
        *channel_condition(sets.channel, flt),
    )
    for touch, name, label, count, blob in connection.execute(statement):
        key = (touch, name, label)
        sums.conversations[key] += int(count)
        sums.bits[key] |= decode(blob)


def _add_slot_rows(
    connection: Connection, flt: MetricFilter, coverage: Coverage, edges: Ranges, sums: _Sums
) -> None:
    """Add the conversation rows of the served slots in ``edges`` to ``sums``."""
    if not edges:
        return
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    statement = select(
        RollupAttribution.start_slot_ms, RollupAttribution.contact_id, *labels
    ).where(
        time_in_ranges(RollupAttribution.start_slot_ms, edges),
        *channel_condition(RollupAttribution.channel, flt),
    )
    for slot, contact_id, *values in connection.execute(statement):
        if slot in coverage.served:
            sums.add_row(contact_id, values)


def _add_raw_rows(
    connection: Connection, flt: MetricFilter, coverage: Coverage, sums: _Sums
) -> dict[int, list[str]]:
    """Add the conversations of the raw ranges to ``sums`` and return their labels by id."""
    if not coverage.raw:
        return {}
    where = time_in_ranges(Conversation.started_at_ms, coverage.raw)
    statement = conversation_labels(where).where(*channel_condition(Conversation.channel, flt))
    found: dict[int, list[str]] = {}
    for conversation_id, _, _, contact_id, *values in connection.execute(statement):
        sums.add_row(contact_id, values)
        found[int(conversation_id)] = values
    return found


def _conversions(
    connection: Connection, flt: MetricFilter, coverage: Coverage, raw: dict[int, list[str]]
) -> tuple[dict[tuple[str, str, str], dict[int, int]], dict[int, int]]:
    """Return the attributed conversions (id -> micros) per label, and over the window."""
    links = RollupConversionLinks
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    statement = (
        select(links.conversion_id, links.value_micros, *labels)
        .join(RollupAttribution, RollupAttribution.conversation_id == links.conversation_id)
        .where(
            *coverage.served_conditions(links.start_slot_ms),
            *channel_condition(links.channel, flt),
        )
    )
    rows: list[Any] = list(connection.execute(statement))
    for link in raw_links(connection, flt, coverage):
        values = raw.get(link["conversation_id"])
        # A conversation stored after the raw rows were read is in neither count.
        if values is not None:
            rows.append((link["conversion_id"], link["value_micros"], *values))
    by_label: dict[tuple[str, str, str], dict[int, int]] = defaultdict(dict)
    overall: dict[int, int] = {}
    for conversion_id, micros, *values in rows:
        overall[conversion_id] = int(micros)
        for (touch, name, _), label in zip(LABEL_COLUMNS, values, strict=True):
            by_label[(touch, name, label)][conversion_id] = int(micros)
    return by_label, overall


def _field_rows(
    sums: _Sums, conversions: dict[tuple[str, str, str], dict[int, int]], touch: str, name: str
) -> list[dict[str, Any]]:
    counts = {
        key[2]: count
        for key, count in sums.conversations.items()
        if key[0] == touch and key[1] == name and count
    }
    rows = []
    for label in sorted(counts, key=lambda item: (-counts[item], item)):
        key = (touch, name, label)
        values = conversions.get(key, {})
        rows.append(
            {
                "value": label,
                "conversations": counts[label],
                "users": count_union(sums.bits.get(key, 0), set(sums.ids.get(key, ()))),
                "conversions": len(values),
                "revenue": format_micros(sum(values.values())),
            }
        )
    return rows


def rolled_attribution(engine: Engine, flt: MetricFilter, days: float) -> dict[str, Any] | None:
    """Return ``totals``, ``first_touch`` and ``last_touch`` of ``attribution``, or None.

    None means that rollups do not serve the query: another attribution window, an
    attribute or touch filter, a grouping, or a window ``cover`` leaves to raw rows.
    """
    if not (serves_days(days) and serves_filter(flt, (None,))):
        return None
    sums = _Sums()
    with engine.connect() as connection:
        coverage = cover(connection, dataclasses.replace(flt, tz=ZoneInfo("UTC")))
        if coverage is None:
            return None
        if coverage.first_slot < coverage.end_slot:
            periods, rest = plan_spans(
                {0: (coverage.first_slot, coverage.end_slot)}, coverage.served
            )
            _add_periods(connection, flt, periods.get(0, []), sums)
            _add_slot_rows(connection, flt, coverage, list(rest.get(0, [])), sums)
        raw = _add_raw_rows(connection, flt, coverage, sums)
        conversions, overall = _conversions(connection, flt, coverage, raw)
    # Each conversation has one first-touch source label, so those labels partition them.
    total_bits = 0
    total_ids: set[int] = set()
    total_conversations = 0
    for (touch, name, _), count in sums.conversations.items():
        if (touch, name) == ("first", "source"):
            total_conversations += count
    for key, bits in sums.bits.items():
        if key[:2] == ("first", "source"):
            total_bits |= bits
    for key, ids in sums.ids.items():
        if key[:2] == ("first", "source"):
            total_ids.update(ids)
    result: dict[str, Any] = {
        "totals": {
            "conversations": total_conversations,
            "users": count_union(total_bits, total_ids),
            "conversions": len(overall),
            "revenue": format_micros(sum(overall.values())),
        }
    }
    for touch in TOUCHES:
        result[f"{touch}_touch"] = {
            name: _field_rows(sums, conversions, touch, name) for name in TOUCH_FIELDS
        }
    return result
