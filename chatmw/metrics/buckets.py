"""Calendar buckets (hour, day, week, month) in a time zone, daylight-saving aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = ["INTERVALS", "bucket_start", "next_bucket", "bucket_range", "MAX_BUCKETS"]

INTERVALS = ("hour", "day", "week", "month")
# The most buckets one series may have; a longer series is rejected rather than built.
MAX_BUCKETS = 20_000


def bucket_start(moment_ms: int, interval: str, tz: ZoneInfo) -> datetime:
    """Return the local start of the bucket containing ``moment_ms``, as an aware datetime.

    Weeks start on Monday (ISO 8601). Hours are calendar hours of the zone, so the repeated
    hour of a daylight-saving change is two buckets and the skipped hour is none.
    """
    local = datetime.fromtimestamp(moment_ms / 1000, UTC).astimezone(tz)
    if interval == "hour":
        # Truncating in UTC keeps the two repeated local hours apart; zones with a
        # non-whole-hour offset are truncated on their own minute boundary.
        offset = local.utcoffset() or timedelta(0)
        shifted = local.astimezone(UTC) + offset
        start = shifted.replace(minute=0, second=0, microsecond=0) - offset
        return start.astimezone(tz)
    if interval == "day":
        return _local_midnight(local.date().year, local.date().month, local.date().day, tz)
    if interval == "week":
        day = local.date() - timedelta(days=local.weekday())
        return _local_midnight(day.year, day.month, day.day, tz)
    if interval == "month":
        return _local_midnight(local.year, local.month, 1, tz)
    raise ValueError(f"unknown interval {interval!r}; expected one of {', '.join(INTERVALS)}")


def _local_midnight(year: int, month: int, day: int, tz: ZoneInfo) -> datetime:
    # Where midnight is skipped by a daylight-saving change, fold=0 resolves it forward.
    return datetime(year, month, day, tzinfo=tz)


def next_bucket(start: datetime, interval: str, tz: ZoneInfo) -> datetime:
    """Return the start of the bucket after the one starting at ``start``."""
    if interval == "hour":
        return (start.astimezone(UTC) + timedelta(hours=1)).astimezone(tz)
    if interval == "day":
        day = start.date() + timedelta(days=1)
        return _local_midnight(day.year, day.month, day.day, tz)
    if interval == "week":
        day = start.date() + timedelta(days=7)
        return _local_midnight(day.year, day.month, day.day, tz)
    if interval == "month":
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return _local_midnight(year, month, 1, tz)
    raise ValueError(f"unknown interval {interval!r}; expected one of {', '.join(INTERVALS)}")


def bucket_range(first_ms: int, end_ms: int, interval: str, tz: ZoneInfo) -> list[datetime]:
    """Return every bucket start from the bucket of ``first_ms`` up to ``end_ms`` (exclusive)."""
    starts = []
    current = bucket_start(first_ms, interval, tz)
    while current.timestamp() * 1000 < end_ms:
        starts.append(current)
        if len(starts) > MAX_BUCKETS:
            raise ValueError(f"more than {MAX_BUCKETS} {interval} buckets; use a wider interval")
        current = next_bucket(current, interval, tz)
    return starts
