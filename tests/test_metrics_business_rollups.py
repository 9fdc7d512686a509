"""response-time-business from rollups equals the metric from raw rows.

Stores span the 2024 daylight-saving change of New York, a closed date, periods that
cross midnight and a per-channel schedule. Rollup answers are compared with raw answers
(``raw_only`` and ``exact=true``) before and after refreshes, with late and duplicate
messages, on SQLite and PostgreSQL. Percentiles may differ by the histogram's bound.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from rollup_helpers import (
    CHANNELS,
    assert_close,
    assert_rebuild_matches,
    duplicate_messages,
    hold_back_first,
    window_filters,
)
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.app import mount_chatmw
from chatmw.business_hours import DEFAULT_BUSINESS_HOURS, BusinessHours, parse_inline
from chatmw.cli import app as cli_app
from chatmw.config import Settings
from chatmw.metrics.business_hours import (
    response_time_business,
    rolled_histograms,
    use_business_hours,
)
from chatmw.metrics.business_rollups import (
    claim_business_for_rebuild,
    finish_business_rebuild,
    read_schedule,
    register_business_hours,
)
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.response_time import response_times
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.runtime import Runtime
from chatmw.security.erasure import erase_person
from chatmw.store.models import Message
from chatmw.store.models_rollups import RollupBusinessResponses
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 6, tzinfo=UTC)  # a Wednesday; New York changes to summer time 03-10
DAYS = 8
REGISTERED = BusinessHours.from_mapping(
    {
        "timezone": "America/New_York",
        "closed": ["2024-03-11"],
        "hours": {"mon-fri": ["09:00-12:30", "13:30-18:00"], "sat": ["22:00-02:00"]},
        "channels": {
            "whatsapp": {"timezone": "Europe/Paris", "hours": {"mon-sun": ["20:00-04:00"]}},
            "messenger": {"timezone": "Europe/Paris", "hours": {"mon-sun": ["20:00-04:00"]}},
        },
    }
)
GAPS_MS = (1, 900, 45_000, 900_000, 3 * 3_600_000, 20 * 3_600_000)


@pytest.fixture
def installed() -> Iterator[None]:
    use_business_hours(REGISTERED)
    try:
        yield
    finally:
        use_business_hours(None)


def _conversation(rng: random.Random, number: int) -> list[ev.Message]:
    start = T0 + timedelta(
        minutes=rng.randrange(DAYS * 24 * 60), milliseconds=rng.randrange(60_000)
    )
    messages, at = [], start
    for step in range(rng.randint(1, 8)):
        role = "user" if step == 0 or rng.random() < 0.45 else rng.choice(("bot", "agent"))
        messages.append(
            ev.Message(
                channel=CHANNELS[number % 3],
                occurred_at=at,
                key=f"b{number}-{step}",
                role=role,
                user_id=f"u{rng.randrange(30)}",
                text="where is my order",
                conversation_id=f"b{number}",
            )
        )
        at = at + timedelta(milliseconds=rng.choice(GAPS_MS) + rng.randrange(1000))
    return messages


def _filters() -> list[MetricFilter]:
    ragged = (T0 + timedelta(hours=7, minutes=3, seconds=5), T0 + timedelta(days=5, minutes=44))
    return window_filters(T0, T0 + timedelta(days=DAYS), ragged, "whatsapp")


def _check(engine: Engine, served: bool | None, options: dict[str, str] | None = None) -> None:
    """Compare with the raw path; ``served`` None leaves open whether rollups serve."""
    options = options or {}
    for flt in _filters():
        with raw_only():
            expected = response_time_business(engine, flt, options)
        rolled = response_time_business(engine, flt, options)
        exact = response_time_business(engine, flt, {**options, "exact": "true"})
        assert_close(rolled, expected, str(flt.describe()))
        assert exact == expected, str(flt.describe())
        hours = parse_inline(options["hours"]) if "hours" in options else REGISTERED
        rolled_served = rolled_histograms(engine, flt, hours) is not None
        if served is not None:
            assert rolled_served == served
        # The calendar half is the response-time metric, estimated where rollups serve.
        calendar = response_times(engine, flt, {} if rolled_served else {"exact": "true"})
        for figure in ("first_response", "reply_time"):
            assert {role: rolled[figure]["calendar"][role] for role in calendar[figure]} == (
                calendar[figure]
            )


def _write_store(engine: Engine, seed: int) -> tuple[Writer, list[ev.Message]]:
    rng = random.Random(seed)
    writer = Writer(engine)
    written: list[ev.Message] = []
    late: list[ev.Message] = []
    for number in range(160):
        messages = _conversation(rng, number)
        written.extend(hold_back_first(messages, late, number % 7 == 0, min_messages=3))
    writer.write(written)
    return writer, late


def test_business_rollups_match_raw(engine: Engine, installed: None) -> None:
    assert register_business_hours(engine, REGISTERED)
    writer, late = _write_store(engine, seed=11)
    _check(engine, served=False)
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        rows = connection.execute(
            select(func.count()).select_from(RollupBusinessResponses)
        ).scalar_one()
    assert rows > 0
    _check(engine, served=True)
    result = response_time_business(engine, _filters()[0], {})
    assert result["reply_time"]["business"]["all"]["count"] > 100
    # Business time is below calendar time for some answers, so the figures differ.
    assert result["reply_time"]["business"]["all"] != result["reply_time"]["calendar"]["all"]

    duplicates = duplicate_messages(
        range(1, 160, 13), T0 + timedelta(days=2), "b{}-1", "b{}", role="bot"
    )
    # Late first messages move their conversations' starts and response times. The
    # duplicates log their conversations, so the raw part may outgrow what cover() serves.
    writer.write(late + duplicates)
    _check(engine, served=None)
    assert not refresh(engine).rebuilt
    _check(engine, served=True)


def test_other_schedule_reads_raw(engine: Engine, installed: None) -> None:
    register_business_hours(engine, REGISTERED)
    _write_store(engine, seed=12)
    refresh(engine)
    options = {"hours": "mon-sun 00:00-24:00"}
    _check(engine, served=False, options=options)
    flt = _filters()[1]
    with raw_only():
        expected = response_time_business(engine, flt, options)
    assert response_time_business(engine, flt, options) == expected
    # Business time around the clock is calendar time.
    assert expected["reply_time"]["business"] == expected["reply_time"]["calendar"]


def _business_rows(engine: Engine) -> list[tuple[Any, ...]]:
    table = RollupBusinessResponses
    columns = (
        table.level,
        table.start_ms,
        table.channel,
        table.figure,
        table.role,
        table.bucket,
        table.count,
        table.total_ms,
        table.min_ms,
        table.max_ms,
    )
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(select(*columns)))


def test_schedule_change_rebuilds_table(engine: Engine) -> None:
    _write_store(engine, seed=13)
    # Without a registered schedule the rollups count the default one.
    assert refresh(engine).rebuilt
    flt = _filters()[0]
    assert rolled_histograms(engine, flt, DEFAULT_BUSINESS_HOURS) is not None
    assert parse_inline("mon-fri 09:00-17:00").fingerprint() == DEFAULT_BUSINESS_HOURS.fingerprint()
    assert rolled_histograms(engine, flt, parse_inline("fri-mon 09:00-17:00")) is None
    default_rows = _business_rows(engine)

    assert register_business_hours(engine, REGISTERED)
    assert not register_business_hours(engine, REGISTERED)
    assert rolled_histograms(engine, flt, REGISTERED) is None
    assert rolled_histograms(engine, flt, DEFAULT_BUSINESS_HOURS) is None
    report = refresh(engine)
    assert not report.rebuilt
    with engine.connect() as connection:
        stored = read_schedule(connection)
    assert stored is not None
    assert stored.built
    assert stored.fingerprint == REGISTERED.fingerprint()
    assert BusinessHours.from_canonical_json(stored.schedule).fingerprint() == stored.fingerprint
    assert rolled_histograms(engine, flt, REGISTERED) is not None
    assert _business_rows(engine) != default_rows
    use_business_hours(REGISTERED)
    try:
        _check(engine, served=True)
    finally:
        use_business_hours(None)
    # Counting the new schedule alone gives the rows of a full rebuild.
    assert_rebuild_matches(engine, _business_rows)


def test_schedule_registered_during_rebuild(engine: Engine) -> None:
    _write_store(engine, seed=14)
    refresh(engine)
    with engine.begin() as connection:
        claim_business_for_rebuild(connection, "t1", 0)
    register_business_hours(engine, REGISTERED)
    with engine.begin() as connection:
        finish_business_rebuild(connection, "t1")
        stored = read_schedule(connection)
    assert stored is not None
    assert not stored.built
    assert rolled_histograms(engine, _filters()[0], REGISTERED) is None
    refresh(engine)
    assert rolled_histograms(engine, _filters()[0], REGISTERED) is not None


def _message(at: datetime, conversation: str, role: str, channel: str = "web") -> ev.Message:
    return ev.Message(
        channel=channel,
        occurred_at=at,
        key=f"{conversation}-{role}-{at.isoformat()}",
        role=role,
        user_id=f"user-{conversation}",
        text="hello",
        conversation_id=conversation,
    )


def test_hand_computed_business_times(engine: Engine) -> None:
    register_business_hours(engine, REGISTERED)
    Writer(engine).write(
        [
            # Friday 17:30 EST to Tuesday 09:30 EDT: 30 min on Friday, Saturday 22:00 to
            # 02:00 (which the change to summer time skips, so 4 h), Monday closed, 30 min.
            _message(datetime(2024, 3, 8, 22, 30, tzinfo=UTC), "ny", "user"),
            _message(datetime(2024, 3, 12, 13, 30, tzinfo=UTC), "ny", "agent"),
            # 03:00 to 05:00 Paris time (UTC+1), open 20:00-04:00: one hour.
            _message(datetime(2024, 3, 13, 2, tzinfo=UTC), "fr", "user", "whatsapp"),
            _message(datetime(2024, 3, 13, 4, tzinfo=UTC), "fr", "bot", "whatsapp"),
            # The same night one day earlier: the period starts on the closed date.
            _message(datetime(2024, 3, 12, 2, tzinfo=UTC), "fr2", "user", "messenger"),
            _message(datetime(2024, 3, 12, 4, tzinfo=UTC), "fr2", "bot", "messenger"),
        ]
    )
    assert refresh(engine).rebuilt

    use_business_hours(REGISTERED)
    try:
        flt = MetricFilter(since=T0, until=T0 + timedelta(days=DAYS), group_by=GroupBy("channel"))
        assert rolled_histograms(engine, flt, REGISTERED) is not None
        result = response_time_business(engine, flt, {})
    finally:
        use_business_hours(None)

    groups = {group["group"]: group for group in result["groups"]}
    web = groups["web"]["first_response"]["business"]
    assert web["agent"]["p50"] == web["all"]["max"] == 5 * 3600
    assert web["bot"]["count"] == 0
    assert groups["web"]["first_response"]["calendar"]["all"]["max"] == 3 * 86400 + 15 * 3600
    whatsapp = groups["whatsapp"]["reply_time"]["business"]["bot"]
    assert whatsapp["p95"] == whatsapp["mean"] == 3600
    messenger = groups["messenger"]["reply_time"]
    assert messenger["business"]["all"]["max"] == 0
    assert messenger["calendar"]["all"]["max"] == 7200


@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "America/New_York"])
def test_business_ms_at_end_of_9999(zone: str) -> None:
    schedule = parse_inline("mon-sun 22:00-02:00", zone).default
    last = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)
    # Five whole nights of 4 h end before the last millisecond in each zone.
    assert schedule.business_ms(last - 5 * 86_400_000 - 7_200_000, last - 7_200_000) == (
        5 * 4 * 3_600_000
    )
    assert schedule.intervals(last - 86_400_000, last + 1)


def test_runtime_registers_its_hours(tmp_path) -> None:
    runtime = Runtime.from_settings(
        Settings(database_url=f"sqlite:///{tmp_path / 'runtime.db'}"), privacy=None
    )
    runtime.rollup_interval_s = None
    runtime.business_hours = REGISTERED
    runtime.start()
    try:
        with runtime.engine.connect() as connection:
            stored = read_schedule(connection)
    finally:
        runtime.stop()
        runtime.engine.dispose()
    assert stored is not None
    assert stored.fingerprint == REGISTERED.fingerprint()


def test_mount_sets_runtime_hours(tmp_path) -> None:
    runtime = Runtime.from_settings(
        Settings(database_url=f"sqlite:///{tmp_path / 'mount.db'}"), privacy=None
    )
    try:
        mount_chatmw(FastAPI(), runtime, business_hours=REGISTERED, manage_lifespan=False)
        assert runtime.business_hours is REGISTERED
    finally:
        use_business_hours(None)
        runtime.engine.dispose()


def test_cli_refresh_registers_config_hours(database_url: str, engine: Engine, tmp_path) -> None:
    _write_store(engine, seed=15)
    config = tmp_path / "chatmw.toml"
    config.write_text(
        '[business_hours]\ntimezone = "Asia/Kolkata"\n'
        '[business_hours.hours]\nmon-sat = ["10:00-19:30"]\n'
    )
    configured = BusinessHours.from_mapping(
        {"timezone": "Asia/Kolkata", "hours": {"mon-sat": ["10:00-19:30"]}}
    )
    runner = CliRunner()
    command = ["rollups", "refresh", "--db", database_url]
    result = runner.invoke(cli_app, [*command, "--config", str(config)], env={"CHATMW_CONFIG": ""})
    assert result.exit_code == 0, result.output
    with engine.connect() as connection:
        stored = read_schedule(connection)
    assert stored is not None
    assert stored.fingerprint == configured.fingerprint()
    assert stored.built
    flt = _filters()[0]
    assert rolled_histograms(engine, flt, configured) is not None

    # Without a configuration the default schedule is registered and counted.
    result = runner.invoke(cli_app, command, env={"CHATMW_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert rolled_histograms(engine, flt, configured) is None
    assert rolled_histograms(engine, flt, DEFAULT_BUSINESS_HOURS) is not None


def test_end_update_after_erased_opener(engine: Engine) -> None:
    start = datetime(2024, 3, 7, 10, tzinfo=UTC)
    writer = Writer(engine)
    writer.write([_message(start + timedelta(hours=1), "room", "user")])
    guest = ev.Message(
        channel="web",
        occurred_at=start,
        key="guest-1",
        role="user",
        user_id="guest",
        text="hi",
        conversation_id="room",
    )
    writer.write([guest, _message(start + timedelta(hours=2), "room", "bot")])
    erase_person(engine, "web", "guest")
    assert refresh(engine).rebuilt

    writer.write(
        [
            ev.ConversationUpdate(
                channel="web",
                occurred_at=start + timedelta(hours=5),
                user_id="user-room",
                conversation_id="room",
                ended=True,
            )
        ]
    )
    refresh(engine)

    with engine.connect() as connection:
        answers = connection.execute(
            select(func.count()).select_from(Message).where(Message.response_ms.is_not(None))
        ).scalar_one()
    assert answers == 1
    flt = MetricFilter(since=start, until=start + timedelta(minutes=15))
    with raw_only():
        expected = response_time_business(engine, flt, {})
    assert response_time_business(engine, flt, {}) == expected
