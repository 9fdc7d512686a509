"""The attribution metric from rollups equals the attribution metric from raw rows.

Random stores get conversations on three channels with first and last touches, some
with fields missing, empty or spelled ``(none)``. They also get touches without a
conversation that the writer links later, and conversions naming a conversation or only
a user. Later steps add late first messages that move starts, duplicate messages, new
touches that change a stored conversation's last touch, and new conversions. Each
check runs before the first refresh, after it, after new events that are not refreshed
yet, and after the next refresh, on SQLite and PostgreSQL. The raw result comes from
``raw_only``, which reads every conversation of the window.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
from sqlalchemy import Engine, func, select, update

from chatmw import events as ev
from chatmw.events_business import Conversion
from chatmw.metrics.attribution import attribution
from chatmw.metrics.attribution_rollups import ALL_CHANNELS, rolled_attribution
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.models_rollups import (
    LEVEL_WEEK,
    SLOT_MS,
    RollupAttribution,
    RollupAttributionSets,
    RollupConversionLinks,
)

# A Monday. The epoch week from Thursday 2024-06-06 lies inside the first ten days.
T0 = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)
DAYS = 10
SOURCES = ("google", "facebook", "", "(none)", None)
MEDIUMS = ("cpc", "email", None)
CAMPAIGNS = ("spring", "summer", "autumn", None)
ADS = ("ad-1", "ad-2", None)
TABLES = (RollupAttribution, RollupAttributionSets, RollupConversionLinks)


class Store(RandomStore):
    """A random history of conversations, touches and conversions, written in steps."""

    def __init__(self, engine: Engine, seed: int) -> None:
        super().__init__(engine, seed)
        self.touches = 0

    def touch(self, channel: str, user: str, at: datetime, conversation: str | None) -> ev.Touch:
        rng = self.rng
        self.touches += 1
        return ev.Touch(
            channel=channel,
            occurred_at=at,
            key=f"t{self.touches}",
            user_id=user,
            conversation_id=conversation,
            source=rng.choice(SOURCES),
            medium=rng.choice(MEDIUMS),
            campaign=rng.choice(CAMPAIGNS),
            ad_id=rng.choice(ADS),
        )

    def conversation(self, number: int, start: datetime, user: str | None = None) -> list[Any]:
        rng = self.rng
        channel, user, name = self.start_conversation(number, start, user, 15)
        events: list[Any] = []
        at = start
        for step in range(rng.randint(1, 4)):
            events.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"{name}-{step}",
                    role="user" if step % 2 == 0 else "bot",
                    user_id=user,
                    text="hello",
                    conversation_id=name,
                )
            )
            at += timedelta(milliseconds=rng.choice([1, 1000, 60_000, SLOT_MS, 7_200_000]))
        for index in range(rng.choice((0, 1, 1, 2, 3))):
            events.append(self.touch(channel, user, start - timedelta(minutes=5 - index), name))
        return events

    def first_events(self) -> None:
        rng = self.rng
        written: list[Any] = []
        for number in range(150):
            events = self.conversation(number, edge_time(rng, T0, DAYS))
            written.extend(hold_back_first(events, self.held_back, number % 7 == 0))
        rng.shuffle(written)
        self.written = [e for e in written if isinstance(e, ev.Message)]
        self.writer.write(self.written)
        self.writer.write([e for e in written if isinstance(e, ev.Touch)])
        business: list[Any] = []
        for number in range(150):
            business.extend(self.conversions(number))
        self.writer.write(business)

    def later_events(self) -> None:
        """Write late first messages, duplicates, new conversations, touches and conversions."""
        rng = self.rng
        events: list[Any] = list(self.held_back)
        known = sorted({(channel, user) for channel, user, _ in self.starts.values()})
        for number in range(300, 320):
            channel, user = rng.choice(known)
            number = number_on_channel(number, channel)
            start = edge_time(rng, T0, DAYS)
            # A touch without a conversation, linked by the writer when the chat arrives.
            events.append(self.touch(channel, user, start - timedelta(minutes=1), None))
            events.extend(
                e for e in self.conversation(number, start, user) if isinstance(e, ev.Message)
            )
        # New touches on stored conversations change their last touch.
        for name in rng.sample(sorted(self.starts), 12):
            channel, user, start = self.starts[name]
            events.append(self.touch(channel, user, start + timedelta(seconds=30), name))
        # Exact copies of stored messages: the writer stores each key once.
        self.writer.write(events + self.written[::9])
        later: list[Any] = []
        for number in rng.sample(range(150), 20):
            later.extend(self._late_conversions(number))
        self.writer.write(later)

    def _late_conversions(self, number: int) -> list[Conversion]:
        start = self.starts[f"c{number}"][2]
        return [
            self.conversion(
                number,
                start + timedelta(hours=self.rng.choice((0, 5, 100))),
                f"late-{number}-{by_user}",
                value_micros=self.rng.randrange(1, 900) * 10_000,
                user=by_user,
                conversation=not by_user,
            )
            for by_user in (True, False)
            if self.rng.random() < 0.7
        ]


def _filters() -> list[tuple[MetricFilter, dict[str, Any]]]:
    end = T0 + timedelta(days=DAYS)
    windows = [
        (T0, end),
        (T0 - timedelta(days=3), end + timedelta(days=2)),
        (T0 + timedelta(hours=10, minutes=7, seconds=13), T0 + timedelta(days=8, hours=5)),
        (T0 + timedelta(days=3), T0 + timedelta(days=4)),
        (T0 + timedelta(minutes=3), T0 + timedelta(minutes=11)),
        # Empty windows: before any conversation, and one slot wide.
        (T0 - timedelta(days=30), T0 - timedelta(days=20)),
        (T0 - timedelta(minutes=15), T0),
    ]
    cases: list[tuple[MetricFilter, dict[str, Any]]] = [
        (MetricFilter(since=since, until=until), {}) for since, until in windows
    ]
    cases += [
        (MetricFilter(since=T0, until=end, channels=("web", "messenger")), {}),
        (MetricFilter(since=T0 + timedelta(hours=3), until=end, channels=("whatsapp",)), {}),
        (MetricFilter(since=T0, until=end, channels=("nowhere",)), {}),
        # Read from raw rows: a touch filter and another attribution window.
        (MetricFilter(since=T0, until=end, touch="first", touch_filters={"source": "google"}), {}),
        (MetricFilter(since=T0, until=end), {"attribution_days": 3.0}),
    ]
    return cases


def assert_same_as_raw(engine: Engine) -> None:
    for flt, options in _filters():
        with raw_only():
            expected = attribution(engine, flt, options)
        assert attribution(engine, flt, options) == expected, (flt.describe(), options)


def _served(engine: Engine) -> dict[str, Any]:
    """Assert that rollups serve a whole-week window, so the comparisons compare two paths."""
    rolled = rolled_attribution(engine, MetricFilter(since=T0, until=T0 + timedelta(days=DAYS)), 7)
    assert rolled is not None
    assert rolled["totals"]["conversations"] > 100
    assert rolled["totals"]["users"] > 20
    assert rolled["totals"]["conversions"] > 10
    return rolled


def _table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(engine, TABLES)


def test_attribution_rollups_match_raw(engine: Engine) -> None:
    store = Store(engine, seed=5)
    store.first_events()
    assert_same_as_raw(engine)

    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        weeks = connection.execute(
            select(func.count())
            .select_from(RollupAttributionSets)
            .where(RollupAttributionSets.level == LEVEL_WEEK)
        ).scalar_one()
    assert weeks > 0
    _served(engine)
    assert_same_as_raw(engine)
    assert_later_steps_match_raw(engine, store.later_events, assert_same_as_raw, _table_rows)


@pytest.mark.parametrize("seed", [1, 2])
def test_attribution_rollups_random_stores(engine: Engine, seed: int) -> None:
    store = Store(engine, seed=seed)
    store.first_events()
    refresh(engine)
    assert_later_steps_match_raw(engine, store.later_events, assert_same_as_raw, _table_rows)


def test_attribution_reads_the_sets(engine: Engine) -> None:
    """Altered week sets change the rolled result, and unserved queries keep the raw result."""
    Store(engine, seed=3).first_events()
    refresh(engine)
    before = _served(engine)
    web = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS), channels=("web",))
    web_before = attribution(engine, web)["totals"]
    with engine.begin() as connection:
        connection.execute(
            update(RollupAttributionSets)
            .where(RollupAttributionSets.level.in_((LEVEL_WEEK, LEVEL_WEEK + ALL_CHANNELS)))
            .values(conversations=RollupAttributionSets.conversations + 1000)
        )
    after = _served(engine)
    # Each first-touch source label of the week gains 1000 conversations.
    assert after["totals"]["conversations"] > before["totals"]["conversations"] + 1000
    web_after = attribution(engine, web)["totals"]
    assert web_after["conversations"] > web_before["conversations"] + 1000
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS))
    with raw_only():
        raw = attribution(engine, flt)
    assert attribution(engine, flt)["totals"] != raw["totals"]
    # Touch filters and other attribution windows never read the altered rows.
    for flt, options in _filters()[-2:]:
        with raw_only():
            expected = attribution(engine, flt, options)
        assert attribution(engine, flt, options) == expected

