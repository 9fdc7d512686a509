"""Conversion, attribution, CPA/ROI and lifetime value against figures computed from the records."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from business_support import DAY, T0, World, money, rate, world_engine
from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.api import compute_metric
from chatmw.events_business import Conversion
from chatmw.metrics import REGISTRY, FilterError
from chatmw.store.writer import Writer

SINCE, UNTIL = T0 + 5 * DAY, T0 + 15 * DAY
WINDOW = {"since": [SINCE.isoformat()], "until": [UNTIL.isoformat()]}
EMPTY = {"since": ["2023-01-01"], "until": ["2023-02-01"]}


def run(engine: Engine, name: str, params: dict[str, list[str]]) -> dict[str, Any]:
    return compute_metric(engine, REGISTRY[name], params)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    yield from world_engine(request.param, str(tmp_path_factory.mktemp("world")))


@pytest.fixture
def world(stored: tuple[Engine, World]) -> World:
    return stored[1]


@pytest.fixture
def store(stored: tuple[Engine, World]) -> Engine:
    return stored[0]


def expected_conversion(world: World, convs: list, days: float = 7) -> dict[str, Any]:
    ids = {c.id for c in convs}
    attributed = world.attributed(days)
    keys = {key for key, targets in attributed.items() if targets & ids}
    converted = {cid for targets in attributed.values() for cid in targets if cid in ids}
    micros = {c.key: c.micros for c in world.conversions}
    return {
        "conversations": len(convs),
        "converted_conversations": len(converted),
        "conversion_rate": rate(len(converted), len(convs)),
        "conversions": len(keys),
        "revenue": money(sum(micros[key] for key in keys)),
    }


def pick(result: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {name: result[name] for name in names}


FIGURES = ["conversations", "converted_conversations", "conversion_rate", "conversions", "revenue"]


def test_conversion_matches_records(store: Engine, world: World) -> None:
    result = run(store, "conversion", WINDOW)
    expected = expected_conversion(world, world.in_window(SINCE, UNTIL))
    assert pick(result, FIGURES) == expected
    assert result["currency"] == "EUR"
    assert expected["conversions"] > 3
    assert 0 < expected["conversion_rate"] < 1


def test_conversion_by_channel(store: Engine, world: World) -> None:
    result = run(store, "conversion", {**WINDOW, "group_by": ["channel"]})
    groups = {group["group"]: pick(group, FIGURES) for group in result["groups"]}
    for channel in ("web", "messenger"):
        assert groups[channel] == expected_conversion(world, world.in_window(SINCE, UNTIL, channel))


@pytest.mark.parametrize("days", ["0.5", "7", "10"])
def test_conversion_attribution_window(store: Engine, world: World, days: str) -> None:
    result = run(store, "conversion", {"attribution_days": [days]})
    expected = expected_conversion(world, world.in_window(None, None), float(days))
    assert pick(result, FIGURES) == expected


def test_conversion_empty_window(store: Engine, world: World) -> None:
    result = run(store, "conversion", EMPTY)
    assert result["conversations"] == 0
    assert result["conversion_rate"] is None
    assert result["conversions"] == 0
    assert result["revenue"] == "0.00"


def test_conversion_rejects_bad_window(store: Engine) -> None:
    with pytest.raises(FilterError) as caught:
        run(store, "conversion", {"attribution_days": ["-1"]})
    assert caught.value.param == "attribution_days"


def test_conversion_before_chat_attributed(engine: Engine) -> None:
    writer = Writer(engine)
    from chatmw.business import install

    install(writer)
    writer.write(
        [
            Conversion(
                channel="web",
                occurred_at=T0 + DAY,
                key="early",
                name="purchase",
                value_micros=9_990_000,
                currency="EUR",
                user_id="late-user",
            )
        ]
    )
    writer.write(
        [
            ev.Message(
                channel="web", occurred_at=T0, key="m1", role="user", user_id="late-user", text="hi"
            )
        ]
    )
    result = run(engine, "conversion", {})
    assert result["converted_conversations"] == 1
    assert result["revenue"] == "9.99"


def expected_attribution(world: World, mode: str, field: str) -> dict[str, dict[str, Any]]:
    convs = world.in_window(SINCE, UNTIL)
    attributed = world.attributed()
    micros = {c.key: c.micros for c in world.conversions}
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"conversations": 0, "users": set(), "keys": set()}
    )
    for conv in convs:
        touch = world.first_touch(conv) if mode == "first_touch" else world.last_touch(conv)
        value = None if touch is None else touch[field]
        label = "(none)" if value is None else value
        rows[label]["conversations"] += 1
        if world.contact(conv) is not None:
            rows[label]["users"].add(world.contact(conv))
        rows[label]["keys"].update(key for key, targets in attributed.items() if conv.id in targets)
    return {
        label: {
            "conversations": row["conversations"],
            "users": len(row["users"]),
            "conversions": len(row["keys"]),
            "revenue": money(sum(micros[key] for key in row["keys"])),
        }
        for label, row in rows.items()
    }


def test_attribution_first_and_last_touch(store: Engine, world: World) -> None:
    result = run(store, "attribution", WINDOW)
    for mode in ("first_touch", "last_touch"):
        for field in ("source", "medium", "campaign", "ad"):
            actual = {
                row["value"]: {
                    k: row[k] for k in ("conversations", "users", "conversions", "revenue")
                }
                for row in result[mode][field]
            }
            assert actual == expected_attribution(world, mode, field), (mode, field)
    firsts = {row["value"] for row in result["first_touch"]["medium"]}
    lasts = {row["value"] for row in result["last_touch"]["medium"]}
    assert "social" in lasts
    assert "social" not in firsts


def test_attribution_totals_and_order(store: Engine, world: World) -> None:
    result = run(store, "attribution", WINDOW)
    expected = expected_conversion(world, world.in_window(SINCE, UNTIL))
    assert result["totals"]["conversations"] == expected["conversations"]
    assert result["totals"]["conversions"] == expected["conversions"]
    assert result["totals"]["revenue"] == expected["revenue"]
    counts = [row["conversations"] for row in result["last_touch"]["source"]]
    assert counts == sorted(counts, reverse=True)


def test_attribution_rejects_group_by(store: Engine) -> None:
    with pytest.raises(FilterError) as caught:
        run(store, "attribution", {"group_by": ["channel"]})
    assert caught.value.param == "group_by"


def expected_cpa(world: World, since: datetime, until: datetime) -> dict[str, dict[str, Any]]:
    spend: dict[str, int] = defaultdict(int)
    for day, _, campaign, micros in world.spend:
        midnight = datetime(day.year, day.month, day.day, tzinfo=since.tzinfo)
        if since <= midnight < until:
            spend[campaign or "(none)"] += micros
    convs = {c.id: c for c in world.in_window(since, until)}
    attributed = world.attributed()
    micros = {c.key: c.micros for c in world.conversions}
    keys: dict[str, set[str]] = defaultdict(set)
    overall: set[str] = set()
    for key, targets in attributed.items():
        for conv_id in targets & set(convs):
            touch = world.last_touch(convs[conv_id])
            campaign = None if touch is None else touch["campaign"]
            keys[campaign or "(none)"].add(key)
            overall.add(key)

    def figures(spent: int, conversion_keys: set[str]) -> dict[str, Any]:
        revenue = sum(micros[key] for key in conversion_keys)
        cpa = None
        if conversion_keys:
            cpa = str(
                (Decimal(spent) / 1_000_000 / len(conversion_keys)).quantize(
                    Decimal("0.01"), rounding=ROUND_HALF_EVEN
                )
            )
        return {
            "spend": money(spent),
            "conversions": len(conversion_keys),
            "revenue": money(revenue),
            "cpa": cpa,
            "roi": None if spent == 0 else round((revenue - spent) / spent, 4),
        }

    result = {
        name: figures(spend.get(name, 0), keys.get(name, set())) for name in set(spend) | set(keys)
    }
    result["(all)"] = figures(sum(spend.values()), overall)
    return result


def test_cpa_per_campaign_and_overall(store: Engine, world: World) -> None:
    result = run(store, "cpa", WINDOW)
    expected = expected_cpa(world, SINCE, UNTIL)
    names = ["spend", "conversions", "revenue", "cpa", "roi"]
    assert pick(result, names) == expected.pop("(all)")
    assert {group["group"]: pick(group, names) for group in result["groups"]} == expected
    assert {"spring", "summer", "(none)"} <= set(expected)


def test_cpa_days_in_local_time(store: Engine, world: World) -> None:
    paris = ZoneInfo("Europe/Paris")
    since = datetime(2024, 3, 5, tzinfo=paris)
    until = datetime(2024, 3, 9, 12, tzinfo=paris)
    params = {"since": ["2024-03-05"], "until": ["2024-03-09T12:00"], "tz": ["Europe/Paris"]}
    result = run(store, "cpa", params)
    expected = expected_cpa(world, since, until)
    names = ["spend", "conversions", "revenue", "cpa", "roi"]
    assert pick(result, names) == expected.pop("(all)")
    assert {group["group"]: pick(group, names) for group in result["groups"]} == expected


def test_cpa_by_channel(store: Engine, world: World) -> None:
    result = run(store, "cpa", {**WINDOW, "group_by": ["channel"], "channel": ["messenger"]})
    spent = sum(
        micros
        for day, channel, _, micros in world.spend
        if channel == "messenger" and SINCE.date() <= day < UNTIL.date()
    )
    assert result["spend"] == money(spent)
    assert [group["group"] for group in result["groups"]] == ["messenger"]
    assert result["groups"][0]["spend"] == money(spent)


def test_cpa_empty_window(store: Engine, world: World) -> None:
    result = run(store, "cpa", EMPTY)
    assert result["spend"] == "0.00"
    assert result["conversions"] == 0
    assert result["cpa"] is None
    assert result["roi"] is None
    assert result["groups"] == []


def test_cpa_rejects_attribute_filter(store: Engine) -> None:
    with pytest.raises(FilterError) as caught:
        run(store, "cpa", {"attr.plan": ["gold"]})
    assert caught.value.param == "attr.plan"
    with pytest.raises(FilterError) as caught:
        run(store, "cpa", {"source": ["google"]})
    assert caught.value.param == "source"


def expected_ltv(world: World, as_of: datetime, lifespan: float) -> dict[str, Any]:
    ids = {c.id for c in world.in_window(SINCE, UNTIL)}
    attributed = world.attributed()
    customers = set()
    for conversion in world.conversions:
        owner = world.conversion_owner(conversion)
        if owner is not None and attributed.get(conversion.key, set()) & ids:
            customers.add(owner)
    orders = [
        c for c in world.conversions if world.conversion_owner(c) in customers and c.at < as_of
    ]
    revenue = sum(order.micros for order in orders)
    observed = timedelta(0)
    for customer in customers:
        times = [order.at for order in orders if world.conversion_owner(order) == customer]
        if times:
            observed += max(as_of - min(times), DAY)
    years = observed / timedelta(days=365.25)
    average = Decimal(revenue) / 1_000_000 / len(orders)
    frequency = len(orders) / years
    return {
        "customers": len(customers),
        "orders": len(orders),
        "revenue": money(revenue),
        "historical_value_per_customer": str(
            (Decimal(revenue) / 1_000_000 / len(customers)).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_EVEN
            )
        ),
        "average_order_value": str(average.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)),
        "purchase_frequency_per_year": round(frequency, 4),
        "predicted": average * Decimal(frequency) * Decimal(lifespan),
    }


def test_ltv_matches_records(store: Engine, world: World) -> None:
    as_of = T0 + 40 * DAY
    result = run(store, "ltv", {**WINDOW, "as_of": [as_of.isoformat()], "lifespan_years": ["2.5"]})
    expected = expected_ltv(world, as_of, 2.5)
    predicted = expected.pop("predicted")
    assert pick(result, list(expected)) == expected
    assert abs(Decimal(result["predicted_value"]) - predicted) <= Decimal("0.01")
    assert result["lifespan_years"] == 2.5
    assert expected["orders"] > expected["customers"] > 2


def test_ltv_empty_window(store: Engine, world: World) -> None:
    result = run(store, "ltv", EMPTY)
    assert result["customers"] == 0
    assert result["historical_value_per_customer"] is None
    assert result["predicted_value"] is None


def test_ltv_rejects_lifespan(store: Engine) -> None:
    with pytest.raises(FilterError) as caught:
        run(store, "ltv", {"lifespan_years": ["0"]})
    assert caught.value.param == "lifespan_years"
