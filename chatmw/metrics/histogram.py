"""Log-scale histograms of durations, with percentiles estimated from bucket counts.

Response-time rollups keep, per bucket, the count, sum, minimum and maximum of the
durations (in ms) that fall in it. Buckets are 1/16 of an octave wide. Their lower bounds
are the distinct values of ``ceil(2 ** (k / 16))``, so below 23 ms every bucket contains
one integer. Count, mean and max computed from these buckets are exact. A percentile is
estimated inside the bucket that contains its rank, by linear interpolation between the
bucket's own minimum and maximum. The estimate lies in the same bucket as the exact value,
so it differs from it by less than the bucket's width. That is under 4.45 % of the value,
and exactly 0 for durations below 23 ms and for ranks on a bucket's minimum or maximum.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatmw.metrics.stats import EMPTY_STATS

__all__ = [
    "Bin",
    "Histogram",
    "bucket_of",
    "add_value",
    "merge_into",
    "describe_histogram",
    "SlotKey",
    "add_slot_duration",
    "slot_rows",
    "RELATIVE_ERROR",
    "FRACTIONS",
]

BUCKETS_PER_OCTAVE = 16
# The largest relative gap between a value and its estimate: one bucket width, 2 ** (1/16) - 1.
RELATIVE_ERROR = 2 ** (1 / BUCKETS_PER_OCTAVE) - 1
# Percentiles that describe_histogram reports, as in chatmw.metrics.stats.describe_seconds.
FRACTIONS = {"p50": 0.5, "p90": 0.9, "p95": 0.95}
_OCTAVES = 48  # 2 ** 48 ms is about 8,900 years; longer durations share the last bucket.


def _lower_bounds() -> list[int]:
    bounds: list[int] = []
    for index in range(BUCKETS_PER_OCTAVE * _OCTAVES):
        bound = math.ceil(2 ** (index / BUCKETS_PER_OCTAVE))
        if not bounds or bound > bounds[-1]:
            bounds.append(bound)
    return bounds


# Bucket 0 contains durations below 1 ms (0 included); bucket i > 0 starts at _BOUNDS[i - 1].
_BOUNDS = _lower_bounds()


def bucket_of(value_ms: float) -> int:
    """Return the bucket number of a duration in ms (negative durations go to bucket 0)."""
    return bisect_right(_BOUNDS, value_ms)


@dataclass(slots=True)
class Bin:
    """The durations of one bucket: count, sum, minimum and maximum, in ms."""

    count: int
    total: float
    low: float
    high: float

    def add(self, count: int, total: float, low: float, high: float) -> None:
        self.count += count
        self.total += total
        self.low = min(self.low, low)
        self.high = max(self.high, high)


Histogram = dict[int, Bin]


def add_value(histogram: Histogram, value_ms: float) -> None:
    """Count one duration in ``histogram``."""
    bucket = bucket_of(value_ms)
    found = histogram.get(bucket)
    if found is None:
        histogram[bucket] = Bin(1, value_ms, value_ms, value_ms)
    else:
        found.add(1, value_ms, value_ms, value_ms)


def merge_into(target: Histogram, source: Mapping[int, Bin]) -> None:
    """Add the bins of ``source`` to ``target``."""
    for bucket, part in source.items():
        found = target.get(bucket)
        if found is None:
            target[bucket] = Bin(part.count, part.total, part.low, part.high)
        else:
            found.add(part.count, part.total, part.low, part.high)


def _seconds(value_ms: float) -> float:
    return round(value_ms / 1000, 3)


def _value_at(bins: list[Bin], starts: list[int], rank: int) -> float:
    """Estimate the value of 0-based ``rank`` in the sorted durations."""
    index = bisect_right(starts, rank) - 1
    part = bins[index]
    if part.count == 1:
        return part.low
    offset = rank - starts[index]
    return part.low + (part.high - part.low) * offset / (part.count - 1)


def describe_histogram(histograms: Iterable[Mapping[int, Bin]]) -> dict[str, float | int | None]:
    """Return count, mean, p50, p90, p95 and max, in seconds, of the merged histograms.

    The shape is that of ``describe_seconds``; percentiles interpolate between ranks as
    ``percentile_cont`` does, with each rank's value estimated as the module describes.
    """
    merged: Histogram = {}
    for histogram in histograms:
        merge_into(merged, histogram)
    bins = [merged[bucket] for bucket in sorted(merged) if merged[bucket].count]
    count = sum(part.count for part in bins)
    if count == 0:
        return dict(EMPTY_STATS)
    starts: list[int] = []
    seen = 0
    for part in bins:
        starts.append(seen)
        seen += part.count
    described: dict[str, float | int | None] = {
        "count": count,
        "mean": _seconds(math.fsum(part.total for part in bins) / count),
    }
    for name, fraction in FRACTIONS.items():
        position = fraction * (count - 1)
        lower = math.floor(position)
        upper = min(lower + 1, count - 1)
        low_value = _value_at(bins, starts, lower)
        high_value = _value_at(bins, starts, upper)
        described[name] = _seconds(low_value + (high_value - low_value) * (position - lower))
    described["max"] = _seconds(max(part.high for part in bins))
    return described


# The key of a slot row of a duration histogram: start slot, channel, figure, role, bucket.
SlotKey = tuple[int, str, str, str, int]


def add_slot_duration(
    bins: dict[SlotKey, Bin],
    start_slot: int,
    channel: str,
    figure: str,
    role: str | None,
    value: float,
) -> None:
    """Count ``value`` in its bucket of the slot, channel, figure and role (``""`` for none)."""
    key = (int(start_slot), channel, figure, role or "", bucket_of(value))
    found = bins.get(key)
    if found is None:
        bins[key] = Bin(1, value, value, value)
    else:
        found.add(1, value, value, value)


def slot_rows(bins: Mapping[SlotKey, Bin], level: int) -> list[dict[str, Any]]:
    """Return the rows of a histogram table for ``bins`` at ``level``."""
    return [
        {
            "level": level,
            "start_ms": start_ms,
            "channel": channel,
            "figure": figure,
            "role": role,
            "bucket": bucket,
            "count": part.count,
            "total_ms": part.total,
            "min_ms": part.low,
            "max_ms": part.high,
        }
        for (start_ms, channel, figure, role, bucket), part in bins.items()
    ]
