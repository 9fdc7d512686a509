"""The channels metric from rollups equals the channels metric from raw rows.

Random stores get conversations on three channels by a few returning contacts. They have
user, bot and agent messages (some of them reactions, which are not counted), sentiment
scores, conversions naming a conversation or a user, and surveys in every state.
Conversations without a user message have no contact. Later steps write late first
messages that move starts, duplicate messages, new conversations and conversions, and
survey answers logged without a message. Each check runs before the first refresh,
after it, with those events not refreshed yet, and after the next refresh, on SQLite and
PostgreSQL. Percentiles of response times are estimates from histograms
(docs/rollups.md), and sentiment means can differ by one unit in the 4th decimal at a
rounding boundary. Every other figure must be equal.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rollup_helpers import (
    CHANNELS,
    RandomStore,
    coverage_of,
    edge_time,
    hold_back_first,
    number_on_channel,
)
from rollup_helpers import assert_close as assert_percentiles_close
from sqlalchemy import Engine, func, insert, select, update
from surveys_support import add_random_surveys

from chatmw import events as ev
from chatmw.events_business import Conversion
from chatmw.metrics.channels import channel_performance
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.sentiment import sentiment_enricher
from chatmw.store.changes import record_changes
from chatmw.store.models_rollups import RollupConversations, RollupEngaged, RollupStarters
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 29, 0, 0, tzinfo=UTC)  # Europe/Paris moves to summer time on 31 March
DAYS = 5
TEXTS = (
    "thanks, that is great",
    "this is terrible, I am very angry",
    "where is my order",
    "awesome, love it",
    "ok",
    "the delivery was late and the box was broken",
)
# Sentiment means are rounded to 4 decimals, so a float sum may round the other way.
SENTIMENT_TOLERANCE = 0.0001 + 1e-9
OFFSETS = (timedelta(0), timedelta(hours=1), timedelta(days=7), timedelta(days=8))


class Store(RandomStore):
    """A random chat history with conversions and surveys, written in steps."""

    def __init__(self, engine: Engine, seed: int) -> None:
        super().__init__(engine, seed, enrichers=[sentiment_enricher])

    def conversation(
        self, number: int, start: datetime, user: str | None = None, bot_only: bool = False
    ) -> list[Any]:
        rng = self.rng
        channel, user, conversation_id = self.start_conversation(number, start, user, 10)
        messages = []
        at = start
        for step in range(rng.randint(1, 6)):
            role = "user" if step % 2 == 0 or rng.random() < 0.3 else rng.choice(("bot", "agent"))
            if bot_only or (step == 0 and rng.random() < 0.1):
                role = "bot"  # a conversation that the bot opens
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"{conversation_id}-{step}",
                    role=role,
                    kind="reaction" if step and rng.random() < 0.08 else "message",
                    user_id=user,
                    text=rng.choice(TEXTS),
                    conversation_id=conversation_id,
                )
            )
            at += timedelta(milliseconds=rng.choice([1, 900, 45_000, 900_000, 7_200_000]))
        return messages

    def conversions(self, number: int) -> list[Conversion]:
        """Return 0 to 2 conversions of ``c{number}``, half of them naming only the user."""
        return self.random_conversions(number, OFFSETS, by_user_share=0.5)

    def first_events(self) -> None:
        rng = self.rng
        written: list[ev.Message] = []
        for number in range(120):
            messages = self.conversation(number, edge_time(rng, T0, DAYS))
            written.extend(hold_back_first(messages, self.held_back, number % 6 == 0))
        # Conversations without a user message have no contact.
        for number in range(900, 903):
            written.extend(self.conversation(number, edge_time(rng, T0, DAYS), bot_only=True))
        rng.shuffle(written)
        self.written = written
        self.writer.write(written)
        conversions: list[Conversion] = []
        for number in range(120):
            conversions.extend(self.conversions(number))
        self.writer.write(conversions)
        add_random_surveys(self.engine, rng)

    def later_events(self) -> None:
        """Write late first messages, new conversations, conversions and duplicates."""
        rng = self.rng
        events: list[Any] = list(self.held_back)
        known = [(channel, user) for channel, user, _ in self.starts.values()]
        for number in range(300, 320):
            channel, user = rng.choice(known)
            number = number_on_channel(number, channel)
            events.extend(self.conversation(number, edge_time(rng, T0, DAYS), user))
        # Exact copies of stored messages: the writer stores each key once.
        events.extend(self.written[::7])
        self.writer.write(events)
        self.writer.write([item for number in range(300, 322) for item in self._maybe(number)])

    def _maybe(self, number: int) -> list[Conversion]:
        return self.conversions(number) if f"c{number}" in self.starts else []

    def answer_surveys(self) -> None:
        """Answer the unanswered CSAT surveys of some conversations, logged without a message."""
        with self.engine.begin() as connection:
            changed = (
                connection.execute(
                    select(Survey.conversation_id)
                    .where(Survey.kind == "csat", Survey.score.is_(None))
                    .order_by(Survey.conversation_id)
                )
                .scalars()
                .all()[::2]
            )
            connection.execute(
                update(Survey)
                .where(Survey.conversation_id.in_(changed), Survey.kind == "csat")
                .values(score=5, sent_at_ms=func.coalesce(Survey.sent_at_ms, 1))
            )
            record_changes(connection, conversations=[(cid, None) for cid in changed])
        assert changed


def assert_close(actual: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """Assert equal results, except estimated percentiles and rounded sentiment means."""
    assert len(actual["channels"]) == len(expected["channels"]), path
    for rolled, raw in zip(actual["channels"], expected["channels"], strict=True):
        found, value = rolled["sentiment_mean"], raw["sentiment_mean"]
        assert (found is None) == (value is None), f"{path} {raw['channel']}"
        if value is not None:
            assert abs(found - value) <= SENTIMENT_TOLERANCE, f"{path} {raw['channel']}"
    # The other figures, percentiles within the histogram's bound.
    assert_percentiles_close(_without_sentiment(actual), _without_sentiment(expected), path)


def _without_sentiment(result: dict[str, Any]) -> dict[str, Any]:
    rows = [{**row, "sentiment_mean": None} for row in result["channels"]]
    return {**result, "channels": rows}


def _filters() -> list[MetricFilter]:
    end = T0 + timedelta(days=DAYS)
    ragged = (T0 + timedelta(hours=7, minutes=3, seconds=13), T0 + timedelta(days=3, minutes=44))
    day = T0 + timedelta(days=1)
    return [
        MetricFilter(since=T0, until=end),
        MetricFilter(since=T0, until=end, tz=ZoneInfo("Europe/Paris")),
        MetricFilter(since=T0, until=end, group_by=GroupBy("channel")),
        MetricFilter(since=ragged[0], until=ragged[1]),
        MetricFilter(since=T0, until=end, channels=("web",)),
        MetricFilter(since=ragged[0], until=ragged[1], channels=("web", "messenger")),
        MetricFilter(since=T0, until=end, channels=("telegram",)),
        # Inside one slot, an empty window, and a window before any data.
        MetricFilter(since=day + timedelta(minutes=3), until=day + timedelta(minutes=11)),
        MetricFilter(since=day, until=day),
        MetricFilter(since=T0 - timedelta(days=20), until=T0 - timedelta(days=10)),
    ]


def assert_same_as_raw(engine: Engine) -> None:
    filters = _filters()
    cases = [(flt, {}) for flt in filters]
    # Options that read raw rows for one part of the answer: the whole window, a ragged one,
    # and a ragged one with a channel filter.
    for flt in (filters[0], filters[3], filters[5]):
        cases += [(flt, {"exact": "true"}), (flt, {"attribution_days": 3.0})]
    for flt, options in cases:
        with raw_only():
            expected = channel_performance(engine, flt, options)
        actual = channel_performance(engine, flt, options)
        assert_close(actual, expected, f"{flt.describe()} {options}")
        if options.get("exact") == "true":
            # Exact percentiles come from raw durations on both paths.
            for rolled, raw in zip(actual["channels"], expected["channels"], strict=True):
                assert rolled["first_response"] == raw["first_response"]
                assert rolled["reply_time"] == raw["reply_time"]


def _assert_served(engine: Engine) -> None:
    """Assert that rollups serve most of the full window, so the checks compare two paths."""
    coverage = coverage_of(engine, MetricFilter(since=T0, until=T0 + timedelta(days=DAYS)))
    assert coverage is not None
    assert len(coverage.served) > DAYS * 96 // 2


def _assert_varied(engine: Engine) -> None:
    """Assert that the store has every kind of figure the comparison checks."""
    result = channel_performance(engine, MetricFilter(since=T0, until=T0 + timedelta(days=DAYS)))
    rows = result["channels"]
    assert [row["channel"] for row in rows] == sorted(CHANNELS)
    for row in rows:
        assert row["users"] > 3, row["channel"]
        assert 0 < row["engagement"]["engaged"] < row["conversations"], row["channel"]
        assert row["conversion"]["converted"] > 0, row["channel"]
        assert row["first_response"]["count"] > 0, row["channel"]
        assert row["sentiment_mean"] is not None, row["channel"]
        assert row["csat"]["answers"] + row["nps"]["answers"] > 0, row["channel"]
        assert row["messages"] > row["user_messages"] > 0, row["channel"]


@pytest.mark.parametrize("seed", [3, 8])
def test_channels_rollups_match_raw(engine: Engine, seed: int) -> None:
    store = Store(engine, seed)
    store.first_events()
    assert_same_as_raw(engine)

    assert refresh(engine).rebuilt
    _assert_served(engine)
    _assert_varied(engine)
    assert_same_as_raw(engine)

    # Late first messages, duplicates and new conversations, not refreshed yet.
    store.later_events()
    assert_same_as_raw(engine)
    refresh(engine)
    assert_same_as_raw(engine)

    # Survey answers logged without a message, before and after the refresh.
    store.answer_surveys()
    assert_same_as_raw(engine)
    refresh(engine)
    assert_same_as_raw(engine)


def _volume(result: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {
        row["channel"]: (row["conversations"], row["users"], row["engagement"]["engaged"])
        for row in result["channels"]
    }


def test_channels_counted_by_hand(engine: Engine) -> None:
    writer = Writer(engine)
    start = T0 + timedelta(hours=2)
    events = []
    # web: u1 twice (one engaged conversation), u2 once, and a conversation without a user
    # message, which has no contact; whatsapp: u1 once, engaged.
    plan = [
        ("web", "u1", "a", 2),
        ("web", "u1", "b", 1),
        ("web", "u2", "c", 1),
        ("web", "u3", "e", 0),
        ("whatsapp", "u1", "d", 3),
    ]
    for number, (channel, user, conversation, user_messages) in enumerate(plan):
        at = start + timedelta(hours=number)
        roles = ["user"] * user_messages + ["bot"]
        for step, role in enumerate(roles):
            events.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at + timedelta(seconds=step),
                    key=f"{conversation}-{step}",
                    role=role,
                    user_id=user,
                    text="hello",
                    conversation_id=conversation,
                )
            )
    writer.write(events)
    assert refresh(engine).rebuilt
    expected = {"web": (4, 2, 1), "whatsapp": (1, 1, 1)}
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=1))
    with raw_only():
        assert _volume(channel_performance(engine, flt)) == expected
    assert _volume(channel_performance(engine, flt)) == expected
    # The ragged edge before 02:00 reads raw rows; the rest is served.
    ragged = MetricFilter(since=start - timedelta(milliseconds=1), until=T0 + timedelta(days=1))
    assert _volume(channel_performance(engine, ragged)) == expected


def _tamper(engine: Engine, slot_ms: int) -> None:
    """Add one conversation to every conversation and engaged row, and a starter at ``slot_ms``."""
    with engine.begin() as connection:
        connection.execute(
            update(RollupConversations).values(conversations=RollupConversations.conversations + 1)
        )
        connection.execute(
            update(RollupEngaged).values(conversations=RollupEngaged.conversations + 1)
        )
        connection.execute(
            insert(RollupStarters),
            [
                {"slot_ms": slot_ms, "channel": channel, "contact_id": 99_999}
                for channel in CHANNELS
            ],
        )


def test_channels_read_rollups_only_where_served(engine: Engine) -> None:
    store = Store(engine, seed=5)
    store.first_events()
    assert refresh(engine).rebuilt
    # The first day is partial, so its starters are read from slot rows, not day sets.
    since = T0 + timedelta(hours=7)
    flt = MetricFilter(since=since, until=T0 + timedelta(days=DAYS))
    with raw_only():
        expected = channel_performance(engine, flt)
    _tamper(engine, ev.to_ms(since + timedelta(hours=1)))
    # Served queries read the altered rows, so their counts change.
    served = _volume(channel_performance(engine, flt))
    for channel, (conversations, users, engaged) in _volume(expected).items():
        assert served[channel][0] > conversations, channel
        assert served[channel][1] == users + 1, channel
        assert served[channel][2] > engaged, channel
    # Filters that rollups do not cover read raw rows, so the altered rows do not count.
    unserved = [
        dataclasses.replace(flt, attributes={"plan": "pro"}),
        dataclasses.replace(flt, touch_filters={"campaign": "spring"}),
        MetricFilter(since=since),
    ]
    for other in unserved:
        with raw_only():
            raw = channel_performance(engine, other)
        assert channel_performance(engine, other) == raw, other.describe()
