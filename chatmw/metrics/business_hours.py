"""Response times in business time (only seconds inside business hours), beside calendar time.

The schedule comes from the request (``hours`` and ``hours_tz``), else from the one the
application installed at start-up with :func:`use_business_hours`, else
:data:`~chatmw.business_hours.DEFAULT_BUSINESS_HOURS` (Monday to Friday, 09:00-17:00 UTC).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

from sqlalchemy import Engine, select

from chatmw.business_hours import DEFAULT_BUSINESS_HOURS, BusinessHours, Schedule, parse_inline
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import describe_seconds
from chatmw.store.models import Message

__all__ = [
    "response_time_business",
    "RESPONSE_TIME_BUSINESS",
    "use_business_hours",
    "installed_business_hours",
    "MAX_INLINE_LENGTH",
]

ROLES = ("all", "bot", "agent")
FIGURES = ("first_response", "reply_time")
BASES = ("calendar", "business")
MAX_INLINE_LENGTH = 500

_installed: BusinessHours | None = None


def use_business_hours(hours: BusinessHours | None) -> None:
    """Install the application's business hours (``None`` restores the default)."""
    global _installed
    _installed = hours


def installed_business_hours() -> BusinessHours:
    """Return the business hours the application installed, or the default."""
    return _installed or DEFAULT_BUSINESS_HOURS


def _resolve(options: Mapping[str, Any]) -> tuple[BusinessHours, str]:
    inline = options.get("hours")
    zone = options.get("hours_tz")
    if inline is None:
        if zone is not None:
            raise FilterError("hours_tz", "only applies together with hours")
        return installed_business_hours(), "default" if _installed is None else "configured"
    if len(inline) > MAX_INLINE_LENGTH:
        raise FilterError("hours", f"longer than {MAX_INLINE_LENGTH} characters")
    try:
        return parse_inline(inline, zone or "UTC"), "request"
    except ValueError as error:
        message = str(error)
        if message.startswith("hours_tz: "):
            raise FilterError("hours_tz", message.removeprefix("hours_tz: ")) from None
        # Keep the day and period position ("mon-fri[0]: ...") that the parser names.
        raise FilterError("hours", message.removeprefix("hours: ").removeprefix("hours.")) from None


def _empty() -> dict[str, dict[str, dict[str, list[float]]]]:
    return {figure: {basis: {role: [] for role in ROLES} for basis in BASES} for figure in FIGURES}


def collect_business_durations(
    engine: Engine, flt: MetricFilter, hours: BusinessHours
) -> dict[Any, dict[str, dict[str, dict[str, list[float]]]]]:
    """Return durations in ms: group key -> figure -> basis -> role -> values."""
    scope = conversation_scope(flt).subquery()
    statement = (
        select(
            scope.c.group_key,
            Message.channel,
            Message.role,
            Message.occurred_at_ms,
            Message.response_ms,
            Message.is_first_response,
        )
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.response_ms.is_not(None))
    )
    collected: dict[Any, dict[str, dict[str, dict[str, list[float]]]]] = defaultdict(_empty)
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    if not rows:
        return collected
    low = min(
        answered_ms - int(round(response_ms)) for _, _, _, answered_ms, response_ms, _ in rows
    )
    high = max(answered_ms for _, _, _, answered_ms, _, _ in rows)
    clocks: dict[str, _BusinessClock] = {}
    # The value lists each kind of row appends to, looked up once per kind, not per row.
    targets: dict[tuple[Any, Any, bool], tuple[list[list[float]], list[list[float]]]] = {}
    for key, channel, role, answered_ms, response_ms, is_first in rows:
        clock = clocks.get(channel)
        if clock is None:
            clock = clocks[channel] = _BusinessClock(hours.for_channel(channel), low, high)
        target = targets.get((key, role, bool(is_first)))
        if target is None:
            target = targets[(key, role, bool(is_first))] = _value_lists(
                collected[key], role, bool(is_first)
            )
        calendar_lists, business_lists = target
        calendar = float(response_ms)
        business = float(clock.business_ms(answered_ms - int(round(response_ms)), answered_ms))
        for values in calendar_lists:
            values.append(calendar)
        for values in business_lists:
            values.append(business)
    return collected


def _value_lists(
    durations: dict[str, dict[str, dict[str, list[float]]]], role: Any, is_first: bool
) -> tuple[list[list[float]], list[list[float]]]:
    figures = ("reply_time", "first_response") if is_first else ("reply_time",)
    roles = ("all", role) if role in ROLES else ("all",)
    return tuple(  # type: ignore[return-value]
        [durations[figure][basis][name] for figure in figures for name in roles] for basis in BASES
    )


class _BusinessClock:
    """Business milliseconds of a schedule between any two moments of ``[low, high]``.

    It keeps the schedule's merged open intervals over that range and the open time before
    each, so a query is two binary searches instead of building each day's periods again.
    It returns what ``Schedule.business_ms`` returns for the same moments.
    """

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
        if end_ms <= start_ms:
            return 0
        return self._open_before(end_ms) - self._open_before(start_ms)


def _figures(durations: Mapping[str, Mapping[str, Mapping[str, list[float]]]]) -> dict[str, Any]:
    return {
        figure: {
            basis: {role: describe_seconds(durations[figure][basis][role]) for role in ROLES}
            for basis in BASES
        }
        for figure in FIGURES
    }


def response_time_business(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Compute first response and reply time in calendar and in business time."""
    hours, origin = _resolve(options)
    collected = collect_business_durations(engine, flt, hours)
    merged = _empty()
    for durations in collected.values():
        for figure in FIGURES:
            for basis in BASES:
                for role in ROLES:
                    merged[figure][basis][role].extend(durations[figure][basis][role])
    result: dict[str, Any] = {
        "metric": "response-time-business",
        "filters": flt.describe(),
        "business_hours": {"source": origin, **hours.describe()},
    }
    result.update(_figures(merged))
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), **_figures(collected[key])}
            for key in sorted(collected, key=group_label)
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows = []
    for group, section in sections:
        for figure in FIGURES:
            for basis in BASES:
                for role in ROLES:
                    rows.append(
                        {
                            "group": group,
                            "figure": figure,
                            "basis": basis,
                            "role": role,
                            **section[figure][basis][role],
                        }
                    )
    return rows


RESPONSE_TIME_BUSINESS = register(
    MetricSpec(
        name="response-time-business",
        summary="First response and reply time in business hours, beside calendar time",
        description=(
            "The figures of `response-time` (first response and reply time, by `bot`, `agent` and "
            "`all`, as count, mean, p50, p90, p95 and max in seconds), each given twice. "
            "`calendar` counts every second from the user's message to the answer. `business` "
            "counts only the seconds inside business hours: a question sent on Friday evening and "
            "answered on Monday at 09:30 takes 30 minutes of business time when the team opens "
            "at 09:00. An "
            "answer given entirely outside business hours takes 0 business seconds.\n\n"
            "Business hours are a weekly schedule of periods per day in the team's time zone, "
            "optionally different per channel (each answer uses its message's channel), with "
            "closed dates; periods may cross midnight. They come from the request's `hours` "
            "(for example `mon-fri 09:00-12:30,13:30-18:00; sat 10:00-14:00`, read in "
            "`hours_tz`), else from the application's configuration, else Monday to Friday "
            "09:00-17:00 UTC. `business_hours.source` says which (`request`, `configured` or "
            "`default`) and the schedule used is echoed. Wall-clock times skipped by a "
            "daylight-saving change resolve with the offset before the change.\n\n"
            "The configuration is the `[business_hours]` table of the `chatmw serve` "
            "configuration file (or a `chatmw.business_hours.BusinessHours` given to "
            "`mount_chatmw`). Day keys are `mon` to `sun` or ranges such as `mon-fri`; a "
            "period whose end is not after its start ends on the next day; `24:00` ends a day; "
            "a closed date drops the periods that start on it; an invalid entry stops start-up "
            "with an error naming it:\n\n"
            "```toml\n"
            "[business_hours]\n"
            'timezone = "Europe/Paris"\n'
            'closed = ["2024-12-25"]\n'
            "[business_hours.hours]\n"
            'mon-fri = ["09:00-12:30", "13:30-18:00"]\n'
            'sat = ["22:00-02:00"]\n'
            "[business_hours.channels.whatsapp]\n"
            'timezone = "America/New_York"\n'
            "[business_hours.channels.whatsapp.hours]\n"
            'mon-sun = ["00:00-24:00"]\n'
            "```"
        ),
        compute=response_time_business,
        params=(
            Param(
                "hours",
                "Business hours for this request, e.g. 'mon-fri 09:00-17:00; sat 10:00-14:00' "
                "(days mon..sun or ranges; periods HH:MM-HH:MM, comma-separated; an end before "
                "the start crosses midnight).",
            ),
            Param("hours_tz", "IANA time zone of `hours` (default UTC)."),
        ),
        rows=_rows,
    )
)
