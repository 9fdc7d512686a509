"""Response-time metrics: first response and reply time, by bot, agent and both."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import describe_seconds
from chatmw.store.models import Conversation, Message

__all__ = ["response_times", "collect_durations", "RESPONSE_TIME"]

ROLES = ("all", "bot", "agent")
FIGURES = ("first_response", "reply_time")


def collect_durations(engine: Engine, flt: MetricFilter) -> dict[str | None, dict[str, dict[str, list[float]]]]:
    """Return durations in ms: group key -> figure -> role (``all``, ``bot``, ``agent``) -> values."""
    scope = conversation_scope(flt).subquery()
    collected: dict[str | None, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: {figure: {role: [] for role in ROLES} for figure in FIGURES})
    first = (
        select(scope.c.group_key, Conversation.first_response_role, Conversation.first_response_ms)
        .join(Conversation, Conversation.id == scope.c.conversation_id)
        .where(Conversation.first_response_ms.is_not(None))
    )
    replies = (
        select(scope.c.group_key, Message.role, Message.response_ms)
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.response_ms.is_not(None))
    )
    with engine.connect() as connection:
        for figure, statement in (("first_response", first), ("reply_time", replies)):
            for group_key, role, value in connection.execute(statement):
                bucket = collected[group_key][figure]
                bucket["all"].append(value)
                if role in bucket:
                    bucket[role].append(value)
    return collected


def _figures(durations: Mapping[str, Mapping[str, list[float]]]) -> dict[str, Any]:
    return {figure: {role: describe_seconds(durations[figure][role]) for role in ROLES}
            for figure in FIGURES}


def _merge(groups: Mapping[Any, Mapping[str, Mapping[str, list[float]]]]) -> dict[str, dict[str, list[float]]]:
    merged: dict[str, dict[str, list[float]]] = {figure: {role: [] for role in ROLES} for figure in FIGURES}
    for durations in groups.values():
        for figure in FIGURES:
            for role in ROLES:
                merged[figure][role].extend(durations[figure][role])
    return merged


def response_times(engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compute first-response and reply-time figures for the conversations of ``flt``.

    First response runs from a conversation's first user message to the first bot or agent
    message after it; reply time from the first user message of each run of user messages
    to the bot or agent message that answers it. Figures are in seconds.
    """
    collected = collect_durations(engine, flt)
    result: dict[str, Any] = {"metric": "response-time", "filters": flt.describe()}
    result.update(_figures(_merge(collected)))
    if flt.group_by is not None:
        groups = []
        for key in sorted(collected, key=group_label):
            groups.append({"group": group_label(key), **_figures(collected[key])})
        result["groups"] = groups
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    for group, section in sections:
        for figure in FIGURES:
            for role in ROLES:
                rows.append({"group": group, "figure": figure, "role": role, **section[figure][role]})
    return rows


RESPONSE_TIME = register(MetricSpec(
    name="response-time",
    summary="First response and reply time",
    description=(
        "First response: a conversation's first user message to the first bot or agent "
        "message after it. Reply time: the first user message of each run of user messages "
        "to the bot or agent message that answers it. Each is given for bot messages, agent "
        "messages and both (`all`), as count, mean, p50, p90, p95 and max in seconds; "
        "percentiles interpolate linearly between ranks like PostgreSQL's percentile_cont."
    ),
    compute=response_times,
    rows=_rows,
))
