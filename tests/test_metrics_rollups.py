"""Metrics computed from rollups equal the same metrics computed from raw rows.

Each check computes a metric twice, once with rollups and once from raw rows only
(``raw_only``), on stores with late messages, duplicate messages, messages on slot and
bucket edges, before and after a refresh, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from rollup_helpers import (
    ACTIVITY_METRICS,
    CHANNELS,
    ESTIMATED_METRICS,
    assert_close,
    assert_fully_served,
    assert_rebuild_matches,
    coverage_of,
    duplicate_messages,
    edge_time,
    hold_back_first,
    table_rows,
)
from sqlalchemy import Engine, func, select, update
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.cli import app as cli_app
from chatmw.metrics.channels import channel_performance
from chatmw.metrics.contact_sets import SOURCES, count_distinct, decode
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.growth import growth
from chatmw.metrics.rollup_query import cover, raw_only
from chatmw.metrics.rollup_refresh import REBUILD_LEASE_MS, Refresher, invalidate, refresh
from chatmw.security.erasure import erase_person
from chatmw.store.models import Contact, Conversation, Message
from chatmw.store.models_rollups import (
    SLOT_MS,
    RollupContactSets,
    RollupFirsts,
    RollupMessages,
    RollupParticipants,
    RollupResponses,
    RollupStarted,
    RollupStarters,
    RollupState,
    RollupUsers,
)
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 29, 0, 0, tzinfo=UTC)  # Europe/Paris moves to summer time on 31 March
ZONES = ("UTC", "Europe/Paris", "America/St_Johns", "Asia/Kathmandu", "Australia/Adelaide")
ROLES = ("user", "user", "bot", "agent")
STARTED_TABLES = (RollupStarted, RollupParticipants, RollupResponses)

METRICS = {
    name: ACTIVITY_METRICS[name]
    for name in (
        "volume-day",
        "volume-hour",
        "volume-week",
        "heatmap",
        "growth-day",
        "growth-week",
        "growth-month",
    )
}
# Metrics whose percentiles rollups estimate: every other figure must be equal.
ESTIMATED = {
    **ESTIMATED_METRICS,
    "channels": lambda engine, flt: channel_performance(engine, flt, {}),
}


def _conversation(rng: random.Random, number: int, start: datetime) -> list[ev.Message]:
    channel = CHANNELS[number % len(CHANNELS)]
    messages = []
    at = start
    for step in range(rng.randint(1, 6)):
        kind = "reaction" if rng.random() < 0.1 else "message"
        messages.append(
            ev.Message(
                channel=channel,
                occurred_at=at,
                key=f"m{number}-{step}",
                role="user" if step == 0 else rng.choice(ROLES),
                kind=kind,
                user_id=f"user{rng.randrange(25)}",
                text="x",
                conversation_id=f"c{number}",
            )
        )
        at = at + timedelta(milliseconds=rng.choice([1, 1000, 60_000, SLOT_MS, 7_200_000]))
    return messages


def build_store(engine: Engine, seed: int = 3) -> tuple[Writer, list[ev.Message]]:
    """Write 120 conversations; return the writer and late events kept back for later."""
    rng = random.Random(seed)
    writer = Writer(engine)
    written: list[ev.Message] = []
    held_back: list[ev.Message] = []
    for number in range(120):
        # The first message of every fifth conversation arrives late, moving its start.
        messages = _conversation(rng, number, edge_time(rng, T0, 5))
        written.extend(hold_back_first(messages, held_back, number % 5 == 0))
    rng.shuffle(written)
    writer.write(written[:300])
    writer.write(written[300:])
    return writer, held_back


def later_events(writer: Writer, held_back: list[ev.Message], seed: int = 5) -> None:
    """Write the late first messages, duplicates of stored ones and new conversations."""
    rng = random.Random(seed)
    fresh = [
        m for number in range(200, 215) for m in _conversation(rng, number, edge_time(rng, T0, 5))
    ]
    duplicates = duplicate_messages(range(1, 120, 7), T0, "m{}-0", "c{}", user="user0", text="x")
    writer.write(held_back + duplicates + fresh)


def filters() -> list[MetricFilter]:
    windows = [
        (T0, T0 + timedelta(days=5)),
        (T0 + timedelta(hours=10, minutes=7, seconds=13), T0 + timedelta(days=3, hours=5)),
        (T0 + timedelta(minutes=3), T0 + timedelta(minutes=11)),
    ]
    result = []
    for zone in ZONES:
        tz = ZoneInfo(zone)
        for since, until in windows:
            result.append(MetricFilter(since=since, until=until, tz=tz))
        since, until = windows[0]
        result.append(MetricFilter(since=since, until=until, tz=tz, group_by=GroupBy("channel")))
        result.append(MetricFilter(since=since, until=until, tz=tz, channels=("web", "messenger")))
        result.append(
            MetricFilter(
                since=since, until=until, tz=tz, channels=("web",), group_by=GroupBy("channel")
            )
        )
    return result


def assert_same_as_raw(engine: Engine) -> None:
    for flt in filters():
        for name, compute in METRICS.items():
            with raw_only():
                expected = compute(engine, flt)
            assert compute(engine, flt) == expected, (name, flt.describe())
        for name, compute in ESTIMATED.items():
            with raw_only():
                expected = compute(engine, flt)
            assert_close(compute(engine, flt), expected, f"{name} {flt.describe()}")


def test_rollups_match_raw_before_refresh(engine: Engine) -> None:
    build_store(engine)
    assert_same_as_raw(engine)


def test_rollups_match_raw_after_refresh(engine: Engine) -> None:
    build_store(engine)
    report = refresh(engine)
    assert report.rebuilt
    coverage = coverage_of(engine, MetricFilter(since=T0, until=T0 + timedelta(days=5)))
    assert coverage is not None
    assert len(coverage.served) == 5 * 24 * 4
    assert coverage.raw == []
    with engine.connect() as connection:
        for zone in ZONES:
            # Every zone of the checks (+05:45 and -02:30 included) is served in full.
            flt = MetricFilter(since=T0, until=T0 + timedelta(days=5), tz=ZoneInfo(zone))
            zoned = cover(connection, flt)
            assert zoned is not None, zone
            assert zoned.raw == [], zone
        # Whole UTC days are counted from the day sets, not from the slot rows.
        assert coverage is not None
        spans = {0: (coverage.first_slot, coverage.end_slot)}
        counted = count_distinct(connection, "users", spans, coverage.served, (), [])
        assert counted is not None
        users = select(func.count(func.distinct(RollupUsers.contact_id)))
        assert counted[1][0] == connection.execute(users).scalar_one()
    assert_same_as_raw(engine)


def test_rollups_match_raw_with_late_and_duplicate_events(engine: Engine) -> None:
    writer, held_back = build_store(engine)
    refresh(engine)
    later_events(writer, held_back)
    # Not refreshed yet: the slots the new messages touch are read from raw rows.
    coverage = coverage_of(engine, MetricFilter(since=T0, until=T0 + timedelta(days=5)))
    assert coverage is not None
    assert coverage.raw
    assert_same_as_raw(engine)

    report = refresh(engine)
    assert not report.rebuilt
    assert report.slots > 0
    assert_fully_served(engine, MetricFilter(since=T0, until=T0 + timedelta(days=5)))
    assert_same_as_raw(engine)


def test_refresh_matches_rebuild(engine: Engine) -> None:
    writer, held_back = build_store(engine)
    refresh(engine)
    later_events(writer, held_back)
    refresh(engine)
    started = table_rows(engine, STARTED_TABLES)
    assert all(started.values())
    sets = _contact_sets(engine)
    kinds = {key[0] for key in sets}
    assert {"users", "starters", "participants", "writers"} <= kinds
    assert kinds <= set(SOURCES)
    assert_rebuild_matches(engine, _rollup_rows)
    rebuilt = table_rows(engine, STARTED_TABLES)
    for table in STARTED_TABLES:
        assert rebuilt[table.__tablename__] == started[table.__tablename__], table.__tablename__
    assert _contact_sets(engine) == sets


def _contact_sets(engine: Engine) -> dict[tuple[str, int, int, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                RollupContactSets.kind,
                RollupContactSets.level,
                RollupContactSets.start_ms,
                RollupContactSets.channel,
                RollupContactSets.contacts,
            )
        )
        return {(kind, level, start, channel): decode(blob)
                for kind, level, start, channel, blob in rows}


def _rollup_rows(engine: Engine) -> list[tuple[int, int, str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                RollupMessages.start_slot_ms,
                RollupMessages.slot_ms,
                RollupMessages.channel,
                RollupMessages.messages,
            ).order_by(RollupMessages.start_slot_ms, RollupMessages.slot_ms, RollupMessages.channel)
        )
        return [tuple(row) for row in rows]


def test_unservable_queries_read_raw_rows(engine: Engine) -> None:
    build_store(engine)
    refresh(engine)
    window = {"since": T0, "until": T0 + timedelta(days=2)}
    with engine.connect() as connection:
        assert cover(connection, MetricFilter(**window, attributes={"company": "x"})) is None
        assert cover(connection, MetricFilter(**window, group_by=GroupBy("attr", "plan"))) is None
        assert cover(connection, MetricFilter(since=T0)) is None
        # Liberia kept the offset -00:44:30 until 1972: no slot is served, all rows are raw.
        old = datetime(1971, 1, 1, tzinfo=UTC)
        flt = MetricFilter(since=old, until=old + timedelta(days=3), tz=ZoneInfo("Africa/Monrovia"))
        coverage = cover(connection, flt)
        assert coverage is not None
        assert coverage.served == set()
        assert coverage.raw == [(flt.since_ms, flt.until_ms)]


def test_invalidate_falls_back_until_refresh(engine: Engine) -> None:
    build_store(engine)
    refresh(engine)
    with engine.begin() as connection:
        # Deleted raw rows are invisible to the refresher until the rollups are invalidated.
        connection.execute(Message.__table__.delete().where(Message.key.like("m1%")))
    invalidate(engine)
    with engine.connect() as connection:
        assert cover(connection, MetricFilter(since=T0, until=T0 + timedelta(days=5))) is None
    assert refresh(engine).rebuilt
    assert_same_as_raw(engine)


def test_rollups_cli_refresh(database_url: str, engine: Engine) -> None:
    build_store(engine)
    result = CliRunner().invoke(cli_app, ["rollups", "refresh", "--db", database_url])
    assert result.exit_code == 0, result.output
    assert "rebuilt" in result.output
    with engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(RollupMessages)).scalar_one()
    assert count > 0


def test_erasure_removes_rollup_rows(engine: Engine) -> None:
    build_store(engine)
    refresh(engine)
    with engine.connect() as connection:
        contact_id = connection.execute(
            select(Contact.id).where(Contact.channel == "web", Contact.external_id == "user3")
        ).scalar_one()
    report = erase_person(engine, "web", "user3")
    assert report.removed["rollup_users"] > 0
    with engine.connect() as connection:
        for table in (RollupUsers, RollupStarters, RollupFirsts, RollupParticipants):
            left = select(func.count()).where(table.contact_id == contact_id)
            assert connection.execute(left).scalar_one() == 0, table.__tablename__
        window = MetricFilter(since=T0, until=T0 + timedelta(days=5))
        assert cover(connection, window) is None
    assert refresh(engine).rebuilt
    assert_same_as_raw(engine)


def test_refresher_thread_builds_rollups(engine: Engine) -> None:
    build_store(engine)
    refresher = Refresher(engine, interval_s=3600)
    refresher.start()
    refresher.stop()
    assert_fully_served(engine, MetricFilter(since=T0, until=T0 + timedelta(days=5)))
    assert_same_as_raw(engine)


def test_refresher_rejects_bad_interval(engine: Engine) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Refresher(engine, interval_s=0)


def test_refresh_waits_for_running_rebuild(engine: Engine) -> None:
    build_store(engine)
    now_ms = 10 * REBUILD_LEASE_MS
    invalidate(engine)  # creates the state row where the fixture emptied the tables
    with engine.begin() as connection:
        # Another process claimed a rebuild a minute ago.
        claim = {"built": False, "rebuild_token": "other", "rebuild_started_at_ms": now_ms - 60_000}
        connection.execute(update(RollupState).values(**claim))
    report = refresh(engine, now_ms=now_ms)
    assert not report.rebuilt
    with engine.connect() as connection:
        assert cover(connection, MetricFilter(since=T0, until=T0 + timedelta(days=5))) is None

    # A claim older than the lease is taken over.
    assert refresh(engine, now_ms=now_ms + REBUILD_LEASE_MS).rebuilt
    assert_same_as_raw(engine)


def test_new_users_across_channels(engine: Engine) -> None:
    build_store(engine)
    with engine.begin() as connection:
        rows = connection.execute(
            select(Conversation.id, Conversation.channel, Conversation.contact_id,
                   Conversation.started_at_ms).order_by(Conversation.id)
        ).all()
        web = next(row for row in rows if row.channel == "web")
        others = [row for row in rows if row.channel != "web"]
        # One contact's conversations on other channels: one at its first start (a tie
        # between two channels), one later, and one earlier on a third contact.
        tie, later = others[0], next(row for row in others if row.channel != others[0].channel)
        connection.execute(update(Conversation).where(Conversation.id == tie.id).values(
            contact_id=web.contact_id, started_at_ms=web.started_at_ms))
        connection.execute(update(Conversation).where(Conversation.id == later.id).values(
            contact_id=web.contact_id, started_at_ms=web.started_at_ms + 3 * 86_400_000))
    invalidate(engine)
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        ranks = dict(connection.execute(
            select(RollupFirsts.channel, RollupFirsts.first_rank)
            .where(RollupFirsts.contact_id == web.contact_id)
        ).all())
    assert sorted(ranks.values()) == [0, 1, 2]
    assert ranks[later.channel] == 2
    for flt in filters():
        for period in ("day", "week"):
            with raw_only():
                expected = growth(engine, flt, {"period": period})
            assert growth(engine, flt, {"period": period}) == expected, flt.describe()
