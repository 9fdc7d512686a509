"""Summary: totals and response times for a window and the window before it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, case, func, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.response_time import (
    EXACT,
    collect_durations,
    describe_responses,
    exact_requested,
)
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.started_query import StartedFigures, started_figures
from chatmw.metrics.stats import describe_seconds
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message

__all__ = ["summary", "SUMMARY"]

TOTALS = ("conversations", "messages", "user_messages", "bot_messages", "agent_messages", "users")


def _totals(engine: Engine, flt: MetricFilter) -> dict[Any, dict[str, int]]:
    scope = conversation_scope(flt).subquery()
    conversations = (
        select(scope.c.group_key, func.count())
        .join(Conversation, Conversation.id == scope.c.conversation_id)
        .group_by(scope.c.group_key)
    )
    users = (
        select(scope.c.group_key, func.count(func.distinct(Message.contact_id)))
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.role == "user", Message.kind.not_in(UNTIMED_KINDS))
        .group_by(scope.c.group_key)
    )
    messages = (
        select(
            scope.c.group_key,
            func.count(),
            func.sum(case((Message.role == "user", 1), else_=0)),
            func.sum(case((Message.role == "bot", 1), else_=0)),
            func.sum(case((Message.role == "agent", 1), else_=0)),
        )
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.kind.not_in(UNTIMED_KINDS))
        .group_by(scope.c.group_key)
    )
    totals: dict[Any, dict[str, int]] = {}
    with engine.connect() as connection:
        for key, count in connection.execute(conversations):
            totals.setdefault(key, dict.fromkeys(TOTALS, 0))["conversations"] = count
        for key, count in connection.execute(users):
            totals.setdefault(key, dict.fromkeys(TOTALS, 0))["users"] = count
        for key, count, user, bot, agent in connection.execute(messages):
            totals.setdefault(key, dict.fromkeys(TOTALS, 0)).update(
                messages=count,
                user_messages=int(user or 0),
                bot_messages=int(bot or 0),
                agent_messages=int(agent or 0),
            )
    return totals


def _distinct_users(engine: Engine, flt: MetricFilter) -> int:
    # Distinct contacts who sent a user message in the covered conversations: in a
    # multi-party conversation every writer counts, not only the conversation's owner.
    scope = conversation_scope(flt).subquery()
    statement = (
        select(func.count(func.distinct(Message.contact_id)))
        .join(scope, Message.conversation_id == scope.c.conversation_id)
        .where(Message.role == "user", Message.kind.not_in(UNTIMED_KINDS))
    )
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def _rollup_section(flt: MetricFilter, figures: StartedFigures) -> dict[str, Any]:
    totals = figures.totals
    responses = figures.responses
    overall = dict.fromkeys(TOTALS, 0)
    for values in totals.values():
        for name in TOTALS:
            overall[name] += values[name]
    overall["users"] = figures.users
    section: dict[str, Any] = {
        "totals": overall,
        "first_response": describe_responses(responses.values(), "first_response", "all"),
        "reply_time": describe_responses(responses.values(), "reply_time", "all"),
    }
    if flt.group_by is not None:
        keys = sorted(set(totals) | set(responses), key=group_label)
        section["groups"] = [
            {
                "group": group_label(key),
                "totals": totals.get(key, dict.fromkeys(TOTALS, 0)),
                "first_response": describe_responses(
                    [responses.get(key, {})], "first_response", "all"
                ),
                "reply_time": describe_responses([responses.get(key, {})], "reply_time", "all"),
            }
            for key in keys
        ]
    return section


def _section(engine: Engine, flt: MetricFilter, exact: bool) -> dict[str, Any]:
    figures = None if exact else started_figures(engine, flt)
    if figures is not None:
        return _rollup_section(flt, figures)
    totals = _totals(engine, flt)
    durations = collect_durations(engine, flt)
    overall = dict.fromkeys(TOTALS, 0)
    for values in totals.values():
        for name in TOTALS:
            overall[name] += values[name]
    # A user can appear in several groups; the overall count is distinct across them.
    overall["users"] = _distinct_users(engine, flt)
    first = [v for d in durations.values() for v in d["first_response"]["all"]]
    replies = [v for d in durations.values() for v in d["reply_time"]["all"]]
    section: dict[str, Any] = {
        "totals": overall,
        "first_response": describe_seconds(first),
        "reply_time": describe_seconds(replies),
    }
    if flt.group_by is not None:
        keys = sorted(set(totals) | set(durations), key=group_label)
        section["groups"] = [
            {
                "group": group_label(key),
                "totals": totals.get(key, dict.fromkeys(TOTALS, 0)),
                "first_response": describe_seconds(
                    durations[key]["first_response"]["all"] if key in durations else []
                ),
                "reply_time": describe_seconds(
                    durations[key]["reply_time"]["all"] if key in durations else []
                ),
            }
            for key in keys
        ]
    return section


def _change(current: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, Any]:
    change: dict[str, Any] = {}
    for name in TOTALS:
        difference = current[name] - previous[name]
        change[name] = difference
        change[f"{name}_pct"] = (
            None if previous[name] == 0 else round(difference / previous[name] * 100, 2)
        )
    return change


def summary(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute totals and response times for the window and for the previous window.

    The previous window has the same length and ends where this one starts; it is
    ``null`` when the window is unbounded. Where rollups cover a window, its percentiles
    are estimated as in the ``response-time`` metric unless ``exact`` is ``true``.
    """
    exact = exact_requested(options)
    current = _section(engine, flt, exact)
    result: dict[str, Any] = {"metric": "summary", "filters": flt.describe(), **current}
    before = flt.shifted_back()
    if before is None:
        result["previous"] = None
        result["change"] = None
        return result
    previous = _section(engine, before, exact)
    previous.pop("groups", None)
    result["previous"] = {
        "since": before.since.isoformat() if before.since else None,
        "until": before.until.isoformat() if before.until else None,
        **previous,
    }
    result["change"] = _change(current["totals"], previous["totals"])
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows = []
    for group, section in sections:
        row: dict[str, Any] = {"group": group, **section["totals"]}
        for figure in ("first_response", "reply_time"):
            for name, value in section[figure].items():
                row[f"{figure}_{name}"] = value
        rows.append(row)
    return rows


SUMMARY = register(
    MetricSpec(
        name="summary",
        summary="Totals and response times, with the previous window",
        description=(
            "Conversations started in the window, their messages (by role) and distinct users "
            "(contacts who sent at least one message in them), "
            "with first-response and reply-time figures in seconds; the same for the previous "
            "window of equal length and the change between the two. Where rollups cover a "
            "window, percentiles are estimated as in `response-time`; `exact=true` computes "
            "them from every raw duration."
        ),
        compute=summary,
        params=(EXACT,),
        rows=_rows,
    )
)
