"""Sentiment figures per conversation start slot and channel, and the query that sums them.

Each ``rollup_sentiment`` row sums, over the conversations that started in one slot, the
per-message and per-conversation figures of the ``sentiment`` metric: counts, class
counts and sums of scores, of conversation means and of shifts. Conversation means and
shifts are rounded to 4 decimals before they are summed, as the metric rounds them, so
their sums are kept exactly as integers of 1/10,000. Message scores are summed as
floats, so a mean from rollups can differ from the raw mean in the 4th decimal only when
the exact mean lies within about 1e-12 of a rounding boundary.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import slot_expression, time_in_ranges
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import RollupSentiment

__all__ = [
    "SentimentSums",
    "insert_sentiment",
    "delete_sentiment",
    "sentiment_sums",
    "sentiment_in",
]

_CLASSES = ("positive", "neutral", "negative")


@dataclass(slots=True)
class SentimentSums:
    """The additive sentiment figures of a set of conversations."""

    conversations: int = 0
    messages: int = 0
    scored: int = 0
    score_sum: float = 0.0
    positive: int = 0
    neutral: int = 0
    negative: int = 0
    conv_scored: int = 0
    conv_mean_e4: int = 0
    conv_positive: int = 0
    conv_neutral: int = 0
    conv_negative: int = 0
    shift_count: int = 0
    shift_e4: int = 0
    improved: int = 0
    worsened: int = 0
    unchanged: int = 0

    def add(self, other: SentimentSums) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def section(self) -> dict[str, Any]:
        """Return the ``messages`` and ``conversations`` parts of the sentiment result."""
        messages: dict[str, Any] = {
            "count": self.messages,
            "scored": self.scored,
            "unscored": self.messages - self.scored,
            "mean": None if not self.scored else round(self.score_sum / self.scored, 4),
        }
        for name in _CLASSES:
            count = getattr(self, name)
            messages[f"{name}_count"] = count
            messages[name] = rate(count, self.scored)
        conversations: dict[str, Any] = {
            "count": self.conversations,
            "scored": self.conv_scored,
            "mean": _mean_e4(self.conv_mean_e4, self.conv_scored),
        }
        for name in _CLASSES:
            count = getattr(self, f"conv_{name}")
            conversations[f"{name}_count"] = count
            conversations[name] = rate(count, self.conv_scored)
        conversations.update(
            shift_count=self.shift_count,
            shift_mean=_mean_e4(self.shift_e4, self.shift_count),
            improved=self.improved,
            worsened=self.worsened,
            unchanged=self.unchanged,
        )
        return {"messages": messages, "conversations": conversations}


def _mean_e4(total_e4: int, count: int) -> float | None:
    return None if not count else round(total_e4 / 10_000 / count, 4)


def _e4(value: float) -> int:
    return round(value * 10_000)


def _sums_of(
    rows_by_conversation: Iterable[list[tuple[int, int, int, float | None]]],
) -> SentimentSums:
    """Sum the figures of conversations given their user messages as ScoredRow lists."""
    from chatmw.metrics.sentiment import _conversation_figures, classify

    sums = SentimentSums()
    scores: list[float] = []
    for rows in rows_by_conversation:
        rows.sort(key=lambda row: (row[1], row[2]))
        sums.messages += len(rows)
        for row in rows:
            if row[3] is not None:
                scores.append(row[3])
                setattr(sums, classify(row[3]), getattr(sums, classify(row[3])) + 1)
        figures = _conversation_figures(rows)
        if figures["mean"] is not None:
            sums.conv_scored += 1
            sums.conv_mean_e4 += _e4(figures["mean"])
            name = f"conv_{classify(figures['mean'])}"
            setattr(sums, name, getattr(sums, name) + 1)
        shift = figures["shift"]
        if shift is not None:
            sums.shift_count += 1
            sums.shift_e4 += _e4(shift)
            sums.improved += shift > 0
            sums.worsened += shift < 0
            sums.unchanged += shift == 0
    sums.scored = len(scores)
    sums.score_sum = math.fsum(scores)
    return sums


def _user_messages(where: ColumnElement[bool]) -> Any:
    return (
        select(
            slot_expression(Conversation.started_at_ms),
            Conversation.channel,
            Message.conversation_id,
            Message.occurred_at_ms,
            Message.id,
            Message.sentiment,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.role == "user", Message.kind == "message", where)
    )


def _collect(
    connection: Connection, where: ColumnElement[bool]
) -> dict[tuple[int, str], SentimentSums]:
    """Return the sums per (start slot, channel) of the conversations ``where`` selects."""
    grouped: dict[tuple[int, str], dict[int, list[tuple[int, int, int, float | None]]]] = (
        defaultdict(lambda: defaultdict(list))
    )
    for start_slot, channel, conversation_id, at_ms, message_id, score in connection.execute(
        _user_messages(where)
    ):
        grouped[(int(start_slot), channel)][conversation_id].append(
            (conversation_id, at_ms, message_id, score)
        )
    return {key: _sums_of(conversations.values()) for key, conversations in grouped.items()}


def delete_sentiment(connection: Connection, part: list[tuple[int | None, int]]) -> None:
    """Delete the rows of the start slots in ``part``."""
    connection.execute(
        delete(RollupSentiment).where(time_in_ranges(RollupSentiment.start_slot_ms, part))
    )


def insert_sentiment(connection: Connection, part: list[tuple[int | None, int]]) -> None:
    """Insert the rows of the conversations that started in the slots of ``part``."""
    sums = _collect(connection, time_in_ranges(Conversation.started_at_ms, part))
    rows = [
        {"start_slot_ms": start, "channel": channel, **dataclasses.asdict(figures)}
        for (start, channel), figures in sums.items()
    ]
    for row in rows:
        del row["conversations"]
    if rows:
        connection.execute(insert(RollupSentiment), rows)


def sentiment_sums(engine: Engine, flt: MetricFilter) -> dict[str, SentimentSums] | None:
    """Return the sums per channel of the conversations of ``flt``, or None without rollups."""
    utc = dataclasses.replace(flt, tz=ZoneInfo("UTC"))
    with engine.connect() as connection:
        coverage = cover(connection, utc)
        if coverage is None:
            return None
        return sentiment_in(connection, flt, coverage)


def sentiment_in(
    connection: Connection, flt: MetricFilter, coverage: Coverage, conversations: bool = True
) -> dict[str, SentimentSums]:
    """Return the sums per channel of the conversations that started in the window of ``coverage``.

    ``coverage`` must come from ``cover`` on ``flt`` in UTC. Without ``conversations`` the
    conversations are not counted (``conversations`` stays 0) and every channel with sums
    is returned.
    """
    # Imported here: chatmw.metrics.started_query imports the module that imports this one.
    from chatmw.metrics.started_query import add_conversations

    by_channel_filter = dataclasses.replace(flt, group_by=GroupBy("channel"))
    names = [item.name for item in fields(SentimentSums) if item.name != "conversations"]
    by_channel: dict[str, SentimentSums] = defaultdict(SentimentSums)
    rolled = (
        select(
            RollupSentiment.channel,
            *(func.sum(getattr(RollupSentiment, name)) for name in names),
        )
        .where(
            *coverage.served_conditions(RollupSentiment.start_slot_ms),
            *channel_condition(RollupSentiment.channel, flt),
        )
        .group_by(RollupSentiment.channel)
    )
    for channel, *values in connection.execute(rolled):
        part = SentimentSums(
            **{
                name: (float(value or 0) if name == "score_sum" else int(value or 0))
                for name, value in zip(names, values, strict=True)
            }
        )
        by_channel[channel].add(part)
    if conversations:
        # Conversation counts as summary counts them, per channel.
        counts: dict[Any, dict[str, int]] = {}
        add_conversations(connection, by_channel_filter, coverage, counts)
        for channel, totals in counts.items():
            by_channel[channel].conversations += totals["conversations"]
    if coverage.raw:
        in_raw = time_in_ranges(Conversation.started_at_ms, coverage.raw)
        if flt.channels:
            in_raw = in_raw & Conversation.channel.in_(flt.channels)
        for (_, channel), part in _collect(connection, in_raw).items():
            by_channel[channel].add(part)
    if not conversations:
        return dict(by_channel)
    return {channel: sums for channel, sums in by_channel.items() if sums.conversations}
