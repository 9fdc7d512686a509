"""The conversion, cpa, ltv and leads metrics from rollups equal the metrics from raw rows.

Random stores get conversions naming a conversation or only a user (some exactly
``attribution_days`` after a start, some recorded before the chat), duplicate conversion
keys, leads found in messages and recorded through the API (naming a conversation or
not), touches with campaigns and sources, late first messages that move starts, and new
conversations that change which conversation a lead counts for. Each check runs before
the first refresh, after it, after new events that are not refreshed yet, and after the
next refresh, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from rollup_helpers import (
    RandomStore,
    assert_later_steps_match_raw,
    edge_time,
    hold_back_first,
    number_on_channel,
    table_rows,
)
from sqlalchemy import Engine, func, select

from chatmw import events as ev
from chatmw.events_business import Conversion, Lead, Spend
from chatmw.metrics import REGISTRY
from chatmw.metrics.business_query import rolled_conversions
from chatmw.metrics.customer_query import rolled_customers
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.lead_query import rolled_leads
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import (
    SLOT_MS,
    RollupConversionLinks,
    RollupLeadLinks,
    RollupOrders,
)

T0 = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)
DAYS = 6
CAMPAIGNS = ("spring", "summer", None)
SOURCES = ("google", "facebook", None)
TABLES = (RollupConversionLinks, RollupLeadLinks, RollupOrders)


class Store(RandomStore):
    """A random chat history with conversions, leads and touches, written in steps."""

    def conversation(self, number: int, start: datetime, user: str | None = None) -> list[Any]:
        rng = self.rng
        channel, user, conversation_id = self.start_conversation(number, start, user, 12)
        events: list[Any] = []
        at = start
        for step in range(rng.randint(1, 4)):
            role = "user" if step % 2 == 0 else "bot"
            if step == 0 and rng.random() < 0.1:
                role = "bot"  # a conversation that the bot opens, maybe with no user message
            text = "hello"
            if role == "user" and rng.random() < 0.25:
                text = f"mail me at {user}.{channel}@example.com"
            events.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"{conversation_id}-{step}",
                    role=role,
                    user_id=user,
                    text=text,
                    conversation_id=conversation_id,
                )
            )
            at += timedelta(milliseconds=rng.choice([1, 1000, 60_000, SLOT_MS, 7_200_000]))
        for index in range(rng.choice((0, 0, 1, 2))):
            events.append(
                ev.Touch(
                    channel=channel,
                    occurred_at=start - timedelta(minutes=5 - index),
                    key=f"{conversation_id}-t{index}",
                    user_id=user,
                    conversation_id=conversation_id,
                    campaign=rng.choice(CAMPAIGNS),
                    source=rng.choice(SOURCES),
                )
            )
        return events

    def api_lead(self, number: int, named: bool) -> Lead:
        channel, user, start = self.starts[f"c{number}"]
        return Lead(
            channel=channel,
            occurred_at=start + timedelta(minutes=self.rng.choice((0, 20, 600, 3000))),
            key=f"lead-{number}-{named}",
            user_id=user,
            kind="phone",
            value=f"+3361234{number:04d}",
            conversation_id=f"c{number}" if named else None,
            score=self.rng.choice((None, 40.0, 90.0)),
        )

    def first_events(self) -> None:
        rng = self.rng
        written: list[Any] = []
        for number in range(90):
            events = self.conversation(number, edge_time(rng, T0, DAYS))
            written.extend(hold_back_first(events, self.held_back, number % 6 == 0))
        rng.shuffle(written)
        messages = [e for e in written if isinstance(e, ev.Message)]
        self.written = messages
        self.writer.write(messages)
        self.writer.write([e for e in written if isinstance(e, ev.Touch)])
        business: list[Any] = []
        for number in range(90):
            business.extend(self.conversions(number))
            if rng.random() < 0.3:
                business.append(self.api_lead(number, named=rng.random() < 0.5))
        # A duplicate key counts once; a conversion of a user who chats only later, and one
        # naming a conversation that is stored only later.
        business.append(business[0])
        business.append(self._ghost_conversion("ghost", None, T0 + timedelta(days=3)))
        business.append(self._ghost_conversion(None, "c500", T0 + timedelta(days=2)))
        self.writer.write(business)
        self.writer.write(
            [
                Spend.for_day((T0 + timedelta(days=d)).date(), channel, Decimal(40 + d), "EUR", c)
                for d in range(DAYS)
                for channel, c in (("web", "spring"), ("web", ""), ("whatsapp", "summer"))
            ]
        )

    def _ghost_conversion(self, user: str | None, conversation: str | None, at: datetime) -> Any:
        return Conversion(
            channel="web",
            occurred_at=at,
            key=f"ghost-{user}-{conversation}",
            name="purchase",
            value_micros=9_990_000,
            currency="EUR",
            user_id=user,
            conversation_id=conversation,
        )

    def later_events(self) -> None:
        """Write late first messages, duplicates and new conversations of known users."""
        rng = self.rng
        events: list[Any] = list(self.held_back)
        known = [(channel, user) for channel, user, _ in self.starts.values()]
        for number in range(300, 315):
            channel, user = rng.choice(known)
            number = number_on_channel(number, channel)
            events.extend(
                e
                for e in self.conversation(number, edge_time(rng, T0, DAYS), user)
                if isinstance(e, ev.Message)
            )
        events.extend(
            e
            for e in self.conversation(501, T0 + timedelta(days=2, hours=-3), "ghost")
            if isinstance(e, ev.Message)
        )
        events.extend(
            e
            for e in self.conversation(500, T0 + timedelta(days=1, hours=5))
            if isinstance(e, ev.Message)
        )
        # Exact copies of stored messages: the writer stores each key once.
        duplicates = self.written[::7]
        self.writer.write(events + duplicates)


def _window(flt_kwargs: dict[str, Any]) -> list[MetricFilter]:
    windows = [
        (T0, T0 + timedelta(days=DAYS)),
        (T0 + timedelta(hours=10, minutes=7, seconds=13), T0 + timedelta(days=3, hours=5)),
        (T0 + timedelta(minutes=3), T0 + timedelta(minutes=11)),
    ]
    return [MetricFilter(since=since, until=until, **flt_kwargs) for since, until in windows]


def _cases() -> list[tuple[str, MetricFilter, dict[str, Any]]]:
    cases: list[tuple[str, MetricFilter, dict[str, Any]]] = []
    for flt in _window({}) + _window({"group_by": GroupBy("channel")}):
        cases.append(("conversion", flt, {}))
        cases.append(("cpa", flt, {}))
        cases.append(("ltv", flt, {"as_of": (T0 + timedelta(days=30)).isoformat()}))
        cases.append(("leads", flt, {}))
    since, until = T0, T0 + timedelta(days=DAYS)
    channels = MetricFilter(since=since, until=until, channels=("web", "messenger"))
    first = MetricFilter(since=since, until=until, touch="first")
    cases += [
        ("conversion", channels, {}),
        ("conversion", channels, {"attribution_days": 3.0}),
        ("cpa", channels, {}),
        ("cpa", first, {}),
        ("cpa", MetricFilter(since=since, until=until, touch_filters={"campaign": "spring"}), {}),
        (
            "cpa",
            MetricFilter(since=since, until=until, group_by=GroupBy("campaign"), touch="first"),
            {},
        ),
        ("ltv", channels, {"as_of": (T0 + timedelta(days=4)).isoformat()}),
        ("ltv", first, {"attribution_days": 10.0, "as_of": (T0 + timedelta(days=9)).isoformat()}),
        ("leads", channels, {}),
        ("leads", first, {}),
        ("leads", MetricFilter(since=since, until=until, group_by=GroupBy("source")), {}),
    ]
    return cases


def assert_same_as_raw(engine: Engine) -> None:
    for name, flt, options in _cases():
        compute = REGISTRY[name].compute
        with raw_only():
            expected = compute(engine, flt, options)
        assert compute(engine, flt, options) == expected, (name, flt.describe(), options)


def _table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(engine, TABLES)


def _served(engine: Engine) -> None:
    """Assert that the rollup paths serve the query, so the comparisons compare two paths."""
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS))
    sums = rolled_conversions(engine, flt)
    assert sums is not None
    assert sum(count for count, _ in sums.overall.values()) > 10
    customers = rolled_customers(engine, flt, ev.to_ms(T0 + timedelta(days=30)), 86_400_000)
    assert customers is not None
    assert customers[1].customers > 3
    leads = rolled_leads(engine, flt)
    assert leads is not None
    assert leads["all"][None].leads > 5


def test_business_rollups_match_raw(engine: Engine) -> None:
    store = Store(engine, seed=11)
    store.first_events()
    assert_same_as_raw(engine)

    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        for table in TABLES:
            count = connection.execute(select(func.count()).select_from(table)).scalar_one()
            assert count > 5, table.__tablename__
    _served(engine)
    assert_same_as_raw(engine)

    assert_later_steps_match_raw(engine, store.later_events, assert_same_as_raw, _table_rows)


@pytest.mark.parametrize("seed", [1, 2])
def test_business_rollups_random_stores(engine: Engine, seed: int) -> None:
    store = Store(engine, seed=seed)
    store.first_events()
    refresh(engine)
    assert_later_steps_match_raw(engine, store.later_events, assert_same_as_raw, _table_rows)


def _refreshed_store(engine: Engine) -> Store:
    store = Store(engine, seed=4)
    store.first_events()
    assert refresh(engine).rebuilt
    return store


def _assert_metric_same(engine: Engine, name: str, options: dict[str, Any]) -> None:
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS))
    with raw_only():
        expected = REGISTRY[name].compute(engine, flt, options)
    assert REGISTRY[name].compute(engine, flt, options) == expected


def test_conversion_recorded_after_refresh(engine: Engine) -> None:
    store = _refreshed_store(engine)
    start = store.starts["c3"][2]
    late = store.conversion(3, start + timedelta(hours=2), "late-conversion", 42_000_000)
    store.writer.write([late])
    refresh(engine)
    _assert_metric_same(engine, "conversion", {})


def test_lead_recorded_after_refresh(engine: Engine) -> None:
    store = _refreshed_store(engine)
    store.writer.write([dataclasses.replace(store.api_lead(5, named=True), key="late-lead")])
    refresh(engine)
    _assert_metric_same(engine, "leads", {})


def test_touch_recorded_after_refresh(engine: Engine) -> None:
    store = _refreshed_store(engine)
    # A conversation with an attributed conversion, so that its campaign shows in cpa.
    with engine.connect() as connection:
        converted = connection.execute(
            select(Conversation.external_id)
            .join(RollupConversionLinks, RollupConversionLinks.conversation_id == Conversation.id)
            .limit(1)
        ).scalar_one()
    channel, user, start = store.starts[converted]
    touch = ev.Touch(
        channel=channel,
        occurred_at=start + timedelta(seconds=1),
        key="late-touch",
        user_id=user,
        conversation_id=converted,
        campaign="autumn",
    )
    store.writer.write([touch])
    refresh(engine)
    _assert_metric_same(engine, "cpa", {})
