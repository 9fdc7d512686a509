"""The sentiment metric from rollups equals the metric from raw rows.

Stores get scored English texts, unscored texts, late first messages that move a
conversation's start, and duplicates. Each check runs before and after a refresh, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from rollup_helpers import (
    CHANNELS,
    assert_close,
    duplicate_messages,
    hold_back_first,
    window_filters,
)
from sqlalchemy import Engine, func, select

from chatmw import events as ev
from chatmw.metrics.channels import channel_performance
from chatmw.metrics.filters import MetricFilter
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
# Means are rounded to 4 decimals; a float sum may round the other way at a boundary.
# The 1e-9 absorbs the float error of the difference of two rounded means.
MEAN_BOUNDS = dict.fromkeys(("mean", "shift_mean", "sentiment_mean"), lambda _: 0.0001 + 1e-9)


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
    ragged = (T0 + timedelta(hours=7, minutes=3), T0 + timedelta(days=2, minutes=44))
    return window_filters(T0, T0 + timedelta(days=4), ragged, "web")


def _check(engine: Engine) -> None:
    for flt in _filters():
        with raw_only():
            expected = sentiment(engine, flt, {})
            raw_channels = channel_performance(engine, flt, {"exact": "true"})
        assert_close(sentiment(engine, flt, {}), expected, str(flt.describe()), MEAN_BOUNDS)
        # With exact=true only the sentiment means of channels come from rollups.
        rolled = channel_performance(engine, flt, {"exact": "true"})
        assert_close(rolled, raw_channels, "channels", MEAN_BOUNDS)


def test_sentiment_rollups_match_raw(engine: Engine) -> None:
    rng = random.Random(8)
    writer = Writer(engine, enrichers=[sentiment_enricher])
    written: list[ev.Message] = []
    late: list[ev.Message] = []
    for number in range(150):
        messages = _conversation(rng, number)
        written.extend(hold_back_first(messages, late, number % 6 == 0, min_messages=3))
    writer.write(written)
    _check(engine)
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        rows = connection.execute(select(func.count()).select_from(RollupSentiment)).scalar_one()
    assert rows > 0
    assert sentiment_sums(engine, MetricFilter(since=T0, until=T0 + timedelta(days=4))) is not None
    _check(engine)

    duplicates = duplicate_messages(range(1, 150, 11), T0, "s{}-1", "s{}", text="awesome")
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
