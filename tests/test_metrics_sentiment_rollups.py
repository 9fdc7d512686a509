"""The sentiment metric from rollups equals the metric from raw rows.

Stores get scored English texts, unscored texts, late first messages that move a
conversation's start, and duplicates. Each check runs before and after a refresh, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from chatmw import events as ev
from chatmw.metrics.channels import channel_performance
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.metrics.sentiment import sentiment
from chatmw.metrics.sentiment_rollups import sentiment_sums
from chatmw.sentiment import sentiment_enricher
from chatmw.store.models_rollups import RollupSentiment
from chatmw.store.writer import Writer

T0 = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)
TEXTS = (
    "thanks, that is great",
    "this is terrible, I am very angry",
    "where is my order",
    "awesome, love it",
    "not good at all",
    "ok",
    "🙂🙂",
    "bonjour, je voudrais un remboursement",
    "the delivery was late and the box was broken",
    "perfect, happy now",
)
CHANNELS = ("web", "whatsapp", "messenger")
# Means are rounded to 4 decimals; a float sum may round the other way at a boundary.
# The 1e-9 absorbs the float error of the difference of two rounded means.
MEANS = ("mean", "shift_mean", "sentiment_mean")


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), path
        for key, value in expected.items():
            if key in MEANS and value is not None and actual[key] is not None:
                assert abs(actual[key] - value) <= 0.0001 + 1e-9, f"{path}.{key}"
            else:
                assert_same(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for index, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_same(left, right, f"{path}[{index}]")
    else:
        assert actual == expected, path


def _conversation(rng: random.Random, number: int) -> list[ev.Message]:
    start = T0 + timedelta(minutes=rng.randrange(4 * 24 * 60), milliseconds=rng.randrange(60_000))
    messages = []
    at = start
    for step in range(rng.randint(1, 7)):
        role = "user" if step % 2 == 0 or rng.random() < 0.3 else "bot"
        messages.append(
            ev.Message(
                channel=CHANNELS[number % 3],
                occurred_at=at,
                key=f"s{number}-{step}",
                role=role,
                kind="reaction" if rng.random() < 0.05 else "message",
                user_id=f"u{rng.randrange(40)}",
                text=rng.choice(TEXTS),
                conversation_id=f"s{number}",
            )
        )
        at = at + timedelta(milliseconds=rng.choice([1, 900, 45_000, 900_000]))
    return messages


def _filters() -> list[MetricFilter]:
    since, until = T0, T0 + timedelta(days=4)
    ragged = (T0 + timedelta(hours=7, minutes=3), T0 + timedelta(days=2, minutes=44))
    return [
        MetricFilter(since=since, until=until),
        MetricFilter(since=since, until=until, group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, channels=("web",)),
        MetricFilter(since=ragged[0], until=ragged[1]),
        MetricFilter(
            since=ragged[0],
            until=ragged[1],
            group_by=GroupBy("channel"),
            channels=("web", "whatsapp"),
        ),
    ]


def _check(engine: Engine) -> None:
    for flt in _filters():
        with raw_only():
            expected = sentiment(engine, flt, {})
            raw_channels = channel_performance(engine, flt, {"exact": "true"})
        assert_same(sentiment(engine, flt, {}), expected, str(flt.describe()))
        # With exact=true only the sentiment means of channels come from rollups.
        rolled = channel_performance(engine, flt, {"exact": "true"})
        assert_same(rolled, raw_channels, "channels")


def test_sentiment_rollups_match_raw(engine: Engine) -> None:
    rng = random.Random(8)
    writer = Writer(engine, enrichers=[sentiment_enricher])
    written, late = [], []
    for number in range(150):
        messages = _conversation(rng, number)
        if number % 6 == 0 and len(messages) > 2:
            late.append(messages[0])
            messages = messages[1:]
        written.extend(messages)
    writer.write(written)
    _check(engine)
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        rows = connection.execute(select(func.count()).select_from(RollupSentiment)).scalar_one()
    assert rows > 0
    assert sentiment_sums(engine, MetricFilter(since=T0, until=T0 + timedelta(days=4))) is not None
    _check(engine)

    duplicates = [
        ev.Message(
            channel=CHANNELS[n % 3],
            occurred_at=T0,
            key=f"s{n}-1",
            role="user",
            user_id="u0",
            text="awesome",
            conversation_id=f"s{n}",
        )
        for n in range(1, 150, 11)
    ]
    # Late first messages move their conversations' starts; duplicates change nothing.
    writer.write(late + duplicates)
    _check(engine)
    refresh(engine)
    _check(engine)

    flt = MetricFilter(since=T0, until=T0 + timedelta(days=4))
    listed = sentiment(engine, flt, {"per_conversation": 5})
    assert len(listed["per_conversation"]) == 5
    with raw_only():
        assert sentiment(engine, flt, {"per_conversation": 5}) == listed
    summed = sentiment(engine, flt, {})
    assert summed["messages"]["scored"] > 50
    assert summed["conversations"]["shift_count"] > 5
