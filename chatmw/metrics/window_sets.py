"""Exact contact sets over a query window, from day and week bitsets, slot rows and raw rows.

``chatmw.metrics.contact_sets.count_distinct`` counts contacts per bucket. Retention and
engagement need the sets themselves, to intersect them, so this module returns each set
as an integer bitset (bit ``i`` is contact id ``i``).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, or_, select

from chatmw.metrics.contact_sets import SOURCES, decode, plan_spans
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.store.models_rollups import RollupContactSets

__all__ = ["with_ids", "span_sets"]


def with_ids(bits: int, contact_ids: Iterable[int]) -> int:
    """Return the bitset ``bits`` with the bits of ``contact_ids`` set."""
    ids = list(contact_ids)
    if not ids:
        return bits
    size = max((bits.bit_length() + 7) // 8, (max(ids) >> 3) + 1)
    table = bytearray(bits.to_bytes(size, "little"))
    for contact_id in ids:
        table[contact_id >> 3] |= 1 << (contact_id & 7)
    return int.from_bytes(table, "little")


def span_sets(
    connection: Connection,
    kinds: tuple[str, ...],
    spans: dict[int, tuple[int, int]],
    served: set[int],
    channels: tuple[str, ...],
) -> dict[tuple[str, int, str], int]:
    """Return the contacts of the served slots of each span, per (kind, span index, channel).

    ``spans`` maps an index to a ``[start, end)`` range of slots. Whole UTC days and epoch
    weeks whose slots are all served come from ``rollup_contact_sets`` (one statement for
    all ``kinds``), the other served slots from the slot table of each kind. ``channels``
    filters unless empty. Slots that are not in ``served`` are left out, and the caller
    adds their raw rows.
    """
    periods, rest = plan_spans(spans, served)
    sets: dict[tuple[str, int, str], int] = {}
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
                sets[key] = sets.get(key, 0) | decoded

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
    sets: dict[tuple[str, int, str], int],
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
        sets[key] = with_ids(sets.get(key, 0), contact_ids)
