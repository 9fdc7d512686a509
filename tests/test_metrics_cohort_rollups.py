"""Retention and engagement from rollups equal the same metrics from raw rows.

Random stores get several channels, conversations that the bot or an agent opens,
exposures, returning users, late first messages that move a conversation's start,
duplicates and times on slot edges. Each check runs before the first refresh, after it,
after new events that are not refreshed yet and after the next refresh, on SQLite and
PostgreSQL. The windows are aligned and not aligned to slots, in several time zones, with
channel filters and ``group_by=channel``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rollup_helpers import CHANNELS, assert_rebuild_matches, hold_back_first, table_rows
from sqlalchemy import Engine, func, select

from chatmw import events as ev
from chatmw.metrics.buckets import bucket_range
from chatmw.metrics.engagement import engagement
from chatmw.metrics.engagement_rollups import engagement_counts
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.retention import retention
from chatmw.metrics.retention_rollups import retention_counts
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.models_rollups import (
    RollupContactSets,
    RollupEngaged,
    RollupExposed,
    RollupFirsts,
    RollupProactive,
    RollupWriters,
)
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)  # a Monday
DAYS = 40
ZONES = ("Europe/Paris", "Asia/Kathmandu", "America/St_Johns")
REACH_TABLES = (RollupEngaged, RollupProactive, RollupWriters, RollupExposed)


def _time(rng: random.Random, days: int = DAYS) -> datetime:
    minutes = rng.randrange(days * 24 * 60)
    if rng.random() < 0.15:
        # On a slot edge, or one millisecond before it.
        minutes -= minutes % 15
        return T0 + timedelta(minutes=minutes, milliseconds=-rng.randrange(2))
    return T0 + timedelta(minutes=minutes, milliseconds=rng.randrange(60_000))


def _conversation(rng: random.Random, key: str, user: str, start: datetime) -> list[ev.Message]:
    channel = rng.choice(CHANNELS)
    opener = rng.choice(("user", "user", "bot", "agent"))
    messages = []
    at = start
    for step in range(rng.randint(1, 5)):
        role = opener if step == 0 else rng.choice(("user", "bot", "agent"))
        messages.append(
            ev.Message(
                channel=channel,
                occurred_at=at,
                key=f"{key}-{step}",
                role=role,
                user_id=user,
                text="hello",
                conversation_id=key,
            )
        )
        at = at + timedelta(milliseconds=rng.choice([1, 900, 60_000, 900_000]))
    return messages


def _exposures(rng: random.Random, prefix: str, count: int) -> list[ev.Exposure]:
    return [
        ev.Exposure(
            channel=rng.choice(CHANNELS[:2]),
            occurred_at=_time(rng),
            key=f"{prefix}{number}",
            user_id=f"u{rng.randrange(60)}",
            kind=rng.choice(("impression", "open")),
        )
        for number in range(count)
    ]


def build_store(engine: Engine, seed: int) -> tuple[Writer, list[ev.Message], random.Random]:
    """Write a random store; return the writer, held-back first messages and the generator."""
    rng = random.Random(seed)
    writer = Writer(engine)
    written: list[Any] = []
    late: list[ev.Message] = []
    for number in range(220):
        messages = _conversation(rng, f"c{number}", f"u{rng.randrange(60)}", _time(rng))
        written.extend(hold_back_first(messages, late, number % 9 == 0, min_messages=3))
    written.extend(_exposures(rng, "x", 120))
    writer.write(written)
    return writer, late, rng


def more_events(writer: Writer, late: list[ev.Message], rng: random.Random) -> None:
    """Write late first messages, duplicates, new conversations and new exposures."""
    events: list[Any] = list(late)
    for number in range(20):
        events.extend(_conversation(rng, f"n{number}", f"u{rng.randrange(70)}", _time(rng)))
    events.extend(_exposures(rng, "y", 30))
    writer.write(events)
    # Duplicates of stored messages and exposures add no raw row.
    writer.write(late[:3] + events[-5:])


def _filters() -> list[MetricFilter]:
    since, until = T0 + timedelta(days=7), T0 + timedelta(days=35)
    ragged = (T0 + timedelta(days=8, hours=7, minutes=3), T0 + timedelta(days=33, minutes=44))
    filters = [
        MetricFilter(since=since, until=until),
        MetricFilter(since=since, until=until, group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, channels=("web",)),
        MetricFilter(since=since, until=until, channels=("web",), group_by=GroupBy("channel")),
        MetricFilter(since=ragged[0], until=ragged[1]),
        MetricFilter(since=ragged[0], until=ragged[1], group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, channels=("web", "whatsapp")),
    ]
    for zone in ZONES:
        filters.append(MetricFilter(since=since, until=until, tz=ZoneInfo(zone)))
        filters.append(
            MetricFilter(
                since=ragged[0], until=ragged[1], tz=ZoneInfo(zone), group_by=GroupBy("channel")
            )
        )
    return filters


def assert_engagement_same(engine: Engine) -> None:
    for flt in _filters():
        with raw_only():
            expected = engagement(engine, flt, {})
        assert engagement(engine, flt, {}) == expected, flt.describe()


def assert_retention_same(engine: Engine) -> None:
    for flt in _filters():
        for options in ({}, {"period": "day", "periods": 5}, {"period": "month", "periods": 2}):
            with raw_only():
                expected = retention(engine, flt, options)
            assert retention(engine, flt, options) == expected, (flt.describe(), options)


def assert_same_as_raw(engine: Engine) -> None:
    assert_engagement_same(engine)
    assert_retention_same(engine)


def _reach_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(engine, (*REACH_TABLES, RollupFirsts))


@pytest.mark.parametrize("seed", [3, 11])
def test_cohort_rollups_match_raw(engine: Engine, seed: int) -> None:
    writer, late, rng = build_store(engine, seed)
    assert_same_as_raw(engine)
    assert refresh(engine).rebuilt
    flt = MetricFilter(since=T0 + timedelta(days=7), until=T0 + timedelta(days=35))
    assert engagement_counts(engine, flt) is not None
    assert_same_as_raw(engine)

    more_events(writer, late, rng)
    assert_same_as_raw(engine)
    report = refresh(engine)
    assert report.slots > 0
    assert_same_as_raw(engine)


def test_cohort_refresh_matches_rebuild(engine: Engine) -> None:
    writer, late, rng = build_store(engine, 5)
    refresh(engine)
    more_events(writer, late, rng)
    refresh(engine)
    kinds = {"exposed", "proactive", "writers"}
    with engine.connect() as connection:
        sets = select(RollupContactSets.kind, func.count()).group_by(RollupContactSets.kind)
        counted = dict(connection.execute(sets).all())
    assert kinds <= set(counted)
    refreshed = assert_rebuild_matches(engine, _reach_rows)
    assert all(refreshed.values())


def test_new_exposure_is_seen_before_refresh(engine: Engine) -> None:
    writer, _, _ = build_store(engine, 7)
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS), channels=("messenger",))
    before = engagement(engine, flt, {})
    # A new contact is exposed on a channel that had no exposure before.
    writer.write(
        [
            ev.Exposure(
                channel="messenger",
                occurred_at=T0 + timedelta(days=3, minutes=15),
                key="new-exposure",
                user_id="newcomer",
                kind="open",
            )
        ]
    )
    after = engagement(engine, flt, {})
    with raw_only():
        expected = engagement(engine, flt, {})
    assert after == expected
    row = after["users"]["channels"][0]
    assert row["exposed_users"] == before["users"]["channels"][0]["exposed_users"] + 1
    refresh(engine)
    assert engagement(engine, flt, {}) == expected


def test_engagement_unsupported_filters_read_raw(engine: Engine) -> None:
    build_store(engine, 9)
    refresh(engine)
    since, until = T0 + timedelta(days=7), T0 + timedelta(days=35)
    unsupported = [
        MetricFilter(since=since, until=until, attributes={"plan": "pro"}),
        MetricFilter(since=since, until=until, group_by=GroupBy("attr", "plan")),
        MetricFilter(since=since),
    ]
    for flt in unsupported:
        assert engagement_counts(engine, flt) is None
        with raw_only():
            expected = engagement(engine, flt, {})
        assert engagement(engine, flt, {}) == expected


def _starts(flt: MetricFilter, period: str) -> list[datetime]:
    assert flt.since_ms is not None and flt.until_ms is not None
    return bucket_range(flt.since_ms, flt.until_ms, period, flt.tz)


def test_retention_reads_rollups_where_supported(engine: Engine) -> None:
    build_store(engine, 13)
    refresh(engine)
    since, until = T0 + timedelta(days=7), T0 + timedelta(days=35)
    supported = [
        MetricFilter(since=since, until=until),
        MetricFilter(since=since, until=until, channels=("web",), group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, tz=ZoneInfo("Asia/Kathmandu")),
    ]
    for flt in supported:
        counted = retention_counts(engine, flt, _starts(flt, "week"), "week")
        assert counted is not None, flt.describe()
        assert counted[0][None].sizes, flt.describe()
    unsupported = [
        MetricFilter(since=since, until=until, channels=("web", "whatsapp")),
        MetricFilter(since=since, until=until, attributes={"plan": "pro"}),
        MetricFilter(since=since, until=until, group_by=GroupBy("attr", "plan")),
    ]
    for flt in unsupported:
        assert retention_counts(engine, flt, _starts(flt, "week"), "week") is None
        with raw_only():
            expected = retention(engine, flt, {})
        assert retention(engine, flt, {}) == expected
    with raw_only():
        expected = retention(engine, MetricFilter(since=since), {})
    assert retention(engine, MetricFilter(since=since), {})["cohorts"] == expected["cohorts"]


def test_retention_counts_by_hand(engine: Engine) -> None:
    writer = Writer(engine)
    day = timedelta(days=1)

    def start(key: str, user: str, channel: str, at: datetime) -> ev.Message:
        return ev.Message(
            channel=channel,
            occurred_at=at,
            key=key,
            role="user",
            user_id=user,
            text="hi",
            conversation_id=key,
        )

    week = T0 + timedelta(days=7)
    writer.write(
        [
            start("a1", "a", "web", week),  # cohort 0, back in the same week and in week 2
            start("a2", "a", "web", week + 2 * day),
            start("a3", "a", "web", week + 14 * day),
            start("b1", "b", "web", week - timedelta(milliseconds=1)),  # before the window
            start("b2", "b", "web", week + 7 * day),
            start("c1", "c", "web", week + 7 * day - timedelta(milliseconds=1)),  # cohort 0
            start("c2", "c", "web", week + 7 * day),  # back in week 1, on its first millisecond
        ]
    )
    refresh(engine)
    flt = MetricFilter(since=week, until=week + 21 * day)
    result = retention(engine, flt, {"periods": 3})
    first = result["cohorts"][0]
    assert first["users"] == 2
    assert first["returned_same_period"] == 1
    assert [cell["users"] for cell in first["following"]] == [1, 1, None]
    assert [cohort["users"] for cohort in result["cohorts"]] == [2, 0, 0]
    with raw_only():
        assert retention(engine, flt, {"periods": 3}) == result


def test_empty_store_matches_raw(engine: Engine) -> None:
    refresh(engine)
    for flt in _filters()[:2]:
        with raw_only():
            expected = (retention(engine, flt, {}), engagement(engine, flt, {}))
        assert (retention(engine, flt, {}), engagement(engine, flt, {})) == expected


def test_start_moved_without_message_at_old_start(engine: Engine) -> None:
    writer = Writer(engine)
    day = timedelta(days=1)
    week = T0 + timedelta(days=7)
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=week,
                key="m1",
                role="user",
                user_id="u2",
                text="hi",
                conversation_id="c1",
            ),
            ev.ConversationUpdate(
                channel="web",
                occurred_at=week + 8 * day,
                user_id="u2",
                conversation_id="c2",
                step="welcome",
            ),
        ]
    )
    refresh(engine)
    # The first message of c2 moves its start to the third week; nothing marks the old
    # start slot dirty.
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=week + 15 * day,
                key="m2",
                role="user",
                user_id="u2",
                text="hi",
                conversation_id="c2",
            )
        ]
    )
    refresh(engine)
    flt = MetricFilter(since=week, until=week + 21 * day)
    with raw_only():
        expected = (retention(engine, flt, {}), engagement(engine, flt, {}))
    assert (retention(engine, flt, {}), engagement(engine, flt, {})) == expected
