"""Business hours: a team's opening periods per weekday, per channel, in its own time zone.

A schedule is read from a TOML file (:meth:`BusinessHours.from_toml`), a mapping
(:meth:`BusinessHours.from_mapping`, the same keys as the file) or a compact one-line text
(:func:`parse_inline`). The file looks like this::

    timezone = "Europe/Paris"          # IANA zone of the wall-clock times below
    closed = ["2024-12-25"]            # dates (in that zone) without business hours
    [hours]
    mon-fri = ["09:00-12:30", "13:30-18:00"]
    sat = ["22:00-02:00"]              # ends at 02:00 on Sunday

    [channels.whatsapp]                # overrides for one channel
    timezone = "America/New_York"      # optional: defaults to the top-level zone
    [channels.whatsapp.hours]          # optional: defaults to the top-level hours
    mon-sun = ["00:00-24:00"]

Day keys are ``mon`` .. ``sun`` or a range such as ``mon-fri`` (``fri-mon`` wraps over the
weekend); a day may appear once. A period ``HH:MM-HH:MM`` whose end is not after its start
crosses midnight and belongs to the day it starts on; ``24:00`` ends a day. A closed date
drops the periods that start on it. Invalid input raises ``ValueError`` naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "BusinessHours",
    "BusinessClock",
    "Schedule",
    "parse_inline",
    "DAYS",
    "DEFAULT_BUSINESS_HOURS",
]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PERIOD = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
MINUTES_PER_DAY = 24 * 60
# The maximum number of dates whose converted periods one schedule caches.
_DAY_CACHE_SIZE = 4096


def _parse_period(setting: str, text: Any) -> tuple[int, int]:
    match = _PERIOD.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{setting}: invalid period {text!r}; expected HH:MM-HH:MM such as 09:00-17:30"
        )
    start_hour, start_minute, end_hour, end_minute = (int(part) for part in match.groups())
    if (
        start_hour > 23
        or start_minute > 59
        or end_minute > 59
        or end_hour > 24
        or (end_hour == 24 and end_minute != 0)
    ):
        raise ValueError(f"{setting}: invalid time in {text!r}; hours run 00:00 to 24:00")
    start = start_hour * 60 + start_minute
    end = end_hour * 60 + end_minute
    if start == end:
        raise ValueError(f"{setting}: period {text!r} is empty; write 00:00-24:00 for a whole day")
    return start, end


def _parse_days(setting: str, key: str) -> list[int]:
    names = key.strip().lower().split("-")
    if len(names) > 2 or any(name not in DAYS for name in names):
        raise ValueError(
            f"{setting}: invalid day {key!r}; expected one of {', '.join(DAYS)} "
            "or a range such as mon-fri"
        )
    first = DAYS.index(names[0])
    last = DAYS.index(names[-1])
    span = (last - first) % 7
    return [(first + offset) % 7 for offset in range(span + 1)]


def _parse_week(setting: str, hours: Any) -> tuple[tuple[tuple[int, int], ...], ...]:
    if not isinstance(hours, Mapping):
        raise ValueError(f'{setting}: expected a table of days, such as mon-fri = ["09:00-17:00"]')
    week: list[tuple[tuple[int, int], ...] | None] = [None] * 7
    for key, periods in hours.items():
        if isinstance(periods, str):
            periods = [periods]
        if not isinstance(periods, Sequence):
            raise ValueError(f'{setting}.{key}: expected a list of periods such as ["09:00-17:00"]')
        parsed = tuple(
            _parse_period(f"{setting}.{key}[{index}]", period)
            for index, period in enumerate(periods)
        )
        for day in _parse_days(f"{setting}.{key}", key):
            if week[day] is not None:
                raise ValueError(f"{setting}.{key}: {DAYS[day]} is given more than once")
            week[day] = parsed
    return tuple(periods or () for periods in week)


def _parse_zone(setting: str, value: Any) -> ZoneInfo:
    if not isinstance(value, str):
        raise ValueError(f"{setting}: expected an IANA time zone name such as Europe/Paris")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{setting}: unknown time zone {value!r}; use an IANA name such as Europe/Paris"
        ) from None


def _parse_closed(setting: str, values: Any) -> frozenset[date]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f'{setting}: expected a list of dates such as ["2024-12-25"]')
    closed = set()
    for index, value in enumerate(values):
        if isinstance(value, date) and not isinstance(value, datetime):
            closed.add(value)
            continue
        try:
            closed.add(date.fromisoformat(str(value)))
        except ValueError:
            raise ValueError(
                f"{setting}[{index}]: invalid date {value!r}; expected YYYY-MM-DD"
            ) from None
    return frozenset(closed)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Opening periods per weekday (Monday first, minutes after local midnight) in ``tz``."""

    tz: ZoneInfo
    week: tuple[tuple[tuple[int, int], ...], ...]
    closed: frozenset[date] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.week) != 7:
            raise ValueError(f"week: expected 7 days of periods, got {len(self.week)}")
        object.__setattr__(
            self, "_day_cache", lru_cache(maxsize=_DAY_CACHE_SIZE)(self._day_intervals)
        )

    def _local_ms(self, day: date, minute: int) -> int:
        extra_days, minute_of_day = divmod(minute, MINUTES_PER_DAY)
        if extra_days and day == date.max:
            # A period that crosses midnight of 9999-12-31 ends after the last date Python
            # represents, so its end is counted from that day's local midnight.
            return self._local_ms(day, 0) + minute * 60_000
        day = day + timedelta(days=extra_days)
        minute = minute_of_day
        # A wall time skipped by a daylight-saving change resolves with the offset before it.
        moment = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=self.tz)
        return int(moment.timestamp() * 1000)

    def _day_intervals(self, day: date) -> tuple[tuple[int, int], ...]:
        if day in self.closed:
            return ()
        intervals = []
        for start, end in self.week[day.weekday()]:
            end_minute = end if end > start else end + MINUTES_PER_DAY
            intervals.append((self._local_ms(day, start), self._local_ms(day, end_minute)))
        return tuple(intervals)

    def _local_date(self, moment_ms: int) -> date:
        try:
            return datetime.fromtimestamp(moment_ms / 1000, UTC).astimezone(self.tz).date()
        except (OverflowError, ValueError):
            # Moments past 9999-12-31 or before 0001-01-01 in this zone.
            return date.max if moment_ms > 0 else date.min

    def intervals(self, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """Return the merged business intervals (epoch ms) that overlap ``[start_ms, end_ms)``."""
        if end_ms <= start_ms:
            return []
        # A period that crosses midnight belongs to the day before, so start a day early.
        first = self._local_date(start_ms)
        if first > date.min:
            first -= timedelta(days=1)
        last = self._local_date(end_ms)
        raw = []
        day = first
        while True:
            raw.extend(self._day_cache(day))  # type: ignore[attr-defined]
            if day >= last:
                break
            day += timedelta(days=1)
        merged: list[tuple[int, int]] = []
        for begin, end in sorted(raw):
            begin, end = max(begin, start_ms), min(end, end_ms)
            if begin >= end:
                continue
            if merged and begin <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((begin, end))
        return merged

    def business_ms(self, start_ms: int, end_ms: int) -> int:
        """Return the milliseconds of ``[start_ms, end_ms)`` that fall inside business hours."""
        return sum(end - begin for begin, end in self.intervals(start_ms, end_ms))

    def is_open(self, moment_ms: int) -> bool:
        """Return whether ``moment_ms`` falls inside business hours."""
        return bool(self.intervals(moment_ms, moment_ms + 1))

    def describe(self) -> dict[str, Any]:
        """Return the schedule as plain data, echoed in results."""
        return {
            "timezone": self.tz.key,
            "hours": {
                DAYS[day]: [
                    f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
                    for start, end in periods
                ]
                for day, periods in enumerate(self.week)
            },
            "closed": sorted(day.isoformat() for day in self.closed),
        }


@dataclass(frozen=True)
class BusinessHours:
    """A team's schedule, with optional per-channel schedules."""

    default: Schedule
    channels: Mapping[str, Schedule] = field(default_factory=dict)

    def for_channel(self, channel: str) -> Schedule:
        """Return the schedule of ``channel``, or the default one."""
        return self.channels.get(channel, self.default)

    def describe(self) -> dict[str, Any]:
        """Return the schedules as plain data."""
        return {
            **self.default.describe(),
            "channels": {
                name: schedule.describe() for name, schedule in sorted(self.channels.items())
            },
        }

    def canonical_json(self) -> str:
        """Return the schedules as JSON with sorted keys and periods: the form rollups store.

        Channel schedules equal to the default one are left out, because they count the
        same business time. :meth:`from_canonical_json` reads it back.
        """
        default = _sorted_periods(self.default.describe())
        channels = {}
        for name, schedule in sorted(self.channels.items()):
            described = _sorted_periods(schedule.describe())
            if described != default:
                channels[name] = described
        return json.dumps({**default, "channels": channels}, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Return the SHA-256 (hex) of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @classmethod
    def from_canonical_json(cls, text: str) -> BusinessHours:
        """Build business hours from the output of :meth:`canonical_json`."""
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], setting: str = "business_hours"
    ) -> BusinessHours:
        """Build business hours from the keys of the TOML file, parsed into a mapping."""
        known = {"timezone", "hours", "closed", "channels"}
        for key in data:
            if key not in known:
                raise ValueError(
                    f"{setting}.{key}: unknown setting; expected one of {', '.join(sorted(known))}"
                )
        if "hours" not in data:
            raise ValueError(f"{setting}.hours: missing; give the opening periods per day")
        tz = _parse_zone(f"{setting}.timezone", data.get("timezone", "UTC"))
        week = _parse_week(f"{setting}.hours", data["hours"])
        closed = _parse_closed(f"{setting}.closed", data.get("closed", []))
        default = Schedule(tz, week, closed)

        channels: dict[str, Schedule] = {}
        overrides = data.get("channels", {})
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{setting}.channels: expected a table of channel names")
        for name, override in overrides.items():
            prefix = f"{setting}.channels.{name}"
            if not isinstance(override, Mapping):
                raise ValueError(f"{prefix}: expected a table with timezone, hours or closed")
            for key in override:
                if key not in ("timezone", "hours", "closed"):
                    raise ValueError(
                        f"{prefix}.{key}: unknown setting; expected timezone, hours or closed"
                    )
            channels[name] = Schedule(
                _parse_zone(f"{prefix}.timezone", override["timezone"])
                if "timezone" in override
                else tz,
                _parse_week(f"{prefix}.hours", override["hours"]) if "hours" in override else week,
                _parse_closed(f"{prefix}.closed", override["closed"])
                if "closed" in override
                else closed,
            )
        return cls(default, channels)

    @classmethod
    def from_toml(cls, path: str | Path) -> BusinessHours:
        """Read business hours from a TOML file."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"business_hours file {path}: invalid TOML: {error}") from None
        return cls.from_mapping(data, setting="business_hours")


def _sorted_periods(described: dict[str, Any]) -> dict[str, Any]:
    return {
        **described,
        "hours": {day: sorted(periods) for day, periods in described["hours"].items()},
    }


class BusinessClock:
    """Business milliseconds of a schedule between any two moments of ``[low, high]``.

    It keeps the schedule's merged open intervals over that range and the open time before
    each, so a query is two binary searches instead of building each day's periods again.
    It returns what ``Schedule.business_ms`` returns for the same moments.
    """

    # NOTE: building costs time and memory in proportion to the days from ``low_ms`` to
    # ``high_ms``: one answer dated in the year 9999 makes it take about 30 s (2024 to
    # 9999, 2-core machine under load), in the raw metric and in the rollup refresh alike.

    def __init__(self, schedule: Schedule, low_ms: int, high_ms: int) -> None:
        intervals = schedule.intervals(low_ms, high_ms + 1)
        self._starts = [begin for begin, _ in intervals]
        self._ends = [end for _, end in intervals]
        self._before = list(accumulate((end - begin for begin, end in intervals), initial=0))

    def _open_before(self, moment_ms: int) -> int:
        index = bisect_right(self._starts, moment_ms) - 1
        if index < 0:
            return 0
        inside = min(moment_ms, self._ends[index]) - self._starts[index]
        return self._before[index] + inside

    def business_ms(self, start_ms: int, end_ms: int) -> int:
        """Return the business milliseconds of ``[start_ms, end_ms)``."""
        if end_ms <= start_ms:
            return 0
        return self._open_before(end_ms) - self._open_before(start_ms)


def parse_inline(
    text: str, timezone: str = "UTC", setting: str = "hours", zone_setting: str = "hours_tz"
) -> BusinessHours:
    """Parse ``"mon-fri 09:00-17:00,18:00-20:00; sat 10:00-14:00"`` into business hours.

    Errors name ``setting`` (with the day and period position) or ``zone_setting``.
    """
    hours: dict[str, list[str]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        days, _, periods = part.strip().partition(" ")
        if not periods.strip():
            raise ValueError(
                f"{setting}: {part.strip()!r} has no periods; expected e.g. mon-fri 09:00-17:00"
            )
        if days in hours:
            raise ValueError(f"{setting}: {days} is given more than once")
        hours[days] = [period.strip() for period in periods.split(",")]
    if not hours:
        raise ValueError(f"{setting}: empty; expected e.g. mon-fri 09:00-17:00")
    return BusinessHours(Schedule(_parse_zone(zone_setting, timezone), _parse_week(setting, hours)))


# Used when neither the application nor the request gives business hours.
DEFAULT_BUSINESS_HOURS = BusinessHours.from_mapping(
    {"timezone": "UTC", "hours": {"mon-fri": ["09:00-17:00"]}}
)
