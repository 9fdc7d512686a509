"""Which part of a metric query rollups count exactly, and which part reads raw rows.

A query window is cut into 15-minute UTC slots. A slot is served from rollups when it
lies wholly inside the window, the refresher has counted every message that touches it,
and the time zone keeps one offset, a multiple of 15 minutes, through the whole slot:
then every moment of the slot falls in the same local hour, day, week and month. All
other parts of the window (its ragged edges, slots changed since the last refresh,
slots around an offset change that is not on a slot edge) are read from raw rows.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, case, literal_column, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from chatmw.events import to_ms
from chatmw.metrics.buckets import next_bucket
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_refresh import (
    BEFORE_EPOCH_SLOT,
    changes_after,
    slot_of,
    slot_ranges,
    time_in_ranges,
)
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import SLOT_MS, RollupState

__all__ = [
    "Buckets",
    "Coverage",
    "mixed_buckets",
    "SlotOffsets",
    "cover",
    "raw_only",
    "bucket_index",
    "channel_condition",
    "raw_message_times",
    "MAX_RAW_RANGES",
]

_ENABLED: ContextVar[bool] = ContextVar("chatmw_rollups_enabled", default=True)
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# A query whose raw part needs more separate time ranges than this reads only raw rows.
MAX_RAW_RANGES = 64


@contextmanager
def raw_only() -> Iterator[None]:
    """Compute metrics from raw rows only inside this block (tests compare both paths)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


class SlotOffsets:
    """The UTC offset of ``tz`` per slot, where it is the same through the whole slot.

    A day whose first and last millisecond have the same offset is taken to have no
    offset change inside it. This assumes that a zone does not change its offset and
    change it back within one UTC day.
    """

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._days: dict[int, int | None] = {}

    def _offset(self, moment_ms: int) -> int:
        local = datetime.fromtimestamp(moment_ms / 1000, UTC).astimezone(self.tz)
        offset = local.utcoffset()
        return 0 if offset is None else round(offset.total_seconds() * 1000)

    def _usable(self, offset: int) -> bool:
        return offset % SLOT_MS == 0

    def slot_offset(self, slot: int) -> int | None:
        """Return the offset in ms that applies through all of ``slot``, or None if not served."""
        if slot < 0:
            return None
        day = slot - slot % DAY_MS
        if day not in self._days:
            first, last = self._offset(day), self._offset(day + DAY_MS - 1)
            self._days[day] = first if first == last and self._usable(first) else None
        offset = self._days[day]
        if offset is not None:
            return offset
        first, last = self._offset(slot), self._offset(slot + SLOT_MS - 1)
        return first if first == last and self._usable(first) else None

    def weekday_hour(self, slot: int, offset: int) -> tuple[int, int]:
        """Return (weekday with Monday 0, hour) of the local time of ``slot``."""
        local = slot + offset
        # 1970-01-01 was a Thursday (weekday 3).
        return (local // DAY_MS + 3) % 7, (local // HOUR_MS) % 24


@dataclass(slots=True)
class Coverage:
    """The split of a query window between rollup slots and raw time ranges.

    ``first_slot`` to ``end_slot`` (exclusive) bounds the served slots; ``served`` lists
    them. ``raw`` is the rest of the window as ``[start, end)`` millisecond ranges.
    """

    since_ms: int
    until_ms: int
    first_slot: int
    end_slot: int
    served: set[int]
    raw: list[tuple[int | None, int]]
    dirty: set[int]
    offsets: SlotOffsets
    # Owners of the conversations changed since the last refresh (``changes_after``).
    contacts: set[int] = field(default_factory=set)

    def served_conditions(self, column: Any) -> list[ColumnElement[bool]]:
        """Return SQL conditions true when the slot ``column`` is one of the served slots."""
        return [
            column >= self.first_slot,
            column < self.end_slot,
            ~time_in_ranges(column, self.raw),
        ]

    def message_slot_offset(self, slot: int) -> int | None:
        """Return the offset of a message slot that rollups count exactly, or None."""
        if slot in self.dirty or slot == BEFORE_EPOCH_SLOT:
            return None
        return self.offsets.slot_offset(slot)


def _supported(flt: MetricFilter) -> bool:
    if not _ENABLED.get():
        return False
    if flt.since_ms is None or flt.until_ms is None:
        return False
    if flt.attributes or flt.touch_filters:
        return False
    return flt.group_by is None or flt.group_by.kind == "channel"


def _watermark(connection: Connection) -> tuple[int, int, int, int] | None:
    """Return the message, conversation, change-log and exposure watermarks, or None if unbuilt."""
    try:
        row = connection.execute(
            select(
                RollupState.built,
                RollupState.watermark_id,
                RollupState.conversation_watermark_id,
                RollupState.change_watermark_id,
                RollupState.exposure_watermark_id,
            ).where(RollupState.id == 1)
        ).first()
    except DBAPIError:
        # A store migrated before the rollup tables existed: raw rows only.
        connection.rollback()
        return None
    if row is None or not row[0]:
        return None
    return int(row[1]), int(row[2]), int(row[3]), int(row[4])


def cover(connection: Connection, flt: MetricFilter) -> Coverage | None:
    """Split the window of ``flt`` between rollups and raw rows, or None for raw rows only.

    Raw rows only: filters on attributes or touches, a grouping other than the channel, an
    unbounded window, rollups not built yet, or a raw part of more than
    :data:`MAX_RAW_RANGES` ranges (a time zone whose offset is not a multiple of 15 minutes).
    """
    if not _supported(flt):
        return None
    watermark = _watermark(connection)
    if watermark is None:
        return None
    since, until = flt.since_ms, flt.until_ms
    if since is None or until is None:
        return None
    changes = changes_after(
        connection,
        watermark[0],
        None,
        watermark[1],
        after_change_id=watermark[2],
        after_exposure_id=watermark[3],
    )
    dirty = changes.slots
    offsets = SlotOffsets(flt.tz)

    first = max(0, since + (-since) % SLOT_MS)
    end = until - until % SLOT_MS if until > 0 else 0
    if first >= end:
        return Coverage(
            since, until, 0, 0, set(), [(since, until)], dirty, offsets, changes.contacts
        )
    served: set[int] = set()
    unserved: list[int] = []
    for slot in range(first, end, SLOT_MS):
        if slot in dirty or offsets.slot_offset(slot) is None:
            unserved.append(slot)
        else:
            served.add(slot)
    raw: list[tuple[int | None, int]] = []
    if since < first:
        raw.append((since, first))
    raw.extend(slot_ranges(unserved))
    if end < until:
        raw.append((end, until))
    if len(raw) > MAX_RAW_RANGES:
        return None
    return Coverage(since, until, first, end, served, raw, dirty, offsets, changes.contacts)


class Buckets:
    """Bucket boundaries in ms, for finding the bucket of a time or a served slot."""

    def __init__(self, starts: Sequence[datetime], interval: str, tz: ZoneInfo) -> None:
        self.bounds = [to_ms(start) for start in starts]
        self.bounds.append(to_ms(next_bucket(starts[-1], interval, tz)))

    @classmethod
    def window(cls, since_ms: int, until_ms: int) -> Buckets:
        """Return one bucket, ``[since_ms, until_ms)``."""
        buckets = cls.__new__(cls)
        buckets.bounds = [since_ms, until_ms]
        return buckets

    def index(self, moment_ms: int) -> int:
        """Return the index of the bucket containing ``moment_ms``."""
        return bisect_right(self.bounds, moment_ms) - 1

    def span(self, index: int, coverage: Coverage) -> tuple[int, int]:
        """Return the served slot range of bucket ``index`` inside the window."""
        start = max(self.bounds[index], coverage.first_slot)
        end = min(self.bounds[index + 1], coverage.end_slot)
        return start, end


def mixed_buckets(coverage: Coverage, buckets: Buckets) -> set[int]:
    """Return the buckets that contain part of the raw ranges."""
    mixed: set[int] = set()
    for start, end in coverage.raw:
        first = buckets.index(coverage.since_ms if start is None else start)
        last = buckets.index(end - 1)
        mixed.update(range(max(first, 0), last + 1))
    return mixed


def bucket_index(column: Any, bounds: Sequence[int]) -> ColumnElement[Any]:
    """Return SQL giving ``i`` where ``bounds[i] <= column < bounds[i + 1]``.

    The CASE expressions nest as a binary search, so each row costs about log2(buckets)
    comparisons. Numbers are inlined: PostgreSQL accepts a GROUP BY on the expression only
    when its text is the same as the selected one.
    """

    def number(value: int) -> ColumnElement[Any]:
        return literal_column(str(int(value)))

    def search(low: int, high: int) -> ColumnElement[Any]:
        if high - low == 1:
            return number(low)
        middle = (low + high) // 2
        return case(
            (column < number(bounds[middle]), search(low, middle)), else_=search(middle, high)
        )

    if len(bounds) < 2:
        raise ValueError("bucket_index needs at least one bucket (two bounds)")
    if len(bounds) == 2:
        # A bare constant in GROUP BY would be read as a column position by PostgreSQL.
        return case((column < number(bounds[1]), number(0)), else_=number(0))
    return search(0, len(bounds) - 1)


def channel_condition(column: Any, flt: MetricFilter) -> list[ColumnElement[bool]]:
    """Return the channel filter of ``flt`` on ``column``, as a list of conditions."""
    return [column.in_(flt.channels)] if flt.channels else []


def raw_message_times(connection: Connection, flt: MetricFilter, coverage: Coverage,
                      unserved: set[int]) -> Iterator[tuple[int, str]]:
    """Yield ``(time, channel)`` of the timed messages that rollups leave to raw rows.

    These are the messages of conversations that started in the raw ranges, and those in
    the ``unserved`` message slots of conversations that started in served slots.
    """
    columns = (Message.occurred_at_ms, Conversation.channel, Conversation.started_at_ms)
    timed = Message.kind.not_in(UNTIMED_KINDS)
    by_start = (
        select(*columns)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(timed, time_in_ranges(Conversation.started_at_ms, coverage.raw))
        .where(*channel_condition(Conversation.channel, flt))
    )
    for at_ms, channel, _ in connection.execute(by_start):
        yield at_ms, channel
    if not unserved:
        return
    by_time = (
        select(*columns)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            timed,
            time_in_ranges(Message.occurred_at_ms, slot_ranges(unserved)),
            Conversation.started_at_ms >= coverage.first_slot,
            Conversation.started_at_ms < coverage.end_slot,
        )
        .where(*channel_condition(Conversation.channel, flt))
    )
    for at_ms, channel, started_ms in connection.execute(by_time):
        if slot_of(started_ms) in coverage.served:
            yield at_ms, channel
