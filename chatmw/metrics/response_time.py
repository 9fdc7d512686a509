"""Response-time metrics: first response and reply time, by bot, agent and both."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.histogram import Histogram, describe_histogram
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.started_query import EXACT_PARAM_HELP, started_figures
from chatmw.metrics.stats import describe_seconds
from chatmw.store.models import Conversation, Message

__all__ = [
    "response_times",
    "collect_durations",
    "describe_responses",
    "exact_requested",
    "RESPONSE_TIME",
    "EXACT",
]

ROLES = ("all", "bot", "agent")
FIGURES = ("first_response", "reply_time")
EXACT = Param("exact", EXACT_PARAM_HELP, default="false", choices=("true", "false"))


def exact_requested(options: Mapping[str, Any] | None) -> bool:
    """Return True when the options ask for percentiles from raw durations."""
    return (options or {}).get("exact") == "true"


def describe_responses(
    groups: Iterable[Mapping[str, Mapping[str, Histogram]]], figure: str, role: str
) -> dict[str, Any]:
    """Describe one figure of rollup histograms merged over ``groups``; ``all`` takes every role."""
    histograms = []
    for by_figure in groups:
        by_role = by_figure.get(figure, {})
        if role == "all":
            histograms.extend(by_role.values())
        elif role in by_role:
            histograms.append(by_role[role])
    return describe_histogram(histograms)


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
    to the bot or agent message that answers it. Figures are in seconds. Where rollups
    cover the window, percentiles are estimated from rollup histograms
    (``chatmw.metrics.histogram``) unless the ``exact`` option is ``true``.
    """
    result: dict[str, Any] = {"metric": "response-time", "filters": flt.describe()}
    figures = None if exact_requested(options) else started_figures(engine, flt, totals=False)
    if figures is not None:
        responses = figures.responses
        for figure in FIGURES:
            result[figure] = {
                role: describe_responses(responses.values(), figure, role) for role in ROLES
            }
        if flt.group_by is not None:
            result["groups"] = [
                {
                    "group": group_label(key),
                    **{
                        figure: {
                            role: describe_responses([responses[key]], figure, role)
                            for role in ROLES
                        }
                        for figure in FIGURES
                    },
                }
                for key in sorted(responses, key=group_label)
            ]
        return result
    collected = collect_durations(engine, flt)
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
        "percentiles interpolate linearly between ranks like PostgreSQL's percentile_cont. "
        "Where rollups cover the window, count, mean and max are exact and each percentile "
        "is estimated from log-scale histograms to within 4.45 % of the exact value "
        "(exact below 23 ms); `exact=true` computes it from every raw duration."
    ),
    compute=response_times,
    params=(EXACT,),
    rows=_rows,
))
