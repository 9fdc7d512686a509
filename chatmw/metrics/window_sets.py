"""Exact contact sets over a query window, from day and week bitmaps, slot rows and raw rows.

``chatmw.metrics.contact_sets.count_distinct`` counts contacts per bucket. Retention and
engagement need the sets themselves, to intersect them, so this module returns each set
as a Roaring bitmap of contact ids, 32-bit or 64-bit as ``chatmw.metrics.contact_sets``
describes.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyroaring import AbstractBitMap, AbstractBitMap64
from sqlalchemy import Connection, or_, select

from chatmw.metrics.contact_sets import (
    SOURCES,
    ContactBitmap,
    bitmap_of,
    decode,
    plan_spans,
    union,
    union_update,
)
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.models_rollups import RollupContactSets

__all__ = ["with_ids", "span_sets"]


def with_ids(
    bits: ContactBitmap | None, contact_ids: Iterable[int] | AbstractBitMap | AbstractBitMap64
) -> ContactBitmap:
    """Return a new bitmap of the contacts of ``bits`` (None for none) and ``contact_ids``."""
    if isinstance(contact_ids, (AbstractBitMap, AbstractBitMap64)):
        added = contact_ids
    else:
        added = bitmap_of(contact_ids)
    return union([added] if bits is None else [bits, added])


def span_sets(
    connection: Connection,
    kinds: tuple[str, ...],
    spans: dict[int, tuple[int, int]],
    served: set[int],
    channels: tuple[str, ...],
) -> dict[tuple[str, int, str], ContactBitmap]:
    """Return the contacts of the served slots of each span, per (kind, span index, channel).

    ``spans`` maps an index to a ``[start, end)`` range of slots. Whole UTC days and epoch
    weeks whose slots are all served come from ``rollup_contact_sets`` (one statement for
    all ``kinds``), the other served slots from the slot table of each kind. ``channels``
    filters unless empty. Slots that are not in ``served`` are left out, and the caller
    adds their raw rows.
    """
    periods, rest = plan_spans(spans, served)
    sets: dict[tuple[str, int, str], ContactBitmap] = {}
    needed: dict[tuple[int, int], list[int]] = {}
    for index, parts in periods.items():
        for part in parts:
            needed.setdefault(part, []).append(index)
    if needed:
        by_level: dict[int, list[int]] = {}
        for level, start in needed:
            by_level.setdefault(level, []).append(start)
        statement = select(
            RollupContactSets.kind,
            RollupContactSets.level,
            RollupContactSets.start_ms,
            RollupContactSets.channel,
            RollupContactSets.contacts,
        ).where(
            RollupContactSets.kind.in_(kinds),
            or_(
                *(
                    (RollupContactSets.level == level)
                    & RollupContactSets.start_ms.in_(sorted(starts))
                    for level, starts in by_level.items()
                )
            ),
        )
        if channels:
            statement = statement.where(RollupContactSets.channel.in_(channels))
        for kind, level, start, channel, blob in connection.execute(statement):
            decoded = decode(blob)
            for index in needed[(int(level), int(start))]:
                key = (kind, index, channel)
                if key in sets:
                    sets[key] = union_update(sets[key], decoded)
                else:
                    sets[key] = union([decoded])

    edges = sorted((low, high, index) for index, parts in rest.items() for low, high in parts)
    for kind in kinds if edges else ():
        _add_slot_rows(connection, kind, edges, served, channels, sets)
    return sets


def _add_slot_rows(
    connection: Connection,
    kind: str,
    edges: list[tuple[int, int, int]],
    served: set[int],
    channels: tuple[str, ...],
    sets: dict[tuple[str, int, str], ContactBitmap],
) -> None:
    """Add the contacts of the served slots in ``edges`` (low, high, span index) to ``sets``."""
    table, slot_column = SOURCES[kind]
    ids: dict[tuple[str, int, str], list[int]] = {}
    for low, high, index in edges:
        rows = select(slot_column, table.channel, table.contact_id).where(
            time_in_ranges(slot_column, [(low, high)])
        )
        if channels:
            rows = rows.where(table.channel.in_(channels))
        for slot, channel, contact_id in connection.execute(rows):
            if slot in served:
                ids.setdefault((kind, index, channel), []).append(contact_id)
    for key, contact_ids in ids.items():
        sets[key] = with_ids(sets.get(key), contact_ids)
