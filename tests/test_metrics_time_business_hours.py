"""Business hours: schedule parsing, business seconds, and the response-time-business metric.

The reference counts business time minute by minute from the wall clock, independently of
the interval arithmetic of :mod:`chatmw.business_hours`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tomllib
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.api import create_metrics_router
from chatmw.business_hours import DAYS, BusinessHours, parse_inline
from chatmw.metrics import REGISTRY, parse_filter
from chatmw.metrics.business_hours import use_business_hours
from chatmw.metrics.registry import parse_options
from chatmw.store.engine import make_engine
from chatmw.store.writer import Writer

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def reference_open(
    moment: datetime,
    tz: ZoneInfo,
    week: dict[str, list[tuple[int, int]]],
    closed: set[date] = frozenset(),
) -> bool:
    """Return whether ``moment`` is in business hours, from the local wall clock."""
    local = moment.astimezone(tz)
    minute = local.hour * 60 + local.minute
    today, yesterday = local.date(), local.date() - timedelta(days=1)
    for start, end in week.get(DAYS[today.weekday()], []) if today not in closed else []:
        if (start < end and start <= minute < end) or (end <= start and minute >= start):
            return True
    for start, end in week.get(DAYS[yesterday.weekday()], []) if yesterday not in closed else []:
        if end <= start and minute < end:
            return True
    return False


def reference_business_seconds(
    start: datetime,
    end: datetime,
    tz: ZoneInfo,
    week: dict[str, list[tuple[int, int]]],
    closed: set[date] = frozenset(),
) -> int:
    """Count business seconds minute by minute; ``start`` and ``end`` lie on whole minutes."""
    total, moment = 0, start
    while moment < end:
        if reference_open(moment, tz, week, closed):
            total += 60
        moment += timedelta(minutes=1)
    return total


# Schedules


def test_periods_crossing_midnight_and_dst() -> None:
    hours = parse_inline("mon-fri 09:00-17:00; sat 22:00-02:00", "America/New_York").default
    start = datetime(2024, 3, 8, 8, tzinfo=NY)  # Friday 08:00 EST
    end = datetime(2024, 3, 11, 11, tzinfo=NY)  # Monday 11:00 EDT
    # Friday 8 h, Saturday 22:00 to Sunday 02:00 (when clocks jump to 03:00) 4 h, Monday 2 h.
    assert hours.business_ms(ms(start), ms(end)) == 14 * 3_600_000


def test_fall_back_night_is_one_hour_longer() -> None:
    hours = parse_inline("sat 22:00-04:00", "America/New_York").default
    start = datetime(2024, 11, 2, 20, tzinfo=NY)
    end = datetime(2024, 11, 3, 6, tzinfo=NY)
    assert hours.business_ms(ms(start), ms(end)) == 7 * 3_600_000


def test_closed_dates_and_channel_overrides(tmp_path) -> None:
    path = tmp_path / "hours.toml"
    path.write_text(
        'timezone = "Europe/Paris"\nclosed = ["2024-12-25"]\n'
        '[hours]\nmon-fri = ["09:00-12:30", "13:30-18:00"]\n'
        '[channels.whatsapp]\ntimezone = "America/New_York"\n'
        '[channels.whatsapp.hours]\nmon-sun = ["00:00-24:00"]\n'
    )
    hours = BusinessHours.from_toml(path)
    christmas = datetime(2024, 12, 25, tzinfo=PARIS)
    assert (
        hours.for_channel("web").business_ms(ms(christmas), ms(christmas + timedelta(days=1))) == 0
    )
    tuesday = datetime(2024, 12, 24, tzinfo=PARIS)
    assert (
        hours.for_channel("web").business_ms(ms(tuesday), ms(tuesday + timedelta(days=1)))
        == 8 * 3_600_000
    )
    # The override keeps the top-level closed dates but has its own zone and hours.
    assert hours.for_channel("whatsapp").tz.key == "America/New_York"
    ny_christmas = datetime(2024, 12, 25, tzinfo=NY)
    assert (
        hours.for_channel("whatsapp").business_ms(
            ms(ny_christmas), ms(ny_christmas + timedelta(days=1))
        )
        == 0
    )
    ny_day = datetime(2024, 12, 27, tzinfo=NY)
    assert (
        hours.for_channel("whatsapp").business_ms(ms(ny_day), ms(ny_day + timedelta(days=1)))
        == 24 * 3_600_000
    )


@pytest.mark.parametrize(
    ("data", "setting"),
    [
        ({"hours": {"mon": ["25:00-26:00"]}}, "business_hours.hours.mon[0]"),
        ({"hours": {"mon": ["9-17"]}}, "business_hours.hours.mon[0]"),
        ({"hours": {"mon": ["09:00-09:00"]}}, "business_hours.hours.mon[0]"),
        ({"hours": {"monday": ["09:00-17:00"]}}, "business_hours.hours.monday"),
        (
            {"hours": {"mon-fri": ["09:00-17:00"], "fri": ["10:00-11:00"]}},
            "business_hours.hours.fri",
        ),
        ({"hours": {"mon": "09:00-17:00"}, "timezone": "Mars/Olympus"}, "business_hours.timezone"),
        ({"hours": {"mon": ["09:00-17:00"]}, "closed": ["2024-13-01"]}, "business_hours.closed[0]"),
        ({"hours": {"mon": ["09:00-17:00"]}, "opening": 1}, "business_hours.opening"),
        ({"timezone": "UTC"}, "business_hours.hours"),
        (
            {"hours": {"mon": ["09:00-17:00"]}, "channels": {"web": {"hours": {"tue": ["x"]}}}},
            "business_hours.channels.web.hours.tue[0]",
        ),
        (
            {"hours": {"mon": ["09:00-17:00"]}, "channels": {"web": {"tz": "UTC"}}},
            "business_hours.channels.web.tz",
        ),
    ],
)
def test_invalid_config_names_setting(data: dict, setting: str) -> None:
    with pytest.raises(ValueError) as raised:
        BusinessHours.from_mapping(data)
    assert str(raised.value).startswith(setting + ":")


def test_invalid_toml_names_file(tmp_path) -> None:
    path = tmp_path / "hours.toml"
    path.write_text("hours = [")
    with pytest.raises(ValueError, match="business_hours file"):
        BusinessHours.from_toml(path)


@pytest.mark.parametrize("seed", range(4))
def test_business_seconds_match_minute_walk(seed: int) -> None:
    rng = random.Random(seed)
    week = {
        "mon": [(8 * 60, 12 * 60), (13 * 60, 17 * 60 + 30)],
        "tue": [(9 * 60, 17 * 60)],
        "wed": [(22 * 60, 6 * 60)],
        "thu": [(0, 24 * 60)],
        "fri": [(9 * 60, 13 * 60), (20 * 60, 2 * 60)],
        "sat": [(23 * 60, 1 * 60)],
        "sun": [],
    }
    text = "; ".join(
        f"{day} "
        + ",".join(f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}" for a, b in periods)
        for day, periods in week.items()
        if periods
    )
    schedule = parse_inline(text, "America/New_York").default
    for _ in range(15):
        base = datetime(2024, rng.choice([3, 11]), rng.randint(1, 12), tzinfo=UTC)
        start = base + timedelta(minutes=rng.randrange(3 * 24 * 60))
        end = start + timedelta(minutes=rng.randrange(2 * 24 * 60))
        expected = reference_business_seconds(start, end, NY, week)
        assert schedule.business_ms(ms(start), ms(end)) == expected * 1000, (start, end)


# The metric


def compute(engine: Engine, **params: str) -> dict:
    spec = REGISTRY["response-time-business"]
    query = {name: [value] for name, value in params.items()}
    flt = parse_filter(query, allowed=[param.name for param in spec.params])
    return spec.compute(engine, flt, parse_options(spec, query))


def generate(seed: int) -> tuple[list[ev.Message], list[dict]]:
    """Return messages and, per answer, its role, calendar seconds and whether it is first."""
    rng = random.Random(seed)
    messages, answers = [], []
    for number in range(20):
        start = datetime(2024, 3, 7, tzinfo=UTC) + timedelta(minutes=rng.randrange(6 * 24 * 60))
        at = start
        for turn in range(rng.randint(1, 3)):
            role = rng.choice(["bot", "agent"])
            delay = timedelta(minutes=rng.randrange(1, 20 * 60))
            messages.append(
                ev.Message(
                    channel="web",
                    occurred_at=at,
                    key=f"{number}-u{turn}",
                    role="user",
                    user_id=f"u{number}",
                    text="hi",
                    conversation_id=f"c{number}",
                )
            )
            messages.append(
                ev.Message(
                    channel="web",
                    occurred_at=at + delay,
                    key=f"{number}-a{turn}",
                    role=role,
                    user_id=f"u{number}",
                    text="hello",
                    conversation_id=f"c{number}",
                )
            )
            answers.append({"role": role, "start": at, "end": at + delay, "first": turn == 0})
            at = at + delay + timedelta(minutes=rng.randrange(1, 90))
    return messages, answers


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered), 3) if ordered else None,
        "max": ordered[-1] if ordered else None,
    }


def test_metric_matches_reference(engine: Engine) -> None:
    messages, answers = generate(seed=5)
    Writer(engine).write(messages)
    text = "mon-fri 09:00-17:00; sat 22:00-02:00"
    week = {
        "mon": [(540, 1020)],
        "tue": [(540, 1020)],
        "wed": [(540, 1020)],
        "thu": [(540, 1020)],
        "fri": [(540, 1020)],
        "sat": [(1320, 120)],
    }
    result = compute(engine, hours=text, hours_tz="America/New_York")
    assert result["business_hours"]["source"] == "request"
    assert result["business_hours"]["timezone"] == "America/New_York"
    for figure in ("reply_time", "first_response"):
        chosen = [a for a in answers if figure == "reply_time" or a["first"]]
        for role in ("all", "bot", "agent"):
            subset = [a for a in chosen if role == "all" or a["role"] == role]
            calendar = stats([(a["end"] - a["start"]).total_seconds() for a in subset])
            business = stats(
                [float(reference_business_seconds(a["start"], a["end"], NY, week)) for a in subset]
            )
            for basis, expected in (("calendar", calendar), ("business", business)):
                got = result[figure][basis][role]
                assert got["count"] == expected["count"], (figure, basis, role)
                assert got["mean"] == pytest.approx(expected["mean"], abs=1e-3), (
                    figure,
                    basis,
                    role,
                )
                assert got["max"] == expected["max"], (figure, basis, role)


def test_installed_hours_are_used(engine: Engine) -> None:
    messages, answers = generate(seed=6)
    Writer(engine).write(messages)
    everything = BusinessHours.from_mapping({"hours": {"mon-sun": ["00:00-24:00"]}})
    use_business_hours(everything)
    try:
        result = compute(engine)
    finally:
        use_business_hours(None)
    assert result["business_hours"]["source"] == "configured"
    assert result["reply_time"]["business"]["all"] == result["reply_time"]["calendar"]["all"]
    assert compute(engine)["business_hours"]["source"] == "default"


def test_empty_window_gives_null(engine: Engine) -> None:
    result = compute(engine, since="2030-01-01", until="2030-01-02")
    assert result["first_response"]["business"]["all"]["count"] == 0
    assert result["first_response"]["business"]["all"]["mean"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("hours=mon+25:00-26:00", "hours"),
        ("hours=mon-fri+09:00-17:00&hours_tz=Nowhere/City", "hours_tz"),
        ("hours_tz=UTC", "hours_tz"),
        ("hours=funday+09:00-10:00", "hours"),
    ],
)
def test_api_rejects_invalid_hours(query: str, param: str, tmp_path) -> None:
    # Parameters are checked before any query, so an unmigrated SQLite file serves.
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    app = FastAPI()
    app.include_router(create_metrics_router(engine))

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(f"/metrics/response-time-business?{query}")

    response = asyncio.run(fetch())
    engine.dispose()
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", param]


def test_channel_schedule_applies_to_its_answers(engine: Engine) -> None:
    messages, _ = generate(seed=7)
    Writer(engine).write(messages)
    hours = BusinessHours.from_mapping(
        {
            "hours": {"mon": ["00:00-00:01"]},
            "channels": {"web": {"hours": {"mon-sun": ["00:00-24:00"]}}},
        }
    )
    use_business_hours(hours)
    try:
        result = compute(engine)
    finally:
        use_business_hours(None)
    assert result["business_hours"]["channels"]["web"]["hours"]["tue"] == ["00:00-24:00"]
    assert result["reply_time"]["business"]["all"] == result["reply_time"]["calendar"]["all"]


def test_documented_example_parses() -> None:
    description = REGISTRY["response-time-business"].description
    example = description.split("```toml\n")[1].split("```")[0]
    hours = BusinessHours.from_mapping(tomllib.loads(example)["business_hours"])
    assert hours.default.tz.key == "Europe/Paris"
    assert hours.for_channel("whatsapp").tz.key == "America/New_York"
    assert hours.describe()["hours"]["sat"] == ["22:00-02:00"]
