"""Customer lifetime value of customers acquired through chat: historical and predicted."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import Engine

from chatmw.events import to_ms
from chatmw.events_business import MICROS, format_micros
from chatmw.metrics.business_query import serves_days, serves_filter
from chatmw.metrics.conversion import (
    ATTRIBUTION_PARAM,
    ROLLUP_NOTE,
    ResolvedConversion,
    attributed_conversions,
    attribution_days,
    currency_of,
    load_conversions,
)
from chatmw.metrics.customer_query import CustomerSums, rolled_customers
from chatmw.metrics.filters import FilterError, MetricFilter, parse_datetime
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import group_label

__all__ = ["lifetime_value", "LTV", "DEFAULT_LIFESPAN_YEARS"]

# A planning assumption, not a measurement: replace it with 1 / your annual churn rate.
DEFAULT_LIFESPAN_YEARS = 3.0
YEAR_MS = 365.25 * 86_400_000
# Each customer is observed for at least a day, so a conversion just before ``as_of``
# cannot make the purchase frequency arbitrarily large.
MIN_OBSERVED_MS = 86_400_000


def _orders(
    conversions: Sequence[ResolvedConversion], customers: set[int], end_ms: int
) -> dict[int, list[tuple[int, int]]]:
    """Return each customer's conversions before ``end_ms`` as ``(time ms, value micros)``."""
    orders: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for conversion in conversions:
        contact_id = conversion.contact_id
        if contact_id in customers and conversion.occurred_at_ms < end_ms:
            orders[contact_id].append((conversion.occurred_at_ms, conversion.value_micros))
    return orders


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def _figures(
    customers: set[int], orders: Mapping[int, list[tuple[int, int]]], end_ms: int, lifespan: float
) -> dict[str, Any]:
    placed = [order for customer in customers for order in orders.get(customer, [])]
    observed_ms = sum(
        max(end_ms - min(at for at, _ in orders[c]), MIN_OBSERVED_MS)
        for c in customers
        if orders.get(c)
    )
    sums = CustomerSums(len(customers), len(placed), sum(m for _, m in placed), observed_ms)
    return _section(sums, lifespan)


def _section(sums: CustomerSums, lifespan: float) -> dict[str, Any]:
    """Return the figures of one group from its summed customers and orders."""
    revenue, placed, customers = sums.revenue, sums.orders, sums.customers
    customer_years = sums.observed_ms / YEAR_MS
    average_order = Decimal(revenue) / MICROS / placed if placed else None
    frequency = placed / customer_years if customer_years else None
    predicted = None
    if average_order is not None and frequency is not None:
        predicted = _money(average_order * Decimal(repr(frequency)) * Decimal(repr(lifespan)))
    return {
        "customers": customers,
        "orders": placed,
        "revenue": format_micros(revenue),
        "historical_value_per_customer": (
            _money(Decimal(revenue) / MICROS / customers) if customers else None
        ),
        "average_order_value": None if average_order is None else _money(average_order),
        "observed_customer_years": round(customer_years, 4),
        "purchase_frequency_per_year": None if frequency is None else round(frequency, 4),
        "lifespan_years": lifespan,
        "predicted_value": predicted,
    }


def _raw_sections(
    engine: Engine, flt: MetricFilter, days: float, end_ms: int, lifespan: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    conversions = load_conversions(engine)
    customers_by_group: dict[Any, set[int]] = defaultdict(set)
    for row in attributed_conversions(engine, flt, days, conversions):
        if row.contact_id is not None:
            customers_by_group[row.group_key].add(row.contact_id)
    customers = set().union(*customers_by_group.values()) if customers_by_group else set()
    orders = _orders(conversions, customers, end_ms)
    groups = [
        {"group": group_label(key), **_figures(members, orders, end_ms, lifespan)}
        for key, members in sorted(
            customers_by_group.items(), key=lambda item: group_label(item[0])
        )
    ]
    return _figures(customers, orders, end_ms, lifespan), groups


def _sections(
    engine: Engine, flt: MetricFilter, days: float, end_ms: int, lifespan: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return the overall figures and the figures per group, from rollups where they apply."""
    if serves_days(days) and serves_filter(flt):
        rolled = rolled_customers(engine, flt, end_ms, MIN_OBSERVED_MS)
        if rolled is not None:
            groups, overall = rolled
            return _section(overall, lifespan), [
                {"group": group_label(key), **_section(sums, lifespan)}
                for key, sums in sorted(groups.items(), key=lambda item: group_label(item[0]))
            ]
    return _raw_sections(engine, flt, days, end_ms, lifespan)


def lifetime_value(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute historical and predicted lifetime value of the customers ``flt`` acquired."""
    options = options or {}
    days = attribution_days(options)
    lifespan = options.get("lifespan_years")
    lifespan = DEFAULT_LIFESPAN_YEARS if lifespan is None else lifespan
    if not 0 < lifespan <= 100:
        raise FilterError("lifespan_years", f"must be above 0 and at most 100, got {lifespan:g}")
    as_of = options.get("as_of")
    end = datetime.now(UTC) if not as_of else parse_datetime("as_of", as_of, flt.tz)
    end_ms = to_ms(end)

    overall, groups = _sections(engine, flt, days, end_ms, float(lifespan))
    result: dict[str, Any] = {
        "metric": "ltv",
        "filters": flt.describe(),
        "attribution_days": days,
        "as_of": end.isoformat(),
        **currency_of(engine),
        **overall,
    }
    if flt.group_by is not None:
        result["groups"] = groups
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    names = (
        "customers",
        "orders",
        "revenue",
        "historical_value_per_customer",
        "average_order_value",
        "observed_customer_years",
        "purchase_frequency_per_year",
        "lifespan_years",
        "predicted_value",
    )
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    return [
        {
            "group": group,
            **{name: section[name] for name in names},
            "currency": result.get("currency"),
        }
        for group, section in sections
    ]


LTV = register(
    MetricSpec(
        name="ltv",
        summary="Customer lifetime value: historical and predicted",
        description=(
            "**Customers** are users with at least one conversion attributed (as in the "
            "`conversion` metric, `attribution_days`) to a conversation that started in the "
            "window. **Orders** are all their conversions before `as_of` (default: now), including "
            "those not attributed to a chat and those after the window.\n\n"
            "- `historical_value_per_customer` = revenue of those orders / customers.\n"
            "- `average_order_value` = revenue / orders.\n"
            "- `purchase_frequency_per_year` = orders / `observed_customer_years`; each customer "
            "is observed from their first order to `as_of`, at least one day.\n"
            "- `predicted_value` = average_order_value x purchase_frequency_per_year x "
            "`lifespan_years` (parameter, default 3: a planning assumption; use 1 / your annual "
            "churn rate).\n\n"
            "Amounts are decimal strings in `currency`, rounded half-to-even to 2 places; "
            "`revenue` is exact. With no customers the per-customer figures are `null` and "
            "`customers` is 0; a customer whose orders all come after `as_of` counts with none. "
            "With `group_by`, a customer counts in each group of a conversation their conversions "
            "are attributed to." + ROLLUP_NOTE
        ),
        compute=lifetime_value,
        params=(
            ATTRIBUTION_PARAM,
            Param(
                "lifespan_years",
                "Expected customer lifespan in years for the predicted value "
                f"(default {DEFAULT_LIFESPAN_YEARS:g}).",
                default=DEFAULT_LIFESPAN_YEARS,
                kind=float,
            ),
            Param(
                "as_of",
                "End of the order history, ISO-8601 (default: now); a value without "
                "offset is read in `tz`.",
            ),
        ),
        rows=_rows,
    )
)
