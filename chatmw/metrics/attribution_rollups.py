"""Rollups of the ``attribution`` metric: touch labels per conversation, sets per day and week.

``rollup_attribution`` keeps one row per conversation, keyed by its start slot like the
other rollups of started conversations. A row contains the conversation's channel and
contact, and the label of each touch field (source, medium, campaign, ad) of its first
and last touch as the metric shows it (``(none)`` without a touch or value). A dirty
start slot is recomputed from raw rows, so the rows follow late messages, moved starts
and touch changes.

``rollup_attribution_sets`` sums those rows per UTC day and epoch week, touch, field and
label, once per channel and once over all channels. A set row contains the number of
conversations, their contacts as a serialized Roaring bitmap
(``chatmw.metrics.contact_sets.encode``),
and the conversions that name one of them with the sum of their values as decimal
digits, because that sum can exceed 64 bits. The sets of a day and of its week are
rebuilt from the slot rows and the link rows whenever a slot of that day is recomputed.

A query reads the sets of the whole days and weeks of its window that are served, the
slot rows of the other served slots, and raw rows for the rest. Its work on the sets
grows with the number of labels, channels and days, not with the number of
conversations. Conversions that name only a user can count for conversations on several
days, so they come from ``rollup_conversion_links`` joined to the slot rows.
"""

from __future__ import annotations

import dataclasses
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
from chatmw.metrics.contact_sets import (
    ContactBitmap,
    count_union,
    decode,
    encode,
    union,
    whole_periods,
)
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
    SLOT_MS,
    RollupAttribution,
    RollupAttributionSets,
    RollupConversionLinks,
)

__all__ = [
    "ALL_CHANNELS",
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
# Added to the level of set rows that count every channel (their channel is "").
ALL_CHANNELS = 10

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


Key = tuple[str, str, str]
# The label and figures of a set row, in the order the queries unpack them.
_SET_FIGURES = (
    RollupAttributionSets.touch,
    RollupAttributionSets.field,
    RollupAttributionSets.value,
    RollupAttributionSets.conversations,
    RollupAttributionSets.named_conversions,
    RollupAttributionSets.named_micros,
    RollupAttributionSets.contacts,
)


@dataclass(slots=True)
class _Sums:
    """Figures per (touch, field, label).

    ``bits`` and ``ids`` are contacts, as the bitmaps of set rows and as id lists. ``named`` and
    ``named_micros`` count the conversions that name a conversation, which have one link
    row each, so their counts add up across slots.
    """

    conversations: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    bits: dict[Key, list[ContactBitmap]] = field(default_factory=lambda: defaultdict(list))
    ids: dict[Key, list[int]] = field(default_factory=lambda: defaultdict(list))
    named: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    named_micros: dict[Key, int] = field(default_factory=lambda: defaultdict(int))

    def add_row(
        self, contact_id: int | None, labels: Iterable[str], named: tuple[int, int] = (0, 0)
    ) -> None:
        """Add one conversation with the labels of ``LABEL_COLUMNS`` and its named conversions."""
        for (touch, name, _), label in zip(LABEL_COLUMNS, labels, strict=True):
            key = (touch, name, label)
            self.conversations[key] += 1
            if contact_id is not None:
                self.ids[key].append(int(contact_id))
            if named[0]:
                self.named[key] += named[0]
                self.named_micros[key] += named[1]

    def users(self, key: Key) -> int:
        """Return the number of distinct contacts of ``key`` in its bitmaps and id lists."""
        return count_union(self.bits.get(key, ()), self.ids.get(key, ()))


def _named_conversions(connection: Connection, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Return (conversions, micros) per conversation of the named conversions in a slot range."""
    links = RollupConversionLinks
    statement = select(links.conversation_id, links.value_micros).where(
        links.by_user == 0, links.start_slot_ms >= start, links.start_slot_ms < end
    )
    # Summed here: SQLite's SUM fails on a total beyond 64 bits.
    named: dict[int, tuple[int, int]] = {}
    for conversation_id, micros in connection.execute(statement):
        count, total = named.get(int(conversation_id), (0, 0))
        named[int(conversation_id)] = (count + 1, total + int(micros))
    return named


def _set_row(
    level: int, start: int, channel: str, key: Key, figures: tuple[int, int, int, bytes]
) -> dict[str, Any]:
    conversations, named, micros, blob = figures
    return {
        "level": level,
        "start_ms": start,
        "channel": channel,
        "touch": key[0],
        "field": key[1],
        "value": key[2],
        "conversations": conversations,
        "named_conversions": named,
        "named_micros": str(micros),
        "contacts": blob,
    }


def _day_rows(connection: Connection, day: int) -> list[dict[str, Any]]:
    """Return the set rows of one day, per channel and over all channels."""
    named = _named_conversions(connection, day, day + DAY_MS)
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    statement = select(
        RollupAttribution.conversation_id,
        RollupAttribution.channel,
        RollupAttribution.contact_id,
        *labels,
    ).where(RollupAttribution.start_slot_ms >= day, RollupAttribution.start_slot_ms < day + DAY_MS)
    sums: dict[str, _Sums] = defaultdict(_Sums)
    everywhere = _Sums()
    for conversation_id, channel, contact_id, *values in connection.execute(statement):
        figures = named.get(int(conversation_id), (0, 0))
        sums[channel].add_row(contact_id, values, figures)
        everywhere.add_row(contact_id, values, figures)
    rows = []
    for level, channel, day_sums in [
        *((LEVEL_DAY, channel, channel_sums) for channel, channel_sums in sums.items()),
        (LEVEL_DAY + ALL_CHANNELS, "", everywhere),
    ]:
        rows.extend(
            _set_row(
                level,
                day,
                channel,
                key,
                (
                    count,
                    day_sums.named[key],
                    day_sums.named_micros[key],
                    encode(day_sums.ids[key]),
                ),
            )
            for key, count in day_sums.conversations.items()
        )
    return rows


def _week_rows(connection: Connection, week: int) -> list[dict[str, Any]]:
    """Return the set rows of one week, summed from the rows of its days."""
    sets = RollupAttributionSets
    figures: dict[tuple[int, str, Key], list[Any]] = defaultdict(lambda: [0, 0, 0, []])
    statement = select(sets.level, sets.channel, *_SET_FIGURES).where(
        sets.level.in_((LEVEL_DAY, LEVEL_DAY + ALL_CHANNELS)),
        sets.start_ms >= week,
        sets.start_ms < week + WEEK_MS,
    )
    for level, channel, touch, name, label, count, named, micros, blob in connection.execute(
        statement
    ):
        sums = figures[(int(level) - LEVEL_DAY + LEVEL_WEEK, channel, (touch, name, label))]
        sums[0] += int(count)
        sums[1] += int(named)
        sums[2] += int(micros)
        sums[3].append(decode(blob))
    rows = []
    for (level, channel, key), (count, named, micros, bitmaps) in figures.items():
        contacts = encode(union(bitmaps))
        rows.append(_set_row(level, week, channel, key, (count, named, micros, contacts)))
    return rows


def refresh_attribution_sets(connection: Connection, ranges: Ranges) -> None:
    """Rebuild the day and week sets that contain ``ranges`` from the slot rows.

    Ranges before the epoch get no sets, because queries never read those slots from rollups.
    The conversion links of ``ranges`` must be up to date, because the sets count the
    conversions that name a conversation.
    """
    days = aligned_ranges(ranges, DAY_MS)
    weeks = aligned_ranges(ranges, WEEK_MS)
    for level, spans in ((LEVEL_DAY, days), (LEVEL_WEEK, weeks)):
        for part in _parts(list(spans)):
            connection.execute(
                delete(RollupAttributionSets).where(
                    RollupAttributionSets.level.in_((level, level + ALL_CHANNELS)),
                    time_in_ranges(RollupAttributionSets.start_ms, part),
                )
            )
    for spans, width, build in ((days, DAY_MS, _day_rows), (weeks, WEEK_MS, _week_rows)):
        for low, high in spans:
            for start in range(low, high, width):
                rows = build(connection, start)
                if rows:
                    connection.execute(insert(RollupAttributionSets), rows)


def _plan(coverage: Coverage) -> tuple[list[tuple[int, int]], Ranges]:
    """Split the served slots into whole weeks and days (level, start) and other slot ranges.

    A week with an unserved slot is split into days, so one late event costs the slot
    rows of one day, not of a week.
    """
    periods: list[tuple[int, int]] = []
    rest: Ranges = []
    if coverage.first_slot >= coverage.end_slot:
        return periods, rest
    whole, left = whole_periods(coverage.first_slot, coverage.end_slot)
    for level, start in whole:
        days = [start] if level == LEVEL_DAY else list(range(start, start + WEEK_MS, DAY_MS))
        if level == LEVEL_WEEK and _served_through(coverage, start, start + WEEK_MS):
            periods.append((level, start))
            continue
        for day in days:
            if _served_through(coverage, day, day + DAY_MS):
                periods.append((LEVEL_DAY, day))
            else:
                left.append((day, day + DAY_MS))
    for low, high in sorted(left):
        if rest and rest[-1][1] == low:
            rest[-1] = (rest[-1][0], high)
        else:
            rest.append((low, high))
    return periods, rest


def _served_through(coverage: Coverage, start: int, end: int) -> bool:
    return all(slot in coverage.served for slot in range(start, end, SLOT_MS))


def _add_periods(
    connection: Connection, flt: MetricFilter, periods: list[tuple[int, int]], sums: _Sums
) -> None:
    """Add the day and week sets of ``periods`` (level, start) to ``sums``."""
    if not periods:
        return
    # Without a channel filter, the rows over all channels give one row per label.
    offset = 0 if flt.channels else ALL_CHANNELS
    by_level: dict[int, list[int]] = defaultdict(list)
    for level, start in periods:
        by_level[level + offset].append(start)
    sets = RollupAttributionSets
    statement = select(*_SET_FIGURES).where(
        or_(
            *(
                (sets.level == level) & sets.start_ms.in_(sorted(starts))
                for level, starts in by_level.items()
            )
        ),
        *channel_condition(sets.channel, flt),
    )
    # A 30-day window reads about 12 periods per label. Their bitmaps are joined once per
    # label, when the users are counted.
    for touch, name, label, count, named, micros, blob in connection.execute(statement):
        key = (touch, name, label)
        sums.conversations[key] += int(count)
        sums.named[key] += int(named)
        sums.named_micros[key] += int(micros)
        sums.bits[key].append(decode(blob))


def _add_slot_rows(
    connection: Connection, flt: MetricFilter, coverage: Coverage, edges: Ranges, sums: _Sums
) -> None:
    """Add the conversation rows of the served slots in ``edges`` to ``sums``."""
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    for part in _parts(edges):
        statement = select(
            RollupAttribution.start_slot_ms, RollupAttribution.contact_id, *labels
        ).where(
            time_in_ranges(RollupAttribution.start_slot_ms, part),
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


def _link_rows(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    ranges: Ranges,
    by_user_only: bool,
) -> list[Any]:
    """Return (conversion id, micros, labels...) of the served link rows in ``ranges``."""
    links = RollupConversionLinks
    labels = [getattr(RollupAttribution, column) for _, _, column in LABEL_COLUMNS]
    rows: list[Any] = []
    for part in _parts(ranges):
        statement = (
            select(links.start_slot_ms, links.conversion_id, links.value_micros, *labels)
            .join(RollupAttribution, RollupAttribution.conversation_id == links.conversation_id)
            .where(
                time_in_ranges(links.start_slot_ms, part),
                *channel_condition(links.channel, flt),
            )
        )
        if by_user_only:
            statement = statement.where(links.by_user == 1)
        rows.extend(row[1:] for row in connection.execute(statement) if row[0] in coverage.served)
    return rows


def _conversions(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    plan: tuple[list[tuple[int, int]], Ranges],
    raw: dict[int, list[str]],
) -> tuple[dict[Key, dict[int, int]], dict[int, int]]:
    """Return the conversions (id -> micros) per label and over the window that sets leave out.

    Those are the conversions naming only a user in the whole days and weeks, and every
    conversion of the other served slots and of the raw ranges.
    """
    periods, rest = plan
    spans: Ranges = [(start, start + LEVEL_WIDTH_MS[level]) for level, start in periods]
    rows = _link_rows(connection, flt, coverage, spans, True)
    rows += _link_rows(connection, flt, coverage, rest, False)
    for link in raw_links(connection, flt, coverage):
        values = raw.get(link["conversation_id"])
        # A conversation stored after the raw rows were read is in neither count.
        if values is not None:
            rows.append((link["conversion_id"], link["value_micros"], *values))
    by_label: dict[Key, dict[int, int]] = defaultdict(dict)
    overall: dict[int, int] = {}
    for conversion_id, micros, *values in rows:
        overall[conversion_id] = int(micros)
        for (touch, name, _), label in zip(LABEL_COLUMNS, values, strict=True):
            by_label[(touch, name, label)][conversion_id] = int(micros)
    return by_label, overall


def _field_rows(
    sums: _Sums, conversions: dict[Key, dict[int, int]], touch: str, name: str
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
        # Conversions naming a conversation are counted in the sets or in ``values``,
        # never in both, because each has one link row.
        rows.append(
            {
                "value": label,
                "conversations": counts[label],
                "users": sums.users(key),
                "conversions": len(values) + sums.named.get(key, 0),
                "revenue": format_micros(sum(values.values()) + sums.named_micros.get(key, 0)),
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
        plan = _plan(coverage)
        _add_periods(connection, flt, plan[0], sums)
        _add_slot_rows(connection, flt, coverage, plan[1], sums)
        raw = _add_raw_rows(connection, flt, coverage, sums)
        conversions, overall = _conversions(connection, flt, coverage, plan, raw)
    # Each conversation has one first-touch source label, so those labels partition the
    # conversations, their contacts and the conversions counted in the sets.
    partition = [key for key in sums.conversations if key[:2] == ("first", "source")]
    total = _Sums()
    for key in partition:
        total.bits[("", "", "")].extend(sums.bits.get(key, ()))
        total.ids[("", "", "")].extend(sums.ids.get(key, ()))
    named = sum(sums.named.get(key, 0) for key in partition)
    named_micros = sum(sums.named_micros.get(key, 0) for key in partition)
    result: dict[str, Any] = {
        "totals": {
            "conversations": sum(sums.conversations[key] for key in partition),
            "users": total.users(("", "", "")),
            "conversions": len(overall) + named,
            "revenue": format_micros(sum(overall.values()) + named_micros),
        }
    }
    for touch in TOUCHES:
        result[f"{touch}_touch"] = {
            name: _field_rows(sums, conversions, touch, name) for name in TOUCH_FIELDS
        }
    return result
