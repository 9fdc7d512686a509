"""Sentiment: the writer enricher and the sentiment metric, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from textblob import TextBlob

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.metrics import REGISTRY, parse_filter
from chatmw.metrics.registry import parse_options
from chatmw.runtime import Runtime
from chatmw.sentiment import is_english, polarity, sentiment_enricher
from chatmw.store.models import Message
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)

# (text, English?) labelled by hand; the English ones are scored with TextBlob directly.
TEXTS = [
    ("I love this, great service!", True),
    ("This is terrible and slow", True),
    ("where is my order", True),
    ("thanks, that was very helpful", True),
    ("my package is late again, awful", True),
    ("ok", True),
    ("Bonjour, je voudrais un remboursement", False),
    ("Das ist sehr gut", False),
    ("gracias por todo", False),
    ("Привет, где мой заказ?", False),
    ("😀😀😀", False),
    (":)", False),
    ("12345", False),
    ("@ChaseSupport Terrible customer support in time of crisis.", True),
    ("great job #fast https://example.com/x", True),
    ("merci beaucoup", False),
    ("je ne peux pas me connecter", False),
    ("mi pedido no ha llegado", False),
    ("@RockstarSupport PS4", False),
    # Words addressed to the bot itself.
    ("Hello, bot!", True),
    ("stupid bot", True),
    ("thanks chatbot, great answer", True),
    ("hola bot", False),
]


def expected_score(text: str, english: bool) -> float | None:
    return round(TextBlob(text).sentiment.polarity, 4) if english else None


def classify(score: float) -> str:
    if score > 0.1:
        return "positive"
    if score < -0.1:
        return "negative"
    return "neutral"


def compute(engine: Engine, **params: str) -> dict:
    spec = REGISTRY["sentiment"]
    query = {name: [value] for name, value in params.items()}
    flt = parse_filter(query, allowed=[param.name for param in spec.params])
    return spec.compute(engine, flt, parse_options(spec, query))


@pytest.mark.parametrize(("text", "english"), TEXTS)
def test_english_heuristic_labels(text: str, english: bool) -> None:
    assert is_english(text) is english
    assert polarity(text) == expected_score(text, english)


def test_enricher_scores_only_user_messages() -> None:
    user = ev.Message(
        channel="web", occurred_at=T0, key="u", role="user", user_id="a", text="I love it"
    )
    bot = ev.Message(
        channel="web", occurred_at=T0, key="b", role="bot", user_id="a", text="I love it"
    )
    survey = ev.Message(
        channel="web",
        occurred_at=T0,
        key="s",
        role="user",
        user_id="a",
        text="great",
        kind="survey_answer",
    )
    assert sentiment_enricher(user) == {
        "sentiment": round(TextBlob("I love it").sentiment.polarity, 4)
    }
    assert sentiment_enricher(bot) == {}
    assert sentiment_enricher(survey) == {}


def test_runtime_setting_turns_enricher_off(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    enabled = Runtime.from_settings(Settings(database_url=url))
    disabled = Runtime.from_settings(Settings(database_url=url, sentiment=False))
    assert sentiment_enricher in enabled.writer.enrichers
    assert sentiment_enricher not in disabled.writer.enrichers
    enabled.engine.dispose()
    disabled.engine.dispose()


def generate(seed: int = 7) -> tuple[list[ev.Message], dict[str, dict]]:
    """Return messages of 30 conversations and, per conversation, its channel, start and scores."""
    rng = random.Random(seed)
    messages: list[ev.Message] = []
    truth: dict[str, dict] = {}
    for number in range(30):
        conversation = f"c{number}"
        channel = "web" if number % 3 else "whatsapp"
        start = T0 + timedelta(hours=number * 5)
        scores: list[float | None] = []
        for turn in range(rng.randint(0, 5)):
            text, english = rng.choice(TEXTS)
            at = start + timedelta(minutes=turn * 2)
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"{conversation}-u{turn}",
                    role="user",
                    user_id=f"user{number}",
                    text=text,
                    conversation_id=conversation,
                )
            )
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at + timedelta(seconds=20),
                    key=f"{conversation}-b{turn}",
                    role="bot",
                    user_id=f"user{number}",
                    text="I love helping!",
                    conversation_id=conversation,
                )
            )
            scores.append(expected_score(text, english))
        if not scores:
            # A conversation without user messages: only a bot greeting.
            messages.append(
                ev.Message(
                    channel=channel,
                    occurred_at=start,
                    key=f"{conversation}-g",
                    role="bot",
                    user_id=f"user{number}",
                    text="Hello!",
                    conversation_id=conversation,
                )
            )
        truth[conversation] = {"channel": channel, "start": start, "scores": scores}
    return messages, truth


def reference(truth: dict[str, dict]) -> dict:
    scores = [s for item in truth.values() for s in item["scores"]]
    scored = [s for s in scores if s is not None]
    means, shifts = [], []
    for item in truth.values():
        own = [s for s in item["scores"] if s is not None]
        if own:
            means.append(statistics.fmean(own))
        if len(own) >= 2:
            shifts.append(own[-1] - own[0])
    return {
        "count": len(scores),
        "scored": len(scored),
        "unscored": len(scores) - len(scored),
        "mean": statistics.fmean(scored) if scored else None,
        "labels": [classify(s) for s in scored],
        "conversation_means": means,
        "shifts": shifts,
    }


def check_section(section: dict, truth: dict[str, dict]) -> None:
    expected = reference(truth)
    messages, conversations = section["messages"], section["conversations"]
    assert messages["count"] == expected["count"]
    assert messages["scored"] == expected["scored"]
    assert messages["unscored"] == expected["unscored"]
    assert messages["mean"] == pytest.approx(expected["mean"], abs=1e-4)
    for label in ("positive", "neutral", "negative"):
        count = expected["labels"].count(label)
        assert messages[f"{label}_count"] == count
        assert messages[label] == pytest.approx(count / len(expected["labels"]), abs=1e-4)
    assert conversations["count"] == len(truth)
    assert conversations["scored"] == len(expected["conversation_means"])
    assert conversations["mean"] == pytest.approx(
        statistics.fmean(expected["conversation_means"]), abs=1e-3
    )
    assert conversations["shift_count"] == len(expected["shifts"])
    assert conversations["shift_mean"] == pytest.approx(
        statistics.fmean(expected["shifts"]), abs=1e-3
    )
    assert conversations["improved"] == sum(1 for s in expected["shifts"] if s > 1e-9)
    assert conversations["worsened"] == sum(1 for s in expected["shifts"] if s < -1e-9)


def test_sentiment_metric_matches_reference(engine: Engine) -> None:
    messages, truth = generate()
    Writer(engine, enrichers=[sentiment_enricher]).write(messages)
    with engine.connect() as connection:
        stored = dict(connection.execute(select(Message.key, Message.sentiment)).all())
    unscored_user = [m.key for m in messages if m.role == "user" and stored[m.key] is None]
    assert len(unscored_user) == reference(truth)["unscored"]

    result = compute(engine, group_by="channel")
    check_section(result, truth)
    groups = {group["group"]: group for group in result["groups"]}
    assert set(groups) == {"web", "whatsapp"}
    for channel, group in groups.items():
        check_section(
            group, {key: item for key, item in truth.items() if item["channel"] == channel}
        )


def test_sentiment_window_follows_conversation_start(engine: Engine) -> None:
    messages, truth = generate(seed=11)
    Writer(engine, enrichers=[sentiment_enricher]).write(messages)
    since, until = T0 + timedelta(hours=20), T0 + timedelta(hours=70)
    result = compute(engine, since=since.isoformat(), until=until.isoformat())
    check_section(
        result, {key: item for key, item in truth.items() if since <= item["start"] < until}
    )


def test_sentiment_per_conversation_list(engine: Engine) -> None:
    messages, truth = generate(seed=3)
    Writer(engine, enrichers=[sentiment_enricher]).write(messages)
    result = compute(engine, per_conversation="5")
    listed = result["per_conversation"]
    newest = sorted(truth, key=lambda key: truth[key]["start"], reverse=True)[:5]
    assert [row["external_id"] for row in listed] == newest
    for row in listed:
        own = [s for s in truth[row["external_id"]]["scores"] if s is not None]
        assert row["scored"] == len(own)
        assert row["shift"] == (
            pytest.approx(own[-1] - own[0], abs=1e-4) if len(own) >= 2 else None
        )


def test_sentiment_empty_window_is_null(engine: Engine) -> None:
    messages, _ = generate()
    Writer(engine, enrichers=[sentiment_enricher]).write(messages)
    result = compute(engine, since="2030-01-01", until="2030-02-01")
    assert result["messages"]["count"] == 0
    assert result["messages"]["mean"] is None
    assert result["messages"]["positive"] is None
    assert result["conversations"]["count"] == 0
    assert result["conversations"]["mean"] is None
    assert result["conversations"]["shift_mean"] is None
