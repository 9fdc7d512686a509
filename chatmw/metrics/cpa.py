"""Cost per acquisition and return on investment, per campaign (or channel) and overall."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import Engine, select

from chatmw.events import to_ms
from chatmw.events_business import MICROS, format_micros
from chatmw.metrics.business_query import rolled_conversions, serves_days, serves_filter
from chatmw.metrics.conversion import (
    ATTRIBUTION_PARAM,
    ROLLUP_NOTE,
    attributed_conversions,
    attribution_days,
    currency_of,
)
from chatmw.metrics.filters import FilterError, GroupBy, MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import UNKNOWN_GROUP, group_label
from chatmw.store.models_business import Spend

__all__ = ["cost_per_acquisition", "CPA"]

ONE_DAY = timedelta(days=1)


def _check_filter(flt: MetricFilter) -> GroupBy:
    # Spend is recorded by day, channel and campaign only, so nothing else can select it.
    if flt.attributes:
        name = next(iter(flt.attributes))
        raise FilterError(
            f"attr.{name}", "spend has no conversation attributes; filter by channel or campaign"
        )
    for name in flt.touch_filters:
        if name != "campaign":
            raise FilterError(
                name,
                "spend is recorded by day, channel and campaign; filter by channel or campaign",
            )
    group_by = flt.group_by or GroupBy("campaign")
    if group_by.kind not in ("campaign", "channel"):
        raise FilterError("group_by", f"expected campaign or channel, got {group_by.label!r}")
    return group_by


def _day_in_window(day: date, flt: MetricFilter) -> bool:
    start_ms = to_ms(datetime(day.year, day.month, day.day, tzinfo=flt.tz))
    if flt.since_ms is not None and start_ms < flt.since_ms:
        return False
    return flt.until_ms is None or start_ms < flt.until_ms


def _local_date(moment: datetime | None, flt: MetricFilter, step: timedelta) -> date | None:
    """Return the date of ``moment`` in ``flt.tz`` plus ``step``, or None when out of range."""
    if moment is None:
        return None
    try:
        return moment.astimezone(flt.tz).date() + step
    except OverflowError:
        return None


def _spend_by_group(engine: Engine, flt: MetricFilter, group_by: GroupBy) -> dict[str, int]:
    statement = select(Spend.day, Spend.channel, Spend.campaign, Spend.amount_micros)
    # Only days within one day of the window's local dates can have their midnight inside
    # it, and _day_in_window below makes the exact test.
    low = _local_date(flt.since, flt, -ONE_DAY)
    if low is not None:
        statement = statement.where(Spend.day >= low)
    high = _local_date(flt.until, flt, ONE_DAY)
    if high is not None:
        statement = statement.where(Spend.day <= high)
    if flt.channels:
        statement = statement.where(Spend.channel.in_(flt.channels))
    if "campaign" in flt.touch_filters:
        statement = statement.where(Spend.campaign == flt.touch_filters["campaign"])
    spend: dict[str, int] = defaultdict(int)
    in_window: dict[date, bool] = {}
    with engine.connect() as connection:
        for day, channel, campaign, micros in connection.execute(statement):
            if day not in in_window:
                in_window[day] = _day_in_window(day, flt)
            if not in_window[day]:
                continue
            key = channel if group_by.kind == "channel" else campaign
            spend[key or UNKNOWN_GROUP] += micros
    return spend


def _cpa(spend: int, conversions: int) -> str | None:
    if conversions == 0:
        return None
    value = Decimal(spend) / MICROS / conversions
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def _roi(revenue: int, spend: int) -> float | None:
    return None if spend == 0 else round((revenue - spend) / spend, 4)


def _figures(spend: int, conversions: tuple[int, int]) -> dict[str, Any]:
    count, revenue = conversions
    return {
        "spend": format_micros(spend),
        "conversions": count,
        "revenue": format_micros(revenue),
        "cpa": _cpa(spend, count),
        "roi": _roi(revenue, spend),
    }


def _conversions(
    engine: Engine, flt: MetricFilter, days: float
) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Return (conversions, revenue in micros) per group label and overall."""
    # Rollups keep the campaigns of both touches, so they serve the campaign filter too.
    plain = dataclasses.replace(flt, touch_filters={})
    if serves_days(days) and serves_filter(plain, ("campaign", "channel")):
        sums = rolled_conversions(engine, flt, counts=False)
        if sums is not None:
            return (
                {
                    group_label(key): _total(names.values())
                    for key, names in sums.names.items()
                    if names
                },
                _total(sums.overall.values()),
            )
    conversions: dict[str, dict[int, int]] = defaultdict(dict)
    overall: dict[int, int] = {}
    for row in attributed_conversions(engine, flt, days):
        conversions[group_label(row.group_key)][row.conversion_id] = row.value_micros
        overall[row.conversion_id] = row.value_micros
    return (
        {label: (len(values), sum(values.values())) for label, values in conversions.items()},
        (len(overall), sum(overall.values())),
    )


def _total(items: Iterable[Sequence[int]]) -> tuple[int, int]:
    counts = [tuple(item) for item in items]
    return sum(count for count, _ in counts), sum(micros for _, micros in counts)


def cost_per_acquisition(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute spend, attributed conversions and revenue, CPA and ROI per group and overall."""
    group_by = _check_filter(flt)
    days = attribution_days(options or {})
    spend = _spend_by_group(engine, flt, group_by)
    grouped = dataclasses.replace(flt, group_by=group_by)
    conversions, overall = _conversions(engine, grouped, days)
    result: dict[str, Any] = {
        "metric": "cpa",
        "filters": flt.describe(),
        "attribution_days": days,
        "group_by": group_by.label,
        **currency_of(engine),
        **_figures(sum(spend.values()), overall),
    }
    result["groups"] = [
        {"group": key, **_figures(spend.get(key, 0), conversions.get(key, (0, 0)))}
        for key in sorted(set(spend) | set(conversions))
    ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    names = ("spend", "conversions", "revenue", "cpa", "roi")
    sections = [("(all)", result)] + [(group["group"], group) for group in result["groups"]]
    return [
        {
            "group": group,
            **{name: section[name] for name in names},
            "currency": result.get("currency"),
        }
        for group, section in sections
    ]


CPA = register(
    MetricSpec(
        name="cpa",
        summary="Cost per acquisition and return on investment",
        description=(
            "Advertising spend (recorded by day, channel and campaign through "
            "`POST /business/spend`, the CSV upload or `chatmw spend import`) against the "
            "conversions attributed to conversations that started in the window.\n\n"
            "- **CPA** = spend / conversions, a decimal string in `currency` rounded half-to-even "
            "to 2 places; `null` when there are no conversions.\n"
            "- **ROI** = (attributed revenue - spend) / spend, a ratio rounded to 4 places "
            "(0.5 = 50 % return); `null` when spend is 0.\n\n"
            "A spend day counts when its midnight in `tz` falls in the window. Groups are "
            "campaigns by default (`group_by=campaign`): a conversion counts for the campaign of "
            "its conversation's touch (`touch`, last by default), spend for the campaign it was "
            "recorded with; spend without a campaign and conversations without a campaign touch "
            "form the group `(none)`. `group_by=channel` splits by channel instead. A conversion "
            "attributed to conversations of two campaigns counts for both, but once overall. "
            "Filters: `channel` and `campaign` apply to both spend and conversations; attribute "
            "filters and the other touch filters are rejected because spend has no such fields."
            + ROLLUP_NOTE
        ),
        compute=cost_per_acquisition,
        params=(ATTRIBUTION_PARAM,),
        rows=_rows,
    )
)
