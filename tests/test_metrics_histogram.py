"""Response-time percentiles from rollup histograms against exact percentiles.

The exact figures are computed here from the written durations, independently of the
metric code. The rollup figures must match count, mean and max exactly, and each
percentile within one bucket width.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from chatmw import events as ev
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.histogram import RELATIVE_ERROR, add_value, bucket_of, describe_histogram
from chatmw.metrics.response_time import response_times
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.metrics.summary import summary
from chatmw.store.models_rollups import (
    LEVEL_DAY,
    LEVEL_HOUR,
    LEVEL_SLOT,
    LEVEL_WEEK,
    RollupResponses,
)
from chatmw.store.writer import Writer

T0 = datetime(2024, 5, 6, 0, 0, tzinfo=UTC)
FRACTIONS = {"p50": 0.5, "p90": 0.9, "p95": 0.95}


def exact_percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def assert_within_bucket(described: dict[str, Any], values: list[float]) -> None:
    assert described["count"] == len(values)
    assert described["mean"] == round(math.fsum(values) / len(values) / 1000, 3)
    assert described["max"] == round(max(values) / 1000, 3)
    for name, fraction in FRACTIONS.items():
        exact = exact_percentile(values, fraction) / 1000
        assert abs(described[name] - exact) <= RELATIVE_ERROR * exact + 0.001, (name, exact)


def test_bucket_bounds_are_monotonic() -> None:
    previous = -1
    for value in range(0, 100_000, 7):
        bucket = bucket_of(value)
        assert bucket >= previous
        previous = bucket
    # Below 23 ms every integer has its own bucket.
    assert len({bucket_of(value) for value in range(23)}) == 23


def test_histogram_percentiles_within_one_bucket() -> None:
    rng = random.Random(11)
    for size in (1, 2, 5, 100, 5_000):
        values = [float(round(rng.lognormvariate(8, 1.5))) for _ in range(size)]
        histogram: dict[int, Any] = {}
        for value in values:
            add_value(histogram, value)
        assert_within_bucket(describe_histogram([histogram]), values)


def test_histogram_small_values_are_exact() -> None:
    values = [float(value) for value in (0, 1, 1, 3, 7, 7, 12, 20, 22)]
    histogram: dict[int, Any] = {}
    for value in values:
        add_value(histogram, value)
    described = describe_histogram([histogram])
    for name, fraction in FRACTIONS.items():
        assert described[name] == round(exact_percentile(values, fraction) / 1000, 3)


def test_empty_histogram_describes_nothing() -> None:
    described = describe_histogram([{}])
    assert described["count"] == 0
    assert described["p50"] is None


def _write_traffic(engine: Engine, seed: int = 21) -> dict[str, list[float]]:
    """Write conversations with varied reply gaps; return the reply times per channel in ms."""
    rng = random.Random(seed)
    replies: dict[str, list[float]] = {"web": [], "whatsapp": []}
    messages = []
    for number in range(400):
        channel = "web" if number % 3 else "whatsapp"
        at = T0 + timedelta(minutes=rng.randrange(11 * 24 * 60), seconds=rng.random() * 60)
        at = at.replace(microsecond=at.microsecond // 1000 * 1000)
        for turn in range(rng.randint(1, 4)):
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"h{number}-{turn}-u",
                    role="user",
                    user_id=f"u{number % 90}",
                    text="hi",
                    conversation_id=f"h{number}",
                )
            )
            gap_ms = max(1, round(rng.lognormvariate(7.5, 1.6)))
            at = at + timedelta(milliseconds=gap_ms)
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"h{number}-{turn}-b",
                    role="bot" if turn % 2 == 0 else "agent",
                    user_id=f"u{number % 90}",
                    text="hello",
                    conversation_id=f"h{number}",
                )
            )
            replies[channel].append(float(gap_ms))
            at = at + timedelta(seconds=rng.randrange(1, 600))
    Writer(engine).write(messages)
    return replies


def test_response_time_rollups_match_written_durations(engine: Engine) -> None:
    replies = _write_traffic(engine)
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        levels = dict(
            connection.execute(
                select(RollupResponses.level, func.count()).group_by(RollupResponses.level)
            ).all()
        )
    assert levels[LEVEL_SLOT] > 0
    assert levels[LEVEL_HOUR] > 0
    assert levels[LEVEL_DAY] > 0
    assert levels[LEVEL_WEEK] > 0

    # The window contains one whole epoch week (from Thursday 2024-05-09) and whole days.
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=11), group_by=GroupBy("channel"))
    result = response_times(engine, flt, {})
    assert_within_bucket(result["reply_time"]["all"], replies["web"] + replies["whatsapp"])
    groups = {group["group"]: group for group in result["groups"]}
    for channel, values in replies.items():
        assert_within_bucket(groups[channel]["reply_time"]["all"], values)
    with raw_only():
        raw = response_times(engine, flt, {})
    for role in ("all", "bot", "agent"):
        assert result["reply_time"][role]["count"] == raw["reply_time"][role]["count"]
        assert result["first_response"][role]["max"] == raw["first_response"][role]["max"]


def test_exact_option_reads_raw_durations(engine: Engine) -> None:
    replies = _write_traffic(engine, seed=4)
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=11))
    exact = response_times(engine, flt, {"exact": "true"})
    values = replies["web"] + replies["whatsapp"]
    for name, fraction in FRACTIONS.items():
        assert exact["reply_time"]["all"][name] == round(
            exact_percentile(values, fraction) / 1000, 3
        )
    with raw_only():
        raw_summary = summary(engine, flt, {})
    assert summary(engine, flt, {"exact": "true"}) == raw_summary


def test_summary_rollups_on_ragged_window(engine: Engine) -> None:
    _write_traffic(engine, seed=9)
    refresh(engine)
    # A window that starts and ends inside slots and hours: edges come from raw rows.
    flt = MetricFilter(
        since=T0 + timedelta(hours=5, minutes=7, seconds=3),
        until=T0 + timedelta(days=2, hours=3, minutes=50),
    )
    rolled = summary(engine, flt, {})
    with raw_only():
        raw = summary(engine, flt, {})
    assert rolled["totals"] == raw["totals"]
    assert rolled["previous"]["totals"] == raw["previous"]["totals"]
    assert rolled["change"] == raw["change"]
    for figure in ("first_response", "reply_time"):
        assert rolled[figure]["count"] == raw[figure]["count"]
        assert rolled[figure]["mean"] == raw[figure]["mean"]
        assert rolled[figure]["max"] == raw[figure]["max"]


def test_level_ranges_use_widest_whole_rows() -> None:
    from zoneinfo import ZoneInfo

    from chatmw.metrics.rollup_query import Coverage, SlotOffsets
    from chatmw.metrics.started_query import _level_ranges

    week = 7 * 86_400_000
    day = 86_400_000
    hour = 3_600_000
    slot = 900_000
    first = 2800 * week - 2 * day - hour - slot  # a slot before an epoch week starts
    end = 2801 * week + day + 2 * slot
    dirty = {2800 * week + 3 * day + 5 * slot}
    served = set(range(first, end, slot)) - dirty
    coverage = Coverage(
        first,
        end,
        first,
        end,
        served,
        [(next(iter(dirty)), next(iter(dirty)) + slot)],
        dirty,
        SlotOffsets(ZoneInfo("UTC")),
    )
    ranges = _level_ranges(coverage)
    covered = sorted(
        start
        for spans in ranges.values()
        for low, high in spans
        for start in range(low, high, slot)
    )
    assert covered == sorted(served)
    assert ranges[LEVEL_WEEK] == []  # the dirty slot breaks the only whole week
    assert ranges[LEVEL_DAY][-1][1] == 2801 * week + day
    assert ranges[LEVEL_SLOT][0] == (first, first + slot)
    clean = Coverage(
        first,
        end,
        first,
        end,
        set(range(first, end, slot)),
        [],
        set(),
        SlotOffsets(ZoneInfo("UTC")),
    )
    assert _level_ranges(clean)[LEVEL_WEEK] == [(2800 * week, 2801 * week)]


def test_contact_set_encoding_round_trip() -> None:
    from chatmw.metrics.contact_sets import count_union, decode, encode

    ids = {1, 7, 8, 9, 1000, 123_457}
    bits = decode(encode(ids))
    assert len(bits) == len(ids)
    assert all(contact_id in bits for contact_id in ids)
    assert len(decode(encode([]))) == 0
    assert count_union([bits], {7, 8, 5, 200_000}) == len(ids) + 2
    assert count_union([], {3, 4}) == 2
    assert count_union([bits, decode(encode({9, 10}))]) == len(ids) + 1


def test_contact_sets_read_zlib_bitsets_of_older_stores() -> None:
    import random
    import zlib

    from chatmw.metrics.contact_sets import decode, encode

    rng = random.Random(7)
    cases = ([], [0], [1, 2, 3], rng.sample(range(2_000_000), 5_000), list(range(70_000)))
    for ids in cases:
        assert sorted(decode(encode(ids))) == sorted(ids)
        bits = bytearray((max(ids) >> 3) + 1 if ids else 0)
        for contact_id in ids:
            bits[contact_id >> 3] |= 1 << (contact_id & 7)
        assert sorted(decode(zlib.compress(bytes(bits), 1))) == sorted(ids)


def test_whole_periods_split_edges() -> None:
    from chatmw.metrics.contact_sets import whole_periods

    week = 7 * 86_400_000
    day = 86_400_000
    start = 100 * week - day - 900_000
    end = 101 * week + day + 1_800_000
    periods, rest = whole_periods(start, end)
    assert periods == [(LEVEL_DAY, 100 * week - day), (LEVEL_WEEK, 100 * week),
                       (LEVEL_DAY, 101 * week)]
    assert rest == [(start, 100 * week - day), (101 * week + day, end)]
