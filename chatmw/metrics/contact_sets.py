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

Contact ids are signed 64-bit integers on SQLite. A set whose ids all lie in ``[0, 2**32)``
is a 32-bit ``BitMap``, so a store whose ids stay in that range keeps only 32-bit sets. A
set with another id is a ``BitMap64``, stored with the one-byte prefix ``_WIDE_HEADER`` so
that :func:`decode` can distinguish the two. :func:`union`, :func:`union_update`,
:func:`intersection_count` and :func:`count_union` accept both widths.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right
from collections.abc import Collection, Iterable
from typing import Any

from pyroaring import AbstractBitMap, AbstractBitMap64, BitMap, BitMap64
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
    "ContactBitmap",
    "bitmap_of",
    "encode",
    "decode",
    "union",
    "union_update",
    "intersection_count",
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


# A set of contact ids: 32-bit while every id lies in [0, 2**32), else 64-bit.
ContactBitmap = BitMap | BitMap64

# The first byte of a zlib stream. Stores built before Roaring bitmaps keep their sets as
# zlib-compressed bitsets (bit ``i`` is contact id ``i``), and a serialized Roaring bitmap
# starts with another byte.
_ZLIB_HEADER = b"\x78"
# The first byte of an encoded 64-bit set. A serialized 32-bit bitmap starts with its
# cookie (0x3A or 0x3B), and a 64-bit serialization starts with its bucket count, so the
# prefix keeps the 64-bit ones apart.
_WIDE_HEADER = b"\x40"
# A 64-bit serialization header of one bucket whose upper 32 bits are 0. The portable
# 64-bit Roaring format (RoaringFormatSpec, "Extension for 64-bit implementations") is a
# little-endian uint64 bucket count, then per bucket a uint32 of the upper 32 bits and
# the 32-bit portable serialization of the lower bits.
_LOW_BUCKET = (1).to_bytes(8, "little") + (0).to_bytes(4, "little")


def bitmap_of(contact_ids: Iterable[int]) -> ContactBitmap:
    """Return a bitmap of ``contact_ids``, 32-bit when they all lie in ``[0, 2**32)``.

    A negative id is stored as ``id + 2**64``, its two's complement, so distinct ids stay
    distinct and counts stay exact. Ids outside the signed 64-bit range raise
    ``OverflowError``.
    """
    ids = contact_ids if isinstance(contact_ids, Collection) else list(contact_ids)
    try:
        return BitMap(array("I", ids))
    except OverflowError:
        return BitMap64(array("Q", array("q", ids).tobytes()))


def _widen(bitmap: AbstractBitMap | AbstractBitMap64) -> AbstractBitMap64:
    """Return ``bitmap`` as a 64-bit bitmap, converting a 32-bit one without iterating it."""
    if isinstance(bitmap, AbstractBitMap64):
        return bitmap
    if not bitmap:
        return BitMap64()
    return BitMap64.deserialize(_LOW_BUCKET + bitmap.serialize())


def encode(contacts: Iterable[int] | AbstractBitMap | AbstractBitMap64) -> bytes:
    """Serialize contact ids as a Roaring bitmap, 64-bit and prefixed for ids outside 32 bits.

    A bitmap argument is run-optimized in place.
    """
    if isinstance(contacts, (AbstractBitMap, AbstractBitMap64)):
        bitmap = contacts
    else:
        bitmap = bitmap_of(contacts)
    bitmap.run_optimize()
    if isinstance(bitmap, AbstractBitMap64):
        return _WIDE_HEADER + bitmap.serialize()
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


def decode(blob: bytes) -> ContactBitmap:
    """Return the bitmap of :func:`encode`, or of a zlib-compressed bitset of an older store."""
    head = blob[:1]
    if head == _WIDE_HEADER:
        return BitMap64.deserialize(blob[1:])
    if head == _ZLIB_HEADER:
        return _bitset_members(zlib.decompress(blob))
    return BitMap.deserialize(blob)


def union(bitmaps: Iterable[AbstractBitMap | AbstractBitMap64]) -> ContactBitmap:
    """Return a new bitmap of the members of ``bitmaps``, 64-bit if any of them is."""
    members = list(bitmaps)
    if not members:
        return BitMap()
    if any(isinstance(bitmap, AbstractBitMap64) for bitmap in members):
        return BitMap64.union(*(_widen(bitmap) for bitmap in members))
    return BitMap.union(*members)


def union_update(target: ContactBitmap, other: AbstractBitMap | AbstractBitMap64) -> ContactBitmap:
    """Add the members of ``other`` to ``target`` and return the result.

    ``target`` changes in place unless only ``other`` is 64-bit. In that case the result
    is a new 64-bit bitmap and ``target`` is left as it was.
    """
    if isinstance(target, AbstractBitMap64) == isinstance(other, AbstractBitMap64):
        target |= other
        return target
    if isinstance(target, AbstractBitMap64):
        target |= _widen(other)
        return target
    return _widen(target) | other


def intersection_count(
    first: AbstractBitMap | AbstractBitMap64, second: AbstractBitMap | AbstractBitMap64
) -> int:
    """Return the number of contacts in both bitmaps, of either width."""
    if isinstance(first, AbstractBitMap64) == isinstance(second, AbstractBitMap64):
        return first.intersection_cardinality(second)
    return _widen(first).intersection_cardinality(_widen(second))


def count_union(
    bitmaps: Iterable[AbstractBitMap | AbstractBitMap64], contact_ids: Iterable[int] = ()
) -> int:
    """Return the number of contacts in the union of ``bitmaps`` and ``contact_ids``."""
    return len(union([bitmap_of(contact_ids), *bitmaps]))


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
            unions: dict[tuple[str, str], list[ContactBitmap]] = {}
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
                        "contacts": encode(union(bitmaps)),
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
    bits: dict[tuple[str, int], list[ContactBitmap]] = {}
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
    overall_bits: dict[int, list[ContactBitmap]] = {}
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
