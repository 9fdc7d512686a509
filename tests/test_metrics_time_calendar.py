"""Growth, retention and heat map against references, across daylight-saving changes.

The data lives in America/New_York around 2024-03-10 (clocks go from 02:00 EST to 03:00
EDT) and 2024-11-03 (from 02:00 EDT back to 01:00 EST). The references bucket with plain
``zoneinfo`` date arithmetic, not with chatmw's bucket functions.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.metrics import REGISTRY, parse_filter
from chatmw.metrics.registry import parse_options
from chatmw.store.writer import Writer

NY = ZoneInfo("America/New_York")


def compute(engine: Engine, name: str, **params: str) -> dict:
    spec = REGISTRY[name]
    query = {key: [value] for key, value in params.items()}
    flt = parse_filter(query, allowed=[param.name for param in spec.params])
    return spec.compute(engine, flt, parse_options(spec, query))


def conversation(
    number: int, user: str, start: datetime, channel: str = "web", replies: int = 1
) -> list[ev.Message]:
    """Return a conversation of ``replies`` user-bot exchanges, one minute apart."""
    messages = []
    for turn in range(replies):
        at = start + timedelta(minutes=turn)
        messages.append(
            ev.Message(
                channel=channel,
                occurred_at=at,
                key=f"c{number}-u{turn}",
                role="user",
                user_id=user,
                text="hi",
                conversation_id=f"c{number}",
            )
        )
        messages.append(
            ev.Message(
                channel=channel,
                occurred_at=at + timedelta(seconds=10),
                key=f"c{number}-b{turn}",
                role="bot",
                user_id=user,
                text="hello",
                conversation_id=f"c{number}",
            )
        )
    return messages


def generate(seed: int, first_day: date, days: int, users: int = 25) -> list[dict]:
    """Return conversations (number, user, channel, UTC start, replies) over ``days`` local days."""
    rng = random.Random(seed)
    rows = []
    number = 0
    for user in range(users):
        # A contact is one identity on one channel, so each user keeps to one channel.
        channel = rng.choice(["web", "whatsapp"])
        for _ in range(rng.randint(1, 5)):
            day = first_day + timedelta(days=rng.randrange(days))
            # Local wall times, including the hours that a daylight-saving change skips or repeats.
            local = datetime(
                day.year,
                day.month,
                day.day,
                rng.randrange(24),
                rng.randrange(60),
                tzinfo=NY,
                fold=rng.randrange(2),
            )
            rows.append(
                {
                    "number": number,
                    "user": f"u{user}",
                    "channel": channel,
                    "start": local.astimezone(UTC),
                    "replies": rng.randint(1, 3),
                }
            )
            number += 1
    return rows


def store(engine: Engine, rows: list[dict]) -> None:
    messages = []
    for row in rows:
        messages.extend(
            conversation(row["number"], row["user"], row["start"], row["channel"], row["replies"])
        )
    Writer(engine).write(messages)


def local_midnight(day: date) -> str:
    return datetime(day.year, day.month, day.day, tzinfo=NY).isoformat()


def period_key(moment: datetime, period: str) -> date:
    local = moment.astimezone(NY).date()
    if period == "day":
        return local
    if period == "week":
        return local - timedelta(days=local.weekday())
    return local.replace(day=1)


def period_offset(later: date, earlier: date, period: str) -> int:
    if period == "day":
        return (later - earlier).days
    if period == "week":
        return (later - earlier).days // 7
    return (later.year - earlier.year) * 12 + later.month - earlier.month


# Growth


@pytest.mark.parametrize("period", ["day", "week"])
def test_growth_matches_reference_across_spring_change(engine: Engine, period: str) -> None:
    rows = generate(seed=1, first_day=date(2024, 3, 4), days=14)
    store(engine, rows)
    since, until = "2024-03-04T00:00:00", "2024-03-18T00:00:00"
    result = compute(
        engine, "growth", tz="America/New_York", since=since, until=until, period=period
    )

    firsts: dict[str, datetime] = {}
    for row in rows:
        firsts[row["user"]] = min(firsts.get(row["user"], row["start"]), row["start"])
    expected: dict[date, Counter] = defaultdict(Counter)
    users: dict[date, set] = defaultdict(set)
    new_users: dict[date, set] = defaultdict(set)
    for row in rows:
        key = period_key(row["start"], period)
        expected[key]["conversations"] += 1
        expected[key]["messages"] += 2 * row["replies"]
        users[key].add(row["user"])
        if firsts[row["user"]] == row["start"]:
            new_users[key].add(row["user"])

    days = 14 if period == "day" else 2
    step = 1 if period == "day" else 7
    buckets = [date(2024, 3, 4) + timedelta(days=index * step) for index in range(days)]
    assert [row["bucket"] for row in result["series"]] == [local_midnight(day) for day in buckets]
    previous = None
    for row, day in zip(result["series"], buckets, strict=True):
        assert row["conversations"] == expected[day]["conversations"]
        assert row["messages"] == expected[day]["messages"]
        assert row["users"] == len(users[day])
        assert row["new_users"] == len(new_users[day])
        if previous is not None:
            assert row["conversations_change"] == row["conversations"] - previous["conversations"]
        previous = row
    assert result["totals"]["conversations"] == len(rows)


def test_growth_day_buckets_have_dst_offsets(engine: Engine) -> None:
    # 23:30 local on the 23-hour day is 03:30 UTC on the next day.
    start = datetime(2024, 3, 10, 23, 30, tzinfo=NY)
    store(
        engine,
        [
            {
                "number": 0,
                "user": "a",
                "channel": "web",
                "start": start.astimezone(UTC),
                "replies": 1,
            }
        ],
    )
    result = compute(
        engine,
        "growth",
        tz="America/New_York",
        since="2024-03-09",
        until="2024-03-12",
        period="day",
    )
    assert [row["bucket"] for row in result["series"]] == [
        "2024-03-09T00:00:00-05:00",
        "2024-03-10T00:00:00-05:00",
        "2024-03-11T00:00:00-04:00",
    ]
    assert [row["conversations"] for row in result["series"]] == [0, 1, 0]
    assert result["series"][2]["conversations_change_pct"] == -100.0
    assert result["series"][1]["conversations_change_pct"] is None


def test_growth_empty_window(engine: Engine) -> None:
    result = compute(engine, "growth", since="2024-01-01", until="2024-01-15", period="week")
    assert [row["conversations"] for row in result["series"]] == [0, 0]
    assert all(row["conversations_change_pct"] is None for row in result["series"])
    assert result["totals"]["conversations_first_to_last_pct"] is None
    unbounded = compute(engine, "growth")
    assert unbounded["series"] == []


# Retention


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_retention_matches_reference(engine: Engine, period: str) -> None:
    rows = generate(seed=2, first_day=date(2024, 10, 20), days=30, users=40)
    store(engine, rows)
    since, until = "2024-10-20T00:00:00", "2024-11-10T00:00:00"
    result = compute(
        engine,
        "retention",
        tz="America/New_York",
        since=since,
        until=until,
        period=period,
        periods="6",
    )
    until_utc = datetime(2024, 11, 10, tzinfo=NY).astimezone(UTC)
    since_utc = datetime(2024, 10, 20, tzinfo=NY).astimezone(UTC)

    starts: dict[str, list[datetime]] = defaultdict(list)
    for row in rows:
        if row["start"] < until_utc:
            starts[row["user"]].append(row["start"])
    sizes: Counter = Counter()
    returns: dict[date, Counter] = defaultdict(Counter)
    for times in starts.values():
        times.sort()
        if times[0] < since_utc:
            continue
        cohort = period_key(times[0], period)
        sizes[cohort] += 1
        for offset in {period_offset(period_key(t, period), cohort, period) for t in times[1:]} - {
            0
        }:
            returns[cohort][offset] += 1

    first = period_key(since_utc, period)
    last = period_key(until_utc - timedelta(milliseconds=1), period)
    assert result["cohorts"][0]["cohort"] == local_midnight(first)
    assert result["cohorts"][-1]["cohort"] == local_midnight(last)
    for cohort_row in result["cohorts"]:
        cohort = datetime.fromisoformat(cohort_row["cohort"]).date()
        assert cohort_row["users"] == sizes[cohort], cohort
        for cell in cohort_row["following"]:
            offset = cell["period"]
            if period == "day":
                cell_start = cohort + timedelta(days=offset)
            elif period == "week":
                cell_start = cohort + timedelta(days=7 * offset)
            else:
                month = cohort.month - 1 + offset
                cell_start = date(cohort.year + month // 12, month % 12 + 1, 1)
            if datetime(cell_start.year, cell_start.month, cell_start.day, tzinfo=NY) >= until_utc:
                assert cell["users"] is None
                assert cell["share"] is None
                continue
            assert cell["users"] == returns[cohort][offset], (cohort, offset)
            expected_share = (
                None if sizes[cohort] == 0 else round(returns[cohort][offset] / sizes[cohort], 4)
            )
            assert cell["share"] == expected_share


def test_retention_fall_back_day_counts_once(engine: Engine) -> None:
    # Both 01:30 of 2024-11-03 (EDT, then EST) fall on the same local day.
    first = datetime(2024, 11, 2, 12, 0, tzinfo=NY)
    repeated = [datetime(2024, 11, 3, 1, 30, tzinfo=NY, fold=fold) for fold in (0, 1)]
    rows = [
        {"number": 0, "user": "a", "channel": "web", "start": first.astimezone(UTC), "replies": 1}
    ]
    rows += [
        {
            "number": index + 1,
            "user": "a",
            "channel": "web",
            "start": moment.astimezone(UTC),
            "replies": 1,
        }
        for index, moment in enumerate(repeated)
    ]
    store(engine, rows)
    result = compute(
        engine,
        "retention",
        tz="America/New_York",
        since="2024-11-02",
        until="2024-11-05",
        period="day",
        periods="3",
    )
    cohort = result["cohorts"][0]
    assert cohort["cohort"] == "2024-11-02T00:00:00-04:00"
    assert cohort["users"] == 1
    assert [cell["users"] for cell in cohort["following"]] == [1, 0, None]
    assert [cell["share"] for cell in cohort["following"]] == [1.0, 0.0, None]


def test_retention_empty_cohorts_have_null_shares(engine: Engine) -> None:
    result = compute(
        engine, "retention", since="2024-01-01", until="2024-01-03", period="day", periods="2"
    )
    assert [row["users"] for row in result["cohorts"]] == [0, 0]
    assert result["cohorts"][0]["following"] == [
        {"period": 1, "users": 0, "share": None},
        {"period": 2, "users": None, "share": None},
    ]


def test_retention_rejects_too_many_periods(engine: Engine) -> None:
    with pytest.raises(ValueError, match="periods"):
        compute(engine, "retention", periods="61")


# Heat map


def test_heatmap_matches_reference(engine: Engine) -> None:
    rows = generate(seed=3, first_day=date(2024, 11, 1), days=7, users=30)
    store(engine, rows)
    result = compute(engine, "heatmap", tz="America/New_York")
    conversations = [[0] * 24 for _ in range(7)]
    messages = [[0] * 24 for _ in range(7)]
    for row in rows:
        local = row["start"].astimezone(NY)
        conversations[local.weekday()][local.hour] += 1
        for turn in range(row["replies"]):
            for seconds in (turn * 60, turn * 60 + 10):
                at = (row["start"] + timedelta(seconds=seconds)).astimezone(NY)
                messages[at.weekday()][at.hour] += 1
    assert result["conversations"] == conversations
    assert result["messages"] == messages
    assert result["totals"]["conversations"] == len(rows)


def test_heatmap_daylight_saving_hours(engine: Engine) -> None:
    moments = [
        datetime(2024, 3, 10, 6, 30, tzinfo=UTC),  # 01:30 EST, Sunday
        datetime(2024, 3, 10, 7, 30, tzinfo=UTC),  # 03:30 EDT: 02:xx is skipped
        datetime(2024, 11, 3, 5, 30, tzinfo=UTC),  # 01:30 EDT, Sunday
        datetime(2024, 11, 3, 6, 30, tzinfo=UTC),  # 01:30 EST, the repeated hour
    ]
    rows = [
        {"number": n, "user": f"u{n}", "channel": "web", "start": m, "replies": 1}
        for n, m in enumerate(moments)
    ]
    store(engine, rows)
    result = compute(engine, "heatmap", tz="America/New_York")
    sunday = result["conversations"][6]
    assert sunday[1] == 3
    assert sunday[2] == 0
    assert sunday[3] == 1
    in_utc = compute(engine, "heatmap")["conversations"][6]
    assert [in_utc[hour] for hour in (5, 6, 7)] == [1, 2, 1]


def test_heatmap_empty_window_and_groups(engine: Engine) -> None:
    rows = generate(seed=4, first_day=date(2024, 3, 1), days=5, users=5)
    store(engine, rows)
    empty = compute(engine, "heatmap", since="2030-01-01", until="2030-01-02")
    assert empty["totals"] == {"conversations": 0, "messages": 0}
    assert empty["conversations"] == [[0] * 24 for _ in range(7)]
    grouped = compute(engine, "heatmap", group_by="channel")
    by_channel = Counter(row["channel"] for row in rows)
    assert {
        group["group"]: group["totals"]["conversations"] for group in grouped["groups"]
    } == dict(by_channel)


def test_growth_and_retention_groups_add_up(engine: Engine) -> None:
    rows = generate(seed=5, first_day=date(2024, 3, 1), days=20, users=30)
    store(engine, rows)
    window = {"tz": "America/New_York", "since": "2024-03-01", "until": "2024-03-21"}
    growth = compute(engine, "growth", period="week", group_by="channel", **window)
    for index, total in enumerate(growth["series"]):
        for name in ("conversations", "messages", "users", "new_users"):
            assert total[name] == sum(group["series"][index][name] for group in growth["groups"])
    for group in growth["groups"]:
        mine = [row for row in rows if row["channel"] == group["group"]]
        assert group["totals"]["conversations"] == len(mine)

    retention = compute(engine, "retention", period="week", group_by="channel", **window)
    for index, cohort in enumerate(retention["cohorts"]):
        groups = [group["cohorts"][index] for group in retention["groups"]]
        assert cohort["users"] == sum(group["users"] for group in groups)
        for offset, cell in enumerate(cohort["following"]):
            if cell["users"] is None:
                continue
            assert cell["users"] == sum(group["following"][offset]["users"] for group in groups)
