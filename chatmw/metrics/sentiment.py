"""Sentiment: polarity of user messages, per message and per conversation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, select

from chatmw.events import from_ms
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.sentiment_rollups import SentimentSums, sentiment_sums
from chatmw.metrics.stats import rate
from chatmw.sentiment import MIN_CORE_SHARE, MIN_KNOWN_SHARE
from chatmw.store.models import Conversation, Message

__all__ = [
    "sentiment",
    "SENTIMENT",
    "POSITIVE_ABOVE",
    "NEGATIVE_BELOW",
    "classify",
    "mean_polarity",
    "MAX_LISTED",
]

# Polarity above this is positive, below NEGATIVE_BELOW negative, anything between neutral.
POSITIVE_ABOVE = 0.1
NEGATIVE_BELOW = -0.1
# The maximum number of conversations ``per_conversation`` may list.
MAX_LISTED = 1000

# (conversation id, occurred_at_ms, message id, polarity or None)
ScoredRow = tuple[int, int, int, float | None]


def classify(score: float) -> str:
    """Return ``positive``, ``neutral`` or ``negative`` for a polarity."""
    if score > POSITIVE_ABOVE:
        return "positive"
    if score < NEGATIVE_BELOW:
        return "negative"
    return "neutral"


def _mean(values: Sequence[float]) -> float | None:
    return None if not values else round(math.fsum(values) / len(values), 4)


def mean_polarity(engine: Engine, flt: MetricFilter) -> dict[Any, float | None]:
    """Return the mean polarity of scored user messages per group key of ``flt``."""
    scope = conversation_scope(flt).subquery()
    statement = (
        select(scope.c.group_key, Message.sentiment)
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.role == "user", Message.kind == "message", Message.sentiment.is_not(None))
    )
    scores: dict[Any, list[float]] = defaultdict(list)
    with engine.connect() as connection:
        for key, score in connection.execute(statement):
            scores[key].append(score)
    return {key: _mean(values) for key, values in scores.items()}


def _load(
    engine: Engine, flt: MetricFilter
) -> tuple[dict[int, Any], dict[int, list[ScoredRow]], dict[int, tuple[str, str, int]]]:
    scope = conversation_scope(flt).subquery()
    conversations = select(
        scope.c.conversation_id,
        scope.c.group_key,
        Conversation.channel,
        Conversation.external_id,
        Conversation.started_at_ms,
    ).join(Conversation, Conversation.id == scope.c.conversation_id)
    messages = (
        select(Message.conversation_id, Message.occurred_at_ms, Message.id, Message.sentiment)
        .join(scope, Message.conversation_id == scope.c.conversation_id)
        .where(Message.role == "user", Message.kind == "message")
    )
    groups: dict[int, Any] = {}
    details: dict[int, tuple[str, str, int]] = {}
    by_conversation: dict[int, list[ScoredRow]] = defaultdict(list)
    with engine.connect() as connection:
        for conversation_id, key, channel, external_id, started in connection.execute(
            conversations
        ):
            groups[conversation_id] = key
            details[conversation_id] = (channel, external_id, started)
        for row in connection.execute(messages):
            by_conversation[row[0]].append((row[0], row[1], row[2], row[3]))
    for rows in by_conversation.values():
        rows.sort(key=lambda row: (row[1], row[2]))
    return groups, by_conversation, details


def _conversation_figures(rows: Sequence[ScoredRow]) -> dict[str, Any]:
    scores = [row[3] for row in rows if row[3] is not None]
    shift = None if len(scores) < 2 else round(scores[-1] - scores[0], 4)
    return {
        "user_messages": len(rows),
        "scored": len(scores),
        "unscored": len(rows) - len(scores),
        "mean": _mean(scores),
        "first": scores[0] if scores else None,
        "last": scores[-1] if scores else None,
        "shift": shift,
    }


def _shares(labels: Sequence[str]) -> dict[str, Any]:
    counts = {
        name: sum(1 for label in labels if label == name)
        for name in ("positive", "neutral", "negative")
    }
    shares: dict[str, Any] = {}
    for name, count in counts.items():
        shares[f"{name}_count"] = count
        shares[name] = rate(count, len(labels))
    return shares


def _section(
    conversation_ids: Sequence[int], by_conversation: Mapping[int, list[ScoredRow]]
) -> dict[str, Any]:
    rows = [row for cid in conversation_ids for row in by_conversation.get(cid, [])]
    scores = [row[3] for row in rows if row[3] is not None]
    figures = [_conversation_figures(by_conversation.get(cid, [])) for cid in conversation_ids]
    means = [figure["mean"] for figure in figures if figure["mean"] is not None]
    shifts = [figure["shift"] for figure in figures if figure["shift"] is not None]
    return {
        "messages": {
            "count": len(rows),
            "scored": len(scores),
            "unscored": len(rows) - len(scores),
            "mean": _mean(scores),
            **_shares([classify(score) for score in scores]),
        },
        "conversations": {
            "count": len(conversation_ids),
            "scored": len(means),
            "mean": _mean(means),
            **_shares([classify(mean) for mean in means]),
            "shift_count": len(shifts),
            "shift_mean": _mean(shifts),
            "improved": sum(1 for shift in shifts if shift > 0),
            "worsened": sum(1 for shift in shifts if shift < 0),
            "unchanged": sum(1 for shift in shifts if shift == 0),
        },
    }


def sentiment(engine: Engine, flt: MetricFilter, options: Mapping[str, Any]) -> dict[str, Any]:
    """Summarise the polarity of user messages in the conversations of ``flt``."""
    listed = int(options.get("per_conversation") or 0)
    if not 0 <= listed <= MAX_LISTED:
        raise FilterError("per_conversation", f"must be between 0 and {MAX_LISTED}, got {listed}")
    result: dict[str, Any] = {
        "metric": "sentiment",
        "filters": flt.describe(),
        "thresholds": {"positive_above": POSITIVE_ABOVE, "negative_below": NEGATIVE_BELOW},
    }
    # Listing conversations needs each one's rows, so only the plain figures use rollups.
    sums = None if listed else sentiment_sums(engine, flt)
    if sums is not None:
        total = SentimentSums()
        for part in sums.values():
            total.add(part)
        result.update(total.section())
        if flt.group_by is not None:
            result["groups"] = [
                {"group": group_label(channel), **sums[channel].section()}
                for channel in sorted(sums, key=group_label)
            ]
        return result
    groups, by_conversation, details = _load(engine, flt)
    result.update(_section(sorted(groups), by_conversation))
    if flt.group_by is not None:
        members: dict[Any, list[int]] = defaultdict(list)
        for conversation_id, key in groups.items():
            members[key].append(conversation_id)
        result["groups"] = [
            {"group": group_label(key), **_section(sorted(ids), by_conversation)}
            for key, ids in sorted(members.items(), key=lambda item: group_label(item[0]))
        ]
    if listed:
        newest = sorted(groups, key=lambda cid: (details[cid][2], cid), reverse=True)[:listed]
        result["per_conversation"] = [
            {
                "conversation_id": cid,
                "channel": details[cid][0],
                "external_id": details[cid][1],
                "started_at": from_ms(details[cid][2]).isoformat(),
                "group": group_label(groups[cid]),
                **_conversation_figures(by_conversation.get(cid, [])),
            }
            for cid in newest
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows = []
    for group, section in sections:
        row: dict[str, Any] = {"group": group}
        for part in ("messages", "conversations"):
            row.update({f"{part}_{name}": value for name, value in section[part].items()})
        rows.append(row)
    return rows


SENTIMENT = register(
    MetricSpec(
        name="sentiment",
        summary="Polarity of user messages, per message and per conversation",
        description=(
            "TextBlob polarity (PatternAnalyzer, from -1 very negative to +1 very positive) of "
            "each user message of kind `message` in the conversations of the window, scored when "
            "the message is written. Some messages are **unscored** (stored as NULL): text that "
            "does not look English, text without letters (emoji only) and messages without text. "
            "Handles, hashtags and links are left out, and text looks English when at least "
            f"{MIN_KNOWN_SHARE:.0%} of its words are English (in TextBlob's English word list, "
            "its sentiment lexicon or a list of English function and chat words) and at least "
            f"{MIN_CORE_SHARE:.0%} are in the sentiment lexicon or that list. Unscored messages "
            "are counted in `unscored`, never as neutral.\n\n"
            f"- A score is **positive** when > {POSITIVE_ABOVE}, **negative** when < "
            f"{NEGATIVE_BELOW}, otherwise **neutral**; `positive`, `neutral` and `negative` are "
            "shares (0 to 1) of scored items, with `*_count` beside them.\n"
            "- `messages.mean`: mean polarity of scored messages.\n"
            "- `conversations.mean`: mean over conversations of each conversation's mean polarity; "
            "conversations without a scored message are left out (`scored` counts the rest). "
            "Conversation shares classify each conversation's mean.\n"
            "- `shift`: last scored message's polarity minus the first's, per conversation with at "
            "least two scored messages; `shift_mean` averages it, `improved`, `worsened` and "
            "`unchanged` count shifts above, below and equal to 0.\n"
            f"- `per_conversation=N` (0 to {MAX_LISTED}) also lists the N most recently started "
            "conversations with their mean, first, last and shift.\n\n"
            "Means and shares are `null` when nothing is scored."
        ),
        compute=sentiment,
        params=(
            Param(
                "per_conversation",
                f"List this many most recent conversations with their figures (0 to {MAX_LISTED}).",
                default=0,
                kind=int,
            ),
        ),
        rows=_rows,
    )
)
