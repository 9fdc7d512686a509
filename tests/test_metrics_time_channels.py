"""Channel performance against figures computed from the generated data."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, insert, text

from chatmw import events as ev
from chatmw.metrics import REGISTRY, parse_filter
from chatmw.metrics.registry import parse_options
from chatmw.sentiment import sentiment_enricher
from chatmw.store.models_business import Conversion
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer

T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)
TEXTS = ["I love this", "this is awful", "where is my order", "merci beaucoup"]


def compute(engine: Engine, **params: str) -> dict:
    spec = REGISTRY["channels"]
    query = {name: [value] for name, value in params.items()}
    flt = parse_filter(query, allowed=[param.name for param in spec.params])
    return spec.compute(engine, flt, parse_options(spec, query))


def generate(seed: int) -> tuple[list[ev.Message], list[dict]]:
    rng = random.Random(seed)
    messages, conversations = [], []
    for number in range(40):
        channel = rng.choice(["web", "whatsapp", "messenger"])
        start = T0 + timedelta(minutes=number * 37)
        user = f"user{number % 25}"
        turns = rng.randint(1, 3)
        delays, scores = [], []
        for turn in range(turns):
            at = start + timedelta(minutes=turn * 3)
            text_value = rng.choice(TEXTS)
            delay = rng.randint(1, 120)
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"c{number}-u{turn}",
                    role="user",
                    user_id=user,
                    text=text_value,
                    conversation_id=f"c{number}",
                )
            )
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at + timedelta(seconds=delay),
                    key=f"c{number}-b{turn}",
                    role="bot",
                    user_id=user,
                    text="ok",
                    conversation_id=f"c{number}",
                )
            )
            delays.append(delay)
            scores.append(sentiment_enricher(messages[-2])["sentiment"])
        conversations.append(
            {
                "number": number,
                "channel": channel,
                "user": user,
                "start": start,
                "turns": turns,
                "delays": delays,
                "scores": scores,
            }
        )
    return messages, conversations


def add_outcomes(engine: Engine, conversations: list[dict], seed: int) -> None:
    """Add conversions (by conversation id, and by user only) and CSAT and NPS answers."""
    rng = random.Random(seed)
    conversion_rows, survey_rows = [], []
    with engine.connect() as connection:
        ids = dict(connection.execute(text("SELECT external_id, id FROM conversations")).all())
    for item in conversations:
        item["conversions"] = set()
        if rng.random() < 0.3:
            for index in range(rng.randint(1, 2)):
                conversion_rows.append(
                    {
                        "key": f"conv-{item['number']}-{index}",
                        "name": "purchase",
                        "value_micros": 1_000_000,
                        "currency": "EUR",
                        "channel": item["channel"],
                        "user_id": item["user"],
                        "conversation_external_id": f"c{item['number']}",
                        "occurred_at_ms": int(
                            (item["start"] + timedelta(hours=1)).timestamp() * 1000
                        ),
                    }
                )
                item["conversions"].add(f"conv-{item['number']}-{index}")
        kind = rng.choice(["csat", "nps", None])
        item["survey"] = None
        if kind is not None:
            # Answered, sent without an answer, or skipped (never sent).
            state = rng.choice(["answered", "answered", "sent", "skipped"])
            score = None
            if state == "answered":
                score = rng.randint(1, 5) if kind == "csat" else rng.randint(0, 10)
            item["survey"] = (kind, state, score)
            survey_rows.append(
                {
                    "conversation_id": ids[f"c{item['number']}"],
                    "channel": item["channel"],
                    "name": kind,
                    "kind": kind,
                    "trigger": "end",
                    "state": state,
                    "locale": "en",
                    "created_at_ms": 0,
                    "sent_at_ms": None if state == "skipped" else 1,
                    "score": score,
                    "comment_window_ms": 0,
                    "reasks": 0,
                    "used_template": False,
                }
            )
    # A user-only conversion counts for each conversation of that user on that channel that
    # started at most 7 days (the default attribution window) before it.
    last = max(conversations, key=lambda item: item["start"])
    occurred = last["start"] + timedelta(minutes=5)
    conversion_rows.append(
        {
            "key": "conv-user-only",
            "name": "signup",
            "value_micros": 0,
            "currency": "EUR",
            "channel": last["channel"],
            "user_id": last["user"],
            "conversation_external_id": None,
            "occurred_at_ms": int(occurred.timestamp() * 1000),
        }
    )
    for item in conversations:
        same_user = (item["channel"], item["user"]) == (last["channel"], last["user"])
        if same_user and occurred - timedelta(days=7) <= item["start"] <= occurred:
            item["conversions"].add("conv-user-only")
    with engine.begin() as connection:
        connection.execute(insert(Conversion.__table__), conversion_rows)
        if survey_rows:
            connection.execute(insert(Survey.__table__), survey_rows)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def test_channels_match_reference(engine: Engine) -> None:
    messages, conversations = generate(seed=9)
    Writer(engine, enrichers=[sentiment_enricher]).write(messages)
    add_outcomes(engine, conversations, seed=9)
    result = compute(engine)
    assert result["notes"] == []
    rows = {row["channel"]: row for row in result["channels"]}
    assert set(rows) == {item["channel"] for item in conversations}
    for channel, row in rows.items():
        mine = [item for item in conversations if item["channel"] == channel]
        assert row["conversations"] == len(mine)
        assert row["users"] == len({item["user"] for item in mine})
        assert row["messages"] == sum(2 * item["turns"] for item in mine)
        assert row["user_messages"] == sum(item["turns"] for item in mine)
        engaged = sum(1 for item in mine if item["turns"] >= 2)
        assert row["engagement"]["engaged"] == engaged
        assert row["engagement"]["rate"] == round(engaged / len(mine), 4)
        converted = sum(1 for item in mine if item["conversions"])
        assert row["conversion"]["converted"] == converted
        distinct = set().union(*(item["conversions"] for item in mine))
        assert row["conversion"]["conversions"] == len(distinct)
        assert row["conversion"]["rate"] == round(converted / len(mine), 4)
        firsts = [item["delays"][0] for item in mine]
        replies = [delay for item in mine for delay in item["delays"]]
        assert row["first_response"]["p50"] == pytest.approx(percentile(firsts, 0.5), abs=1e-3)
        assert row["reply_time"]["mean"] == pytest.approx(statistics.fmean(replies), abs=1e-3)
        surveys = [item["survey"] for item in mine if item["survey"]]
        csat = [score for kind, _, score in surveys if kind == "csat" and score is not None]
        nps = [score for kind, _, score in surveys if kind == "nps" and score is not None]
        csat_sent = sum(1 for kind, state, _ in surveys if kind == "csat" and state != "skipped")
        assert row["csat"]["sent"] == csat_sent
        assert row["csat"]["answers"] == len(csat)
        assert row["csat"]["satisfied"] == sum(1 for s in csat if s >= 4)
        if csat:
            assert row["csat"]["score"] == round(
                sum(1 for s in csat if s >= 4) / len(csat) * 100, 2
            )
        else:
            assert row["csat"]["score"] is None
        assert row["nps"]["answers"] == len(nps)
        if nps:
            promoters = sum(1 for s in nps if s >= 9)
            detractors = sum(1 for s in nps if s <= 6)
            assert row["nps"]["nps"] == round((promoters - detractors) / len(nps) * 100, 2)
        else:
            assert row["nps"]["nps"] is None
        scores = [s for item in mine for s in item["scores"] if s is not None]
        assert row["sentiment_mean"] == (
            pytest.approx(statistics.fmean(scores), abs=1e-4) if scores else None
        )


def test_channels_empty_window(engine: Engine) -> None:
    messages, _ = generate(seed=1)
    Writer(engine).write(messages)
    result = compute(engine, since="2030-01-01", until="2030-01-02")
    assert result["channels"] == []


def test_channels_without_optional_tables(engine: Engine, database_url: str) -> None:
    messages, conversations = generate(seed=2)
    Writer(engine).write(messages)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE conversions"))
        connection.execute(text("DROP TABLE survey_sends"))
        connection.execute(text("DROP TABLE surveys"))
    try:
        result = compute(engine)
        assert all(row["conversion"] is None for row in result["channels"])
        assert all(row["csat"] is None and row["nps"] is None for row in result["channels"])
        assert len(result["notes"]) == 2
        assert sum(row["conversations"] for row in result["channels"]) == len(conversations)
    finally:
        if database_url.startswith("postgresql"):
            # Later tests share this PostgreSQL database: put the dropped tables back.
            from chatmw.store.models import Base

            Base.metadata.create_all(
                engine,
                tables=[
                    Base.metadata.tables[name]
                    for name in ("conversions", "surveys", "survey_sends")
                ],
            )
