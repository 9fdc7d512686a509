"""Rollup tables of sums with slot, hour, day and week rows, keyed by conversation start.

A table of this kind has the columns ``level``, ``start_ms`` and ``channel``, further key
columns and columns of counts. Its slot rows (``LEVEL_SLOT``) are counted from raw rows,
and each hour, day and week row is the sum of the rows one level below in it, as in
``rollup_responses``. A query reads a week row for each whole served week, then day,
hour and slot rows for the rest, so a 30-day window reads at most 68 rows per channel and
key instead of 2,880.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, literal_column, or_, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.rollup_query import Coverage
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.rollup_started import aligned_ranges
from chatmw.metrics.started_query import _level_ranges
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_HOUR,
    LEVEL_SLOT,
    LEVEL_WEEK,
    LEVEL_WIDTH_MS,
)

__all__ = ["LeveledSums", "Ranges"]

Ranges = list[tuple[int | None, int]]
# Ranges per statement, as in chatmw.metrics.rollup_refresh.
_RANGES_PER_STATEMENT = 50
_UPPER_LEVELS = (LEVEL_HOUR, LEVEL_DAY, LEVEL_WEEK)


def _parts(ranges: Sequence[tuple[int | None, int]]) -> Iterable[Ranges]:
    for index in range(0, len(ranges), _RANGES_PER_STATEMENT):
        yield list(ranges[index : index + _RANGES_PER_STATEMENT])


@dataclass(frozen=True, slots=True)
class LeveledSums:
    """One leveled table: its mapped class, its key columns after ``start_ms``, its sums.

    ``keys`` starts with ``channel``.
    """

    table: Any
    keys: tuple[str, ...]
    sums: tuple[str, ...]

    def columns(self) -> list[str]:
        """Return the column names in the order of the selects that insert rows."""
        return ["level", "start_ms", *self.keys, *self.sums]

    def delete(self, connection: Connection, ranges: Ranges) -> None:
        """Delete the slot rows in ``ranges`` and the hour, day and week rows around them."""
        table = self.table
        for part in _parts(ranges):
            connection.execute(
                delete(table).where(table.level == LEVEL_SLOT, time_in_ranges(table.start_ms, part))
            )
        for level in _UPPER_LEVELS:
            for part in _parts(aligned_ranges(ranges, LEVEL_WIDTH_MS[level])):
                connection.execute(
                    delete(table).where(table.level == level, time_in_ranges(table.start_ms, part))
                )

    def sum_levels(self, connection: Connection, ranges: Ranges) -> None:
        """Insert the hour, day and week rows around ``ranges`` as sums of the rows below.

        Those rows must have been deleted first (:meth:`delete`).
        """
        table = self.table
        keys = [getattr(table, name) for name in self.keys]
        for level in _UPPER_LEVELS:
            width = literal_column(str(LEVEL_WIDTH_MS[level]))
            # Inlined constants keep the GROUP BY text equal to the selected one (PostgreSQL).
            start = table.start_ms.op("/")(width).op("*")(width)
            for part in _parts(aligned_ranges(ranges, LEVEL_WIDTH_MS[level])):
                rows = (
                    select(
                        literal_column(str(level)),
                        start,
                        *keys,
                        *(func.sum(getattr(table, name)) for name in self.sums),
                    )
                    .where(table.level == level - 1, time_in_ranges(table.start_ms, part))
                    .group_by(start, *keys)
                )
                connection.execute(insert(table).from_select(self.columns(), rows))

    def served(self, coverage: Coverage) -> ColumnElement[bool] | None:
        """Return SQL selecting the fewest rows that cover the served slots, or None if none."""
        levels = [
            (self.table.level == level) & time_in_ranges(self.table.start_ms, spans)
            for level, spans in _level_ranges(coverage).items()
            if spans
        ]
        return or_(*levels) if levels else None
