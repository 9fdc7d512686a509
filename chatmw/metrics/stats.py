"""Summary statistics shared by the metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile_cont", "describe_seconds", "rate", "EMPTY_STATS"]

EMPTY_STATS = {"count": 0, "mean": None, "p50": None, "p90": None, "p95": None, "max": None}


def percentile_cont(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Return the percentile of ``sorted_values`` with linear interpolation between ranks.

    This is PostgreSQL's ``percentile_cont``: the value at position
    ``fraction * (n - 1)``, interpolated between its two neighbours.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * weight


def _seconds(value_ms: float | None) -> float | None:
    return None if value_ms is None else round(value_ms / 1000, 3)


def describe_seconds(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """Return count, mean, p50, p90, p95 and max, in seconds, of durations in milliseconds."""
    if not values_ms:
        return dict(EMPTY_STATS)
    ordered = sorted(values_ms)
    return {
        "count": len(ordered),
        "mean": _seconds(math.fsum(ordered) / len(ordered)),
        "p50": _seconds(percentile_cont(ordered, 0.5)),
        "p90": _seconds(percentile_cont(ordered, 0.9)),
        "p95": _seconds(percentile_cont(ordered, 0.95)),
        "max": _seconds(ordered[-1]),
    }


def rate(numerator: int, denominator: int) -> float | None:
    """Return ``numerator / denominator`` rounded to 4 places, or ``None`` when it is 0."""
    return None if denominator == 0 else round(numerator / denominator, 4)
