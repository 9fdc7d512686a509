"""Contact sets per UTC day and week, for distinct counts that do not read every contact row.

The contact rollups (``rollup_users``, ``rollup_starters``, ``rollup_participants``) keep
one row per contact and slot, so a distinct count over a month reads one row per active
contact and slot. ``rollup_contact_sets`` keeps, per day and per epoch week (the weeks of
``rollup_responses``), the union of those rows as a serialized Roaring bitmap of contact
ids (:func:`encode`). A distinct count joins the bitmaps of the whole days and weeks it
covers and adds the contacts of the remaining slots and raw rows that are not among
them. Bitmaps are rebuilt from the slot rows whenever the refresher recomputes a slot of
their day, so they are exact wherever the slot rows are.

A Roaring bitmap keeps each range of 65,536 ids as a sorted array of 16-bit values while
it contains at most 4,096 of them, and as a plain 8 KiB bitmap above that. A set therefore
costs about two bytes per member when sparse, not one bit per id up to the highest
contact id, and unions, intersections and counts run in C (the ``pyroaring`` package).
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any

from pyroaring import BitMap
from sqlalchemy import Connection, delete, insert, or_, select

from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.rollup_started import aligned_ranges
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
    SLOT_MS,
    RollupContactSets,
    RollupExposed,
    RollupParticipants,
    RollupProactive,
    RollupStarters,
    RollupUsers,
    RollupWriters,
)

__all__ = [
    "SOURCES",
    "encode",
    "decode",
    "count_union",
    "refresh_sets",
    "whole_periods",
    "plan_spans",
    "count_distinct",
]

DAY_MS = LEVEL_WIDTH_MS[LEVEL_DAY]
WEEK_MS = LEVEL_WIDTH_MS[LEVEL_WEEK]

# Set kind -> (slot rollup table, its slot column)
SOURCES: dict[str, tuple[Any, Any]] = {
    "users": (RollupUsers, RollupUsers.slot_ms),
    "starters": (RollupStarters, RollupStarters.slot_ms),
    "participants": (RollupParticipants, RollupParticipants.start_slot_ms),
    "proactive": (RollupProactive, RollupProactive.start_slot_ms),
    "writers": (RollupWriters, RollupWriters.start_slot_ms),
    "exposed": (RollupExposed, RollupExposed.slot_ms),
}


# The first byte of a zlib stream. Stores built before Roaring bitmaps keep their sets as
# zlib-compressed bitsets (bit ``i`` is contact id ``i``), and a serialized Roaring bitmap
# starts with another byte.
_ZLIB_HEADER = b"\x78"


def encode(contacts: Iterable[int] | BitMap) -> bytes:
    """Serialize contact ids (below 2**32, like the contacts table's ids) as a Roaring bitmap.

    NOTE: SQLite stores a contact given an explicit id from 2**32 up, and numbers the next
    contacts after it. Such ids raise ``OverflowError`` here, so the refresh fails.
    """
    bitmap = contacts if isinstance(contacts, BitMap) else BitMap(array("I", contacts))
    bitmap.run_optimize()
    return bitmap.serialize()


def _bitset_members(bitset: bytes) -> BitMap:
    """Return the bitmap of a little-endian bitset whose bit ``i`` is contact id ``i``."""
    digits = bin(int.from_bytes(bitset, "little"))[:1:-1]
    members = array("I")
    position = digits.find("1")
    while position >= 0:
        members.append(position)
        position = digits.find("1", position + 1)
    return BitMap(members)


def decode(blob: bytes) -> BitMap:
    """Return the bitmap of :func:`encode`, or of a zlib-compressed bitset of an older store."""
    if blob[:1] == _ZLIB_HEADER:
        return _bitset_members(zlib.decompress(blob))
    return BitMap.deserialize(blob)


def count_union(bitmaps: Iterable[BitMap], contact_ids: Iterable[int] = ()) -> int:
    """Return the number of contacts in the union of ``bitmaps`` and ``contact_ids``."""
    return len(BitMap.union(BitMap(array("I", contact_ids)), *bitmaps))


def whole_periods(start: int, end: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split ``[start, end)`` into whole weeks and days, and the ranges left at its edges.

    Returns ``(periods, rest)``: ``periods`` lists ``(level, period start)`` and ``rest``
    lists ``[start, end)`` ranges covered by neither.
    """
    periods: list[tuple[int, int]] = []
    rest: list[tuple[int, int]] = []
    moment = start
    while moment < end:
        if moment % WEEK_MS == 0 and moment + WEEK_MS <= end:
            periods.append((LEVEL_WEEK, moment))
            moment += WEEK_MS
        elif moment % DAY_MS == 0 and moment + DAY_MS <= end:
            periods.append((LEVEL_DAY, moment))
            moment += DAY_MS
        else:
            step_end = min(end, moment + DAY_MS - moment % DAY_MS)
            if rest and rest[-1][1] == moment:
                rest[-1] = (rest[-1][0], step_end)
            else:
                rest.append((moment, step_end))
            moment = step_end
    return periods, rest


def _insert_days(connection: Connection, days: list[tuple[int, int]]) -> None:
    rows = []
    for kind, (table, slot) in SOURCES.items():
        for low, high in days:
            for day in range(low, high, DAY_MS):
                members: dict[str, list[int]] = {}
                statement = select(table.channel, table.contact_id).where(
                    slot >= day, slot < day + DAY_MS
                )
                for channel, contact_id in connection.execute(statement):
                    members.setdefault(channel, []).append(contact_id)
                rows.extend(
                    {
                        "kind": kind,
                        "level": LEVEL_DAY,
                        "start_ms": day,
                        "channel": channel,
                        "contacts": encode(ids),
                    }
                    for channel, ids in members.items()
                )
    if rows:
        connection.execute(insert(RollupContactSets), rows)


def _insert_weeks(connection: Connection, weeks: list[tuple[int, int]]) -> None:
    rows = []
    for low, high in weeks:
        for week in range(low, high, WEEK_MS):
            unions: dict[tuple[str, str], list[BitMap]] = {}
            statement = select(
                RollupContactSets.kind, RollupContactSets.channel, RollupContactSets.contacts
            ).where(
                RollupContactSets.level == LEVEL_DAY,
                RollupContactSets.start_ms >= week,
                RollupContactSets.start_ms < week + WEEK_MS,
            )
            for kind, channel, blob in connection.execute(statement):
                unions.setdefault((kind, channel), []).append(decode(blob))
            for (kind, channel), bitmaps in unions.items():
                rows.append(
                    {
                        "kind": kind,
                        "level": LEVEL_WEEK,
                        "start_ms": week,
                        "channel": channel,
                        "contacts": encode(BitMap.union(*bitmaps)),
                    }
                )
    if rows:
        connection.execute(insert(RollupContactSets), rows)


def refresh_sets(connection: Connection, ranges: list[tuple[int | None, int]]) -> None:
    """Rebuild the day and week sets that contain ``ranges`` from the slot rows.

    Call it after the slot rows of ``ranges`` are recomputed. Ranges before the epoch
    have no sets: queries never read those slots from rollups.
    """
    days = aligned_ranges(ranges, DAY_MS)
    weeks = aligned_ranges(ranges, WEEK_MS)
    for level, spans in ((LEVEL_DAY, days), (LEVEL_WEEK, weeks)):
        for index in range(0, len(spans), 50):
            part: list[tuple[int | None, int]] = list(spans[index : index + 50])
            connection.execute(
                delete(RollupContactSets).where(
                    RollupContactSets.level == level,
                    time_in_ranges(RollupContactSets.start_ms, part),
                )
            )
    _insert_days(connection, days)
    _insert_weeks(connection, weeks)


def _fully_served(start: int, end: int, served: set[int]) -> bool:
    return all(slot in served for slot in range(start, end, SLOT_MS))


def plan_spans(
    spans: dict[int, tuple[int, int]], served: set[int]
) -> tuple[dict[int, list[tuple[int, int]]], dict[int, list[tuple[int, int]]]]:
    """Return, per bucket, the whole served weeks and days and the slot ranges left over.

    ``spans`` maps a bucket index to its ``[start, end)`` of slots inside the window.
    """
    periods: dict[int, list[tuple[int, int]]] = {}
    rest: dict[int, list[tuple[int, int]]] = {}
    for index, (start, end) in spans.items():
        if start >= end:
            continue
        whole, left = whole_periods(start, end)
        for level, period in whole:
            width = LEVEL_WIDTH_MS[level]
            if _fully_served(period, period + width, served):
                periods.setdefault(index, []).append((level, period))
            else:
                left.append((period, period + width))
        if left:
            rest[index] = sorted(left)
    return periods, rest


def count_distinct(
    connection: Connection,
    kind: str,
    spans: dict[int, tuple[int, int]],
    served: set[int],
    channels: tuple[str, ...],
    raw: Iterable[tuple[int, str, int]],
) -> tuple[dict[tuple[str, int], int], dict[int, int]] | None:
    """Count distinct contacts per (channel, bucket) and per bucket, or None without a whole day.

    Served slots of each span come from the day and week sets where a whole period is
    served, and from the slot rows of ``kind`` elsewhere. ``raw`` yields ``(bucket index,
    channel, contact id)`` for the unserved parts. ``channels`` filters unless empty.
    """
    periods, rest = plan_spans(spans, served)
    if not periods:
        return None
    table, slot_column = SOURCES[kind]
    bits: dict[tuple[str, int], list[BitMap]] = {}
    ids: dict[tuple[str, int], set[int]] = {}

    needed: dict[tuple[int, int], list[int]] = {}
    for index, parts in periods.items():
        for part in parts:
            needed.setdefault(part, []).append(index)
    by_level: dict[int, list[int]] = {}
    for level, start in needed:
        by_level.setdefault(level, []).append(start)
    conditions = [
        (RollupContactSets.level == level) & RollupContactSets.start_ms.in_(sorted(starts))
        for level, starts in by_level.items()
    ]
    statement = select(
        RollupContactSets.level,
        RollupContactSets.start_ms,
        RollupContactSets.channel,
        RollupContactSets.contacts,
    ).where(RollupContactSets.kind == kind, or_(*conditions))
    if channels:
        statement = statement.where(RollupContactSets.channel.in_(channels))
    for level, start, channel, blob in connection.execute(statement):
        decoded = decode(blob)
        for index in needed[(int(level), int(start))]:
            bits.setdefault((channel, index), []).append(decoded)

    edges = sorted((low, high, index) for index, parts in rest.items() for low, high in parts)
    if edges:
        lows = [low for low, _, _ in edges]
        slot_rows = select(slot_column, table.channel, table.contact_id).where(
            time_in_ranges(slot_column, [(low, high) for low, high, _ in edges])
        )
        if channels:
            slot_rows = slot_rows.where(table.channel.in_(channels))
        for slot, channel, contact_id in connection.execute(slot_rows):
            if slot not in served:
                continue
            position = bisect_right(lows, slot) - 1
            ids.setdefault((channel, edges[position][2]), set()).add(contact_id)
    for index, channel, contact_id in raw:
        ids.setdefault((channel, index), set()).add(contact_id)

    by_channel: dict[tuple[str, int], int] = {}
    overall_bits: dict[int, list[BitMap]] = {}
    overall_ids: dict[int, set[int]] = {}
    for key in set(bits) | set(ids):
        channel_bits = bits.get(key, [])
        channel_ids = ids.get(key, set())
        count = count_union(channel_bits, channel_ids)
        if count:
            by_channel[key] = count
        index = key[1]
        overall_bits.setdefault(index, []).extend(channel_bits)
        overall_ids.setdefault(index, set()).update(channel_ids)
    overall = {}
    for index in set(overall_bits) | set(overall_ids):
        count = count_union(overall_bits.get(index, []), overall_ids.get(index, set()))
        if count:
            overall[index] = count
    return by_channel, overall
