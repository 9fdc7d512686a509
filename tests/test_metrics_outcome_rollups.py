"""CSAT, NPS, resolution and query types from rollups equal the same metrics from raw rows.

Stores get random resolved, handed-off and ended conversations of a few contacts (so
many are repeats), intents and rule types (missing, empty and set), surveys in every
state, late first messages that move starts, and times on slot edges. Each check runs
before and after a refresh, on SQLite and PostgreSQL. Hand-built stores check that a
later conversation, a moved start and a moved end dirty the earlier conversation's slot.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rollup_helpers import (
    CHANNELS,
    assert_fully_served,
    assert_later_steps_match_raw,
    duplicate_messages,
    edge_time,
    table_rows,
    window_filters,
)
from sqlalchemy import Engine, func, select, update
from surveys_support import add_random_surveys

from chatmw import events as ev
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.outcome_query import outcome_sums, query_type_sums, survey_sums
from chatmw.metrics.query_types import query_types
from chatmw.metrics.resolution import first_contact_resolution
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.changes import record_changes
from chatmw.store.models_rollups import (
    LEVEL_SLOT,
    SLOT_MS,
    RollupOutcomes,
    RollupQueryTypes,
    RollupSurveys,
)
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer
from chatmw.surveys.metrics import csat, nps

T0 = datetime(2024, 3, 29, 0, 0, tzinfo=UTC)  # Europe/Paris moves to summer time on 31 March
INTENTS = (None, "", "billing", "refund", "shipping")
RULE_TYPES = (None, "", "billing", "account")
HOUR = timedelta(hours=1)

Compute = Callable[[Engine, MetricFilter], dict[str, Any]]
METRICS: dict[str, Compute] = {
    "csat": lambda engine, flt: csat(engine, flt, {}),
    "nps": lambda engine, flt: nps(engine, flt, {}),
    "resolution": lambda engine, flt: first_contact_resolution(engine, flt, {}),
    "resolution-2h": lambda engine, flt: first_contact_resolution(
        engine, flt, {"repeat_hours": 2.0}
    ),
    "query-types": lambda engine, flt: query_types(engine, flt, {}),
    "query-types-rules": lambda engine, flt: query_types(engine, flt, {"prefer": "rules"}),
}
OUTCOME_TABLES = (RollupOutcomes, RollupSurveys, RollupQueryTypes)


def _conversation(
    rng: random.Random, number: int, start: datetime
) -> tuple[list[ev.Message], ev.ConversationUpdate]:
    channel = CHANNELS[number % len(CHANNELS)]
    user = f"u{rng.randrange(8)}"
    rule = rng.choice(RULE_TYPES)
    messages = []
    at = start
    for step in range(rng.randint(1, 4)):
        messages.append(
            ev.Message(
                channel=channel,
                occurred_at=at,
                key=f"m{number}-{step}",
                role="user" if step % 2 == 0 else "bot",
                user_id=user,
                text="hello",
                conversation_id=f"c{number}",
                attributes={"query_type": rule} if step == 0 and rule is not None else {},
            )
        )
        at += timedelta(milliseconds=rng.choice([1, 60_000, 20 * 60_000, 3 * 3_600_000]))
    outcome = ev.ConversationUpdate(
        channel=channel,
        occurred_at=at + timedelta(minutes=rng.choice([0, 5, 600])),
        user_id=user,
        conversation_id=f"c{number}",
        ended=rng.random() < 0.6 or None,
        resolved=rng.choice([True, True, False, None]),
        handed_off=rng.random() < 0.25 or None,
        intent=rng.choice(INTENTS),
    )
    return messages, outcome


def build_store(engine: Engine, seed: int) -> tuple[Writer, list[ev.Message]]:
    """Write random conversations and surveys; return the writer and held-back first messages."""
    rng = random.Random(seed)
    writer = Writer(engine)
    written: list[ev.Message] = []
    outcomes: list[ev.ConversationUpdate] = []
    held_back: list[ev.Message] = []
    for number in range(150):
        messages, outcome = _conversation(rng, number, edge_time(rng, T0, 5))
        if number % 7 == 0 and len(messages) > 1:
            held_back.append(
                ev.Message(
                    channel=messages[0].channel,
                    occurred_at=messages[0].occurred_at - timedelta(hours=rng.choice([2, 30])),
                    key=f"late{number}",
                    role="user",
                    user_id=messages[0].user_id,
                    text="late",
                    conversation_id=messages[0].conversation_id,
                )
            )
        written.extend(messages)
        outcomes.append(outcome)
    writer.write(written)
    writer.write(outcomes)
    add_random_surveys(engine, rng)
    return writer, held_back


def later_events(writer: Writer, held_back: list[ev.Message], seed: int) -> None:
    """Write late first messages, new conversations of known contacts and duplicates."""
    rng = random.Random(seed + 1)
    fresh: list[ev.Message] = []
    outcomes: list[ev.ConversationUpdate] = []
    for number in range(1000, 1025):
        messages, outcome = _conversation(rng, number, edge_time(rng, T0, 5))
        fresh.extend(messages)
        outcomes.append(outcome)
    duplicates = duplicate_messages(range(0, 150, 13), T0, "m{}-0", "c{}", text="again")
    writer.write(held_back + fresh + duplicates)
    writer.write(outcomes)


def _filters() -> list[MetricFilter]:
    since, until = T0, T0 + timedelta(days=5)
    ragged = (T0 + timedelta(hours=7, minutes=3), T0 + timedelta(days=2, minutes=44))
    return [
        *window_filters(since, until, ragged, "web"),
        MetricFilter(
            since=since,
            until=until,
            tz=ZoneInfo("Europe/Paris"),
            group_by=GroupBy("channel"),
        ),
        MetricFilter(since=since + timedelta(days=1), until=since + timedelta(days=1, hours=3)),
    ]


def assert_same_as_raw(engine: Engine) -> None:
    for flt in _filters():
        for name, compute in METRICS.items():
            with raw_only():
                expected = compute(engine, flt)
            assert compute(engine, flt) == expected, f"{name} {flt.describe()}"


def _table_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(engine, OUTCOME_TABLES)


@pytest.mark.parametrize("seed", [3, 17])
def test_outcome_rollups_match_raw(engine: Engine, seed: int) -> None:
    writer, held_back = build_store(engine, seed)
    assert_same_as_raw(engine)
    assert refresh(engine).rebuilt
    rows = _table_rows(engine)
    for table in OUTCOME_TABLES:
        assert rows[table.__tablename__], table.__tablename__
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=5))
    assert_fully_served(engine, flt)
    assert outcome_sums(engine, flt) is not None
    assert survey_sums(engine, flt, "csat") is not None
    assert query_type_sums(engine, flt) is not None
    assert_same_as_raw(engine)

    assert_later_steps_match_raw(
        engine, lambda: later_events(writer, held_back, seed), assert_same_as_raw, _table_rows
    )


def test_outcome_figures_are_not_trivial(engine: Engine) -> None:
    build_store(engine, 3)
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=5))
    resolution = first_contact_resolution(engine, flt, {})
    assert resolution["resolved_repeated"] > 0
    assert resolution["resolved_handed_off"] > 0
    assert resolution["first_contact_resolved"] > 0
    figures = csat(engine, flt, {})
    assert figures["sent"] > figures["answers"] > 0
    kinds = {item["type"] for item in query_types(engine, flt, {"prefer": "rules"})["types"]}
    assert {"billing", "account", "unclassified"} <= kinds


def _corrupt_rollups(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(RollupOutcomes).values(conversations=RollupOutcomes.conversations + 1000)
        )
        connection.execute(update(RollupSurveys).values(sent=RollupSurveys.sent + 1000))
        connection.execute(
            update(RollupQueryTypes).values(conversations=RollupQueryTypes.conversations + 1000)
        )


def test_unsupported_queries_read_raw_rows(engine: Engine) -> None:
    build_store(engine, 5)
    refresh(engine)
    since, until = T0, T0 + timedelta(days=5)
    plain = MetricFilter(since=since, until=until)
    with raw_only():
        raw = {name: compute(engine, plain) for name, compute in METRICS.items()}
    _corrupt_rollups(engine)
    # The default queries read the altered rollups, so they differ from raw rows now.
    assert (
        METRICS["resolution"](engine, plain)["conversations"] > raw["resolution"]["conversations"]
    )
    assert METRICS["csat"](engine, plain)["sent"] > raw["csat"]["sent"]
    assert METRICS["nps"](engine, plain)["sent"] > raw["nps"]["sent"]
    assert (
        METRICS["query-types"](engine, plain)["conversations"] > raw["query-types"]["conversations"]
    )
    # A repeat window other than the default reads raw rows.
    assert METRICS["resolution-2h"](engine, plain) == raw["resolution-2h"]
    unsupported = [
        MetricFilter(since=since, until=until, attributes={"query_type": "billing"}),
        MetricFilter(since=since, until=until, group_by=GroupBy("attr", "query_type")),
        MetricFilter(since=since, until=until, touch_filters={"campaign": "spring"}),
        MetricFilter(since=since),
    ]
    for flt in unsupported:
        for name, compute in METRICS.items():
            with raw_only():
                expected = compute(engine, flt)
            assert compute(engine, flt) == expected, f"{name} {flt.describe()}"


def _message(at: datetime, user: str, conversation: str, key: str) -> ev.Message:
    return ev.Message(
        channel="web",
        occurred_at=at,
        key=key,
        role="user",
        user_id=user,
        text="hello",
        conversation_id=conversation,
    )


def _resolve(at: datetime, user: str, conversation: str, ended: bool) -> ev.ConversationUpdate:
    return ev.ConversationUpdate(
        channel="web",
        occurred_at=at,
        user_id=user,
        conversation_id=conversation,
        resolved=True,
        ended=True if ended else None,
    )


def _repeats(engine: Engine, flt: MetricFilter) -> int:
    result = first_contact_resolution(engine, flt, {})
    with raw_only():
        assert first_contact_resolution(engine, flt, {}) == result
    return int(result["resolved_repeated"])


def _slot_repeats(engine: Engine, at: datetime) -> int:
    slot = ev.to_ms(at) - ev.to_ms(at) % SLOT_MS
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.coalesce(func.sum(RollupOutcomes.resolved_repeated), 0)).where(
                    RollupOutcomes.level == LEVEL_SLOT, RollupOutcomes.start_ms == slot
                )
            ).scalar_one()
        )


def test_later_conversation_dirties_earlier_slot(engine: Engine) -> None:
    writer = Writer(engine)
    first = T0 + HOUR
    writer.write([_message(first, "ann", "a", "a0")])
    writer.write([_resolve(first + timedelta(minutes=2), "ann", "a", ended=True)])
    refresh(engine)
    window = MetricFilter(since=T0, until=T0 + 2 * HOUR)
    assert _repeats(engine, window) == 0

    # A later conversation of the same contact, outside the window, makes "a" a repeat.
    writer.write([_message(T0 + 20 * HOUR, "ann", "b", "b0")])
    assert _repeats(engine, window) == 1
    refresh(engine)
    assert_fully_served(engine, window)
    assert _slot_repeats(engine, first) == 1
    assert _repeats(engine, window) == 1

    # A late first message moves "b" before "a": "a" is no longer followed by a repeat.
    writer.write([_message(T0 - 30 * timedelta(minutes=1), "ann", "b", "b-late")])
    assert _repeats(engine, window) == 0
    refresh(engine)
    assert_fully_served(engine, window)
    assert _slot_repeats(engine, first) == 0
    assert _repeats(engine, window) == 0


def test_moved_end_dirties_own_slot(engine: Engine) -> None:
    writer = Writer(engine)
    first = T0 + HOUR
    writer.write([_message(first, "bob", "a", "a0")])
    writer.write([_resolve(first + timedelta(minutes=1), "bob", "a", ended=False)])
    # 25 hours after the end of "a": not a repeat.
    writer.write([_message(first + 25 * HOUR, "bob", "b", "b0")])
    refresh(engine)
    window = MetricFilter(since=T0, until=T0 + 2 * HOUR)
    assert _repeats(engine, window) == 0

    # A message 5 hours later moves the end of "a", so "b" comes within 24 hours of it.
    writer.write([_message(first + 5 * HOUR, "bob", "a", "a1")])
    assert _repeats(engine, window) == 1
    refresh(engine)
    assert_fully_served(engine, window)
    assert _slot_repeats(engine, first) == 1


def test_resolved_update_without_message(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write([_message(T0 + HOUR, "cid", "a", "a0")])
    refresh(engine)
    writer.write([_resolve(T0 + 2 * HOUR, "cid", "a", ended=True)])
    refresh(engine)
    window = MetricFilter(since=T0, until=T0 + 2 * HOUR)
    with raw_only():
        expected = first_contact_resolution(engine, window, {})
    assert expected["resolved"] == 1
    assert first_contact_resolution(engine, window, {}) == expected


def test_end_update_without_message_makes_repeat(engine: Engine) -> None:
    writer = Writer(engine)
    first = T0 + HOUR
    writer.write([_message(first, "dee", "a", "a0")])
    writer.write([_resolve(first + timedelta(minutes=1), "dee", "a", ended=False)])
    writer.write([_message(first + 25 * HOUR, "dee", "b", "b0")])
    refresh(engine)
    # An explicit end 5 hours later brings "b" within 24 hours of the end of "a".
    writer.write(
        [
            ev.ConversationUpdate(
                channel="web",
                occurred_at=first + 5 * HOUR,
                user_id="dee",
                conversation_id="a",
                ended=True,
            )
        ]
    )
    refresh(engine)
    window = MetricFilter(since=T0, until=T0 + 2 * HOUR)
    with raw_only():
        expected = first_contact_resolution(engine, window, {})
    assert expected["resolved_repeated"] == 1
    assert first_contact_resolution(engine, window, {}) == expected


def test_survey_answer_without_message(engine: Engine) -> None:
    build_store(engine, 11)
    refresh(engine)
    # The refresher sees a change without a message through the change log. The survey
    # service writes it in the transaction of each survey change, so the test writes both.
    with engine.begin() as connection:
        changed = (
            connection.execute(select(Survey.conversation_id).where(Survey.kind == "csat"))
            .scalars()
            .all()
        )
        connection.execute(
            update(Survey)
            .where(Survey.kind == "csat")
            .values(score=5, sent_at_ms=func.coalesce(Survey.sent_at_ms, 1))
        )
        record_changes(connection, conversations=[(cid, None) for cid in changed])
    assert changed
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=5))
    with raw_only():
        expected = csat(engine, flt, {})
    # Before the refresh, cover() reads the logged conversations' slots raw.
    assert csat(engine, flt, {}) == expected
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=5))
    with raw_only():
        expected = csat(engine, flt, {})
    assert csat(engine, flt, {}) == expected
