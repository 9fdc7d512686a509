"""The dropoff metric from rollups equals the metric from raw rows.

Random stores get conversations on three channels with bot intents: missing, empty,
named, and names a ``steps`` list cannot hold. They also get reported ends,
resolutions, last steps (empty and set), conversions naming a conversation or a user,
late first messages, and times on slot edges. Later events add late bot messages that
change the last step, step updates, conversions, ends and reopenings, and duplicates.
Every check compares the rollup answer with the raw answer for a fixed time of the
query whose idle cut-off lies inside a slot with open conversations on both sides of
it, before and after refreshes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rollup_helpers import (
    RandomStore,
    assert_fully_served,
    assert_later_steps_match_raw,
    edge_time,
    hold_back_first,
    table_rows,
)
from sqlalchemy import Engine, select, update

from chatmw import events as ev
from chatmw.events import to_ms
from chatmw.events_business import Conversion
from chatmw.metrics.dropoff import dropoff
from chatmw.metrics.dropoff_rollups import dropoff_tallies
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import (
    SLOT_MS,
    RollupDropoff,
    RollupDropoffOpen,
    RollupDropoffSteps,
    RollupStepSets,
)

T0 = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)
DAYS = 5
INTENTS = (None, None, "", "greeting", "pricing", "refund", "pay", " padded", "a,b")
STEPS = (None, None, "", "menu", "checkout", "pay")
# The idle cut-off of the default 30 minutes for NOW lies 7.5 minutes into a slot.
CUT = T0 + timedelta(days=2, hours=3, minutes=7, seconds=30)
NOW = CUT + timedelta(minutes=30)
WEEK = timedelta(days=7)
STEP_LISTS = ("greeting,pricing,pay", "pay", "refund,greeting,checkout,menu", "a b,pay")


class Store(RandomStore):
    """A random chat history written in two steps."""

    def __init__(self, engine: Engine, seed: int) -> None:
        super().__init__(engine, seed)
        self.ends: dict[str, datetime] = {}

    def conversation(
        self, number: int, start: datetime, last: datetime | None = None, user: str = ""
    ) -> list[ev.Message]:
        """Return the messages of ``c{number}``. With ``last``, the final one is at ``last``."""
        rng = self.rng
        channel, user, conversation_id = self.start_conversation(number, start, user, 10)
        messages = []
        at = start
        count = rng.randint(1, 5)
        for index in range(count):
            role = "user" if index % 2 == 0 else "bot"
            if index == 0 and rng.random() < 0.1:
                role = "bot"
            if last is not None and index == count - 1:
                at = max(at, last)
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"{conversation_id}-{index}",
                    role=role,
                    user_id=user,
                    text="hello",
                    conversation_id=conversation_id,
                    intent=rng.choice(INTENTS) if role == "bot" else None,
                )
            )
            at += timedelta(milliseconds=rng.choice([1, 1000, 60_000, SLOT_MS, 5_400_000]))
        self.ends[conversation_id] = max(message.occurred_at for message in messages)
        return messages

    def update(self, number: int, at: datetime | None = None) -> ev.ConversationUpdate:
        rng = self.rng
        conversation_id = f"c{number}"
        channel, user, _ = self.starts[conversation_id]
        return ev.ConversationUpdate(
            channel=channel,
            occurred_at=at or self.ends[conversation_id] + timedelta(minutes=1),
            user_id=user,
            conversation_id=conversation_id,
            ended=rng.choice([True, True, None, None, False]),
            resolved=rng.choice([True, False, None, None]),
            step=rng.choice(STEPS),
        )

    def random_conversion(self, number: int, key: str) -> Conversion:
        rng = self.rng
        start = self.starts[f"c{number}"][2]
        by_user = rng.random() < 0.5
        offset = rng.choice((timedelta(0), timedelta(hours=2), WEEK, WEEK + timedelta(days=1)))
        at = start + offset
        return self.conversion(number, at, key, 1_000_000, user=by_user, conversation=not by_user)

    def first_events(self) -> None:
        rng = self.rng
        messages: list[ev.Message] = []
        updates = []
        for number in range(120):
            conversation = self.conversation(number, edge_time(rng, T0, DAYS))
            messages.extend(hold_back_first(conversation, self.held_back, number % 9 == 0))
            if rng.random() < 0.6:
                updates.append(self.update(number))
        # Open conversations whose last message lies in the slot of the idle cut-off of NOW,
        # on both sides of the cut-off.
        for number in range(200, 212):
            last = CUT + timedelta(minutes=(number - 206) * 1.2 + 0.5)
            start = last - timedelta(minutes=rng.choice([0, 20, 90]))
            messages.extend(self.conversation(number, start, last))
        rng.shuffle(messages)
        self.written = messages
        self.writer.write(messages)
        self.writer.write(updates)
        self.writer.write(
            [self.random_conversion(number, f"v{number}") for number in range(0, 120, 4)]
        )

    def later_events(self) -> None:
        """Write late bot messages, step updates, conversions, ends and duplicates."""
        rng = self.rng
        events: list[Any] = list(self.held_back)
        for number in range(1, 120, 5):
            channel, user, _ = self.starts[f"c{number}"]
            # A bot message after the others changes the last step, but one before does not.
            shift = timedelta(minutes=rng.choice([2, 40])) * rng.choice([1, -1])
            events.append(
                ev.Message(
                    channel=channel,
                    occurred_at=self.ends[f"c{number}"] + shift,
                    key=f"late-bot-{number}",
                    role="bot",
                    user_id=user,
                    text="one more thing",
                    conversation_id=f"c{number}",
                    intent=rng.choice(("refund", "pay", "greeting", "")),
                )
            )
        for number in range(300, 310):
            events.extend(self.conversation(number, edge_time(rng, T0, DAYS)))
        self.writer.write(events + self.written[::11])
        self.writer.write([self.update(number) for number in range(2, 120, 6)])
        self.writer.write([self.update(number) for number in range(203, 209)])
        self.writer.write(
            [self.random_conversion(number, f"w{number}") for number in range(3, 120, 7)]
        )


def _filters() -> list[MetricFilter]:
    since, until = T0, T0 + timedelta(days=DAYS)
    ragged = (T0 + timedelta(hours=10, minutes=7, seconds=13), T0 + timedelta(days=3, hours=5))
    return [
        MetricFilter(since=since, until=until),
        MetricFilter(since=since, until=until, group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, channels=("web",)),
        MetricFilter(
            since=ragged[0],
            until=ragged[1],
            group_by=GroupBy("channel"),
            channels=("web", "whatsapp"),
        ),
        MetricFilter(since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=11)),
        # Empty windows: before the data, and one second long.
        MetricFilter(since=T0 - WEEK, until=T0 - timedelta(days=1)),
        MetricFilter(since=CUT, until=CUT + timedelta(seconds=1), group_by=GroupBy("channel")),
    ]


def _cases() -> list[tuple[dict[str, Any], int]]:
    """Return (options, time of the query) pairs; NOW puts the cut-off inside a slot."""
    now, later, early = to_ms(NOW), to_ms(NOW + timedelta(days=30)), to_ms(T0 + timedelta(days=1))
    cases: list[tuple[dict[str, Any], int]] = [({}, now), ({}, later), ({}, early)]
    cases += [({"idle_minutes": 0.0}, now), ({"idle_minutes": 3 * 24 * 60.0}, later)]
    cases += [({"steps": steps}, now) for steps in STEP_LISTS]
    cases.append(({"steps": STEP_LISTS[0], "idle_minutes": 95.0}, early))
    cases.append(({"attribution_days": 2.0, "steps": STEP_LISTS[2]}, now))
    return cases


def assert_same_as_raw(engine: Engine) -> None:
    for flt in _filters():
        for options, now_ms in _cases():
            with raw_only():
                expected = dropoff(engine, flt, options, now_ms=now_ms)
            got = dropoff(engine, flt, options, now_ms=now_ms)
            assert got == expected, f"{flt.describe()} {options} {now_ms}"


def _table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Return the rows of the drop-off tables, with step set ids replaced by their steps."""
    rows = table_rows(engine, (RollupDropoff, RollupDropoffOpen))
    with engine.connect() as connection:
        sets = dict(connection.execute(select(RollupStepSets.id, RollupStepSets.steps)).all())
        table = RollupDropoffSteps
        result = connection.execute(
            select(
                table.level, table.start_ms, table.channel, table.step_set_id, table.conversations
            )
        )
        rows[table.__tablename__] = sorted(
            (level, start, channel, sets[set_id], number)
            for level, start, channel, set_id, number in result
        )
    return rows


def _straddling(engine: Engine) -> tuple[int, int]:
    """Count the open conversations whose last message is in CUT's slot, before and after CUT."""
    cut = to_ms(CUT)
    low = cut - cut % SLOT_MS
    with engine.connect() as connection:
        lasts = connection.execute(
            select(Conversation.last_message_at_ms).where(
                Conversation.last_message_at_ms >= low,
                Conversation.last_message_at_ms < low + SLOT_MS,
                Conversation.ended_at_ms.is_(None),
                Conversation.resolved.is_not(True),
            )
        ).scalars()
        times = list(lasts)
    return sum(1 for at in times if at < cut), sum(1 for at in times if at >= cut)


@pytest.mark.parametrize("seed", [4, 11])
def test_dropoff_rollups_match_raw(engine: Engine, seed: int) -> None:
    store = Store(engine, seed)
    store.first_events()
    assert_same_as_raw(engine)
    assert refresh(engine).rebuilt
    before, after = _straddling(engine)
    assert before > 0
    assert after > 0
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS))
    assert_fully_served(engine, flt)
    assert dropoff_tallies(engine, flt, to_ms(CUT), True) is not None
    rows = _table_rows(engine)
    assert all(rows.values())
    assert_same_as_raw(engine)

    assert_later_steps_match_raw(engine, store.later_events, assert_same_as_raw, _table_rows)


def test_dropoff_figures_are_not_trivial(engine: Engine) -> None:
    Store(engine, 4).first_events()
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS), group_by=GroupBy("channel"))
    result = dropoff(engine, flt, {"steps": STEP_LISTS[0]}, now_ms=to_ms(NOW))
    assert 0 < result["dropped"] < result["conversations"]
    steps = {item["step"] for item in result["last_steps"]}
    assert {"(unknown)", "pay"} <= steps
    assert len(result["groups"]) == 3
    reached = [item["reached"] for item in result["funnel"]]
    assert reached[0] >= reached[1] >= reached[2] > 0
    # The cut-off inside a slot: moving now by a minute changes the dropped count.
    later = dropoff(engine, flt, {}, now_ms=to_ms(NOW + timedelta(minutes=1)))
    assert later["dropped"] > result["dropped"]


def _same_both_ways(engine: Engine, flt: MetricFilter, options: dict[str, Any], now_ms: int):
    with raw_only():
        expected = dropoff(engine, flt, options, now_ms=now_ms)
    got = dropoff(engine, flt, options, now_ms=now_ms)
    assert got == expected
    return got


def test_conversion_and_step_after_refresh(engine: Engine) -> None:
    store = Store(engine, 7)
    store.first_events()
    # An open conversation of a user with no other conversation or conversion.
    store.writer.write(store.conversation(900, T0 + timedelta(days=1, minutes=1), user="solo"))
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS))
    options = {"steps": "menu,checkout"}
    now_ms = to_ms(NOW + timedelta(days=30))
    first = _same_both_ways(engine, flt, options, now_ms)
    channel, user, start = store.starts["c900"]
    store.writer.write([store.conversion(900, start + timedelta(days=9), "late-conversion", 1)])
    converted = _same_both_ways(engine, flt, options, now_ms)
    assert converted["dropped"] == first["dropped"] - 1
    update_step = ev.ConversationUpdate(
        channel=channel,
        occurred_at=store.ends["c900"],
        user_id=user,
        conversation_id="c900",
        step="checkout",
    )
    store.writer.write([update_step])
    stepped = _same_both_ways(engine, flt, options, now_ms)
    assert stepped["funnel"][1]["reached"] == converted["funnel"][1]["reached"] + 1
    assert not refresh(engine).rebuilt
    assert _same_both_ways(engine, flt, options, now_ms) == stepped


def test_unsupported_queries_read_raw_rows(engine: Engine) -> None:
    Store(engine, 5).first_events()
    refresh(engine)
    since, until = T0, T0 + timedelta(days=DAYS)
    plain = MetricFilter(since=since, until=until)
    now_ms = to_ms(NOW)
    with raw_only():
        raw = dropoff(engine, plain, {}, now_ms=now_ms)
        raw_days = dropoff(engine, plain, {"attribution_days": 2.0}, now_ms=now_ms)
    with engine.begin() as connection:
        connection.execute(
            update(RollupDropoff).values(conversations=RollupDropoff.conversations + 1000)
        )
    # The default query reads the altered rollups, and other attribution windows read raw rows.
    assert dropoff(engine, plain, {}, now_ms=now_ms)["conversations"] > raw["conversations"]
    assert dropoff(engine, plain, {"attribution_days": 2.0}, now_ms=now_ms) == raw_days
    unsupported = [
        MetricFilter(since=since, until=until, group_by=GroupBy("attr", "plan")),
        MetricFilter(since=since, until=until, touch_filters={"campaign": "spring"}),
        MetricFilter(since=since),
    ]
    for flt in unsupported:
        with raw_only():
            expected = dropoff(engine, flt, {}, now_ms=now_ms)
        assert dropoff(engine, flt, {}, now_ms=now_ms) == expected


def test_step_sets_keep_nameable_steps(engine: Engine) -> None:
    Store(engine, 4).first_events()
    refresh(engine)
    with engine.connect() as connection:
        stored = [
            json.loads(text) for text in connection.execute(select(RollupStepSets.steps)).scalars()
        ]
    seen = {step for steps in stored for step in steps}
    assert {"pay", "menu"} <= seen
    # Names that a steps list cannot hold (padded, with a comma, empty) are left out.
    assert not seen & {" padded", "a,b", ""}
    assert len({tuple(steps) for steps in stored}) == len(stored)
