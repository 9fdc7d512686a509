"""Response times in business time (only seconds inside business hours), beside calendar time.

The schedule comes from the request (``hours`` and ``hours_tz``), else from the one the
application installed at start-up with :func:`use_business_hours`, else
:data:`~chatmw.business_hours.DEFAULT_BUSINESS_HOURS` (Monday to Friday, 09:00-17:00 UTC).
When the schedule is the one the rollups were counted for
(``chatmw.metrics.business_rollups``) and rollups cover the window, both halves come from
histograms; otherwise every duration is read from raw rows.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, select

from chatmw.business_hours import (
    DEFAULT_BUSINESS_HOURS,
    BusinessClock,
    BusinessHours,
    parse_inline,
)
from chatmw.metrics.business_rollups import business_durations, read_schedule
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.histogram import add_value
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.response_time import EXACT, describe_responses, exact_requested
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.started_query import (
    Responses,
    add_responses,
    add_rolled_histograms,
    new_responses,
)
from chatmw.metrics.stats import describe_seconds
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import RollupBusinessResponses

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
    clocks: dict[str, BusinessClock] = {}
    # The value lists each kind of row appends to, looked up once per kind, not per row.
    targets: dict[tuple[Any, Any, bool], tuple[list[list[float]], list[list[float]]]] = {}
    for key, channel, role, answered_ms, response_ms, is_first in rows:
        clock = clocks.get(channel)
        if clock is None:
            clock = clocks[channel] = BusinessClock(hours.for_channel(channel), low, high)
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


def _figures(durations: Mapping[str, Mapping[str, Mapping[str, list[float]]]]) -> dict[str, Any]:
    return {
        figure: {
            basis: {role: describe_seconds(durations[figure][basis][role]) for role in ROLES}
            for basis in BASES
        }
        for figure in FIGURES
    }


def _add_raw_business(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    hours: BusinessHours,
    responses: Responses,
) -> None:
    """Add the business durations of the conversations that started in the raw ranges."""
    statement = (
        select(
            Conversation.channel,
            Message.role,
            Message.is_first_response,
            Message.channel,
            Message.occurred_at_ms,
            Message.response_ms,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.response_ms.is_not(None),
            time_in_ranges(Conversation.started_at_ms, coverage.raw),
            *channel_condition(Conversation.channel, flt),
        )
    )
    rows = connection.execute(statement).all()
    durations = business_durations([(row[3], row[4], row[5]) for row in rows], hours)
    for (channel, role, is_first, *_), value in zip(rows, durations, strict=True):
        by_figure = responses[channel if flt.group_by is not None else None]
        add_value(by_figure["reply_time"][role or ""], value)
        if is_first:
            add_value(by_figure["first_response"][role or ""], value)


def rolled_histograms(
    engine: Engine, flt: MetricFilter, hours: BusinessHours
) -> dict[str, Responses] | None:
    """Return the calendar and business histograms per group, or None to read raw rows.

    Rollups serve the query when ``chatmw.metrics.rollup_query.cover`` accepts it and the
    business-hours histograms are built for a schedule with the fingerprint of ``hours``.
    """
    # Start slots are counted in UTC, as in chatmw.metrics.started_query.
    utc = dataclasses.replace(flt, tz=ZoneInfo("UTC"))
    with engine.connect() as connection:
        coverage = cover(connection, utc)
        if coverage is None:
            return None
        stored = read_schedule(connection)
        if stored is None or not stored.built or stored.fingerprint != hours.fingerprint():
            return None
        calendar, business = new_responses(), new_responses()
        add_responses(connection, flt, coverage, calendar)
        add_rolled_histograms(connection, RollupBusinessResponses, flt, coverage, business)
        if coverage.raw:
            _add_raw_business(connection, flt, coverage, hours, business)
    return {"calendar": calendar, "business": business}


def _histogram_figures(by_basis: Mapping[str, list[Any]]) -> dict[str, Any]:
    return {
        figure: {
            basis: {role: describe_responses(by_basis[basis], figure, role) for role in ROLES}
            for basis in BASES
        }
        for figure in FIGURES
    }


def _rolled_result(histograms: dict[str, Responses], grouped: bool) -> dict[str, Any]:
    result = _histogram_figures({basis: list(histograms[basis].values()) for basis in BASES})
    if grouped:
        keys = set(histograms["calendar"]) | set(histograms["business"])
        result["groups"] = [
            {
                "group": group_label(key),
                **_histogram_figures({basis: [histograms[basis][key]] for basis in BASES}),
            }
            for key in sorted(keys, key=group_label)
        ]
    return result


def response_time_business(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Compute first response and reply time in calendar and in business time.

    Percentiles are estimated from rollup histograms where rollups serve the query
    (:func:`rolled_histograms`) unless the ``exact`` option is ``true``.
    """
    hours, origin = _resolve(options)
    result: dict[str, Any] = {
        "metric": "response-time-business",
        "filters": flt.describe(),
        "business_hours": {"source": origin, **hours.describe()},
    }
    histograms = None if exact_requested(options) else rolled_histograms(engine, flt, hours)
    if histograms is not None:
        result.update(_rolled_result(histograms, flt.group_by is not None))
        return result
    collected = collect_business_durations(engine, flt, hours)
    merged = _empty()
    for durations in collected.values():
        for figure in FIGURES:
            for basis in BASES:
                for role in ROLES:
                    merged[figure][basis][role].extend(durations[figure][basis][role])
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
            "Where rollups cover the window and the schedule used is the one the rollups were "
            "counted for (the application's configured schedule, or the default), count, mean "
            "and max are exact and each percentile is estimated from log-scale histograms to "
            "within 4.45 % of the exact value (exact below 23 ms), as in `response-time`; "
            "`exact=true`, and any other schedule, compute every figure from raw durations.\n\n"
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
            EXACT,
        ),
        rows=_rows,
    )
)
