"""The row-by-row implementations that the metrics used before they aggregated in SQL.

Each function here reads the rows the earlier code read and aggregates them in Python, so
tests can check that the SQL aggregation returns the same JSON for the same store.
Helpers that did not change are imported from the metric modules.
"""

from __future__ import annotations

import dataclasses
import sys
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, select
from sqlalchemy.orm import aliased

from chatmw.events import to_ms
from chatmw.metrics import business_hours, conversion, leads, resolution, retention
from chatmw.metrics.conversion import AttributedConversion, ResolvedConversion
from chatmw.metrics.cpa import _day_in_window
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.scope import UNKNOWN_GROUP, conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation, ConversationAttribute, Message
from chatmw.store.models_business import Spend
from chatmw.store.models_surveys import Survey

DAY_MS = 86_400_000


def first_contact_resolution(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any]
) -> dict[str, Any]:
    hours = resolution.repeat_hours(options)
    counts: dict[Any, dict[str, int]] = defaultdict(lambda: dict.fromkeys(resolution.COUNTS, 0))
    with engine.connect() as connection:
        for group_key, _, resolved, handed_off, repeated in connection.execute(
            resolution.conversation_outcomes(flt, hours)
        ):
            bucket = counts[group_key]
            bucket["conversations"] += 1
            if not resolved:
                continue
            bucket["resolved"] += 1
            bucket["resolved_handed_off"] += int(bool(handed_off))
            bucket["resolved_repeated"] += int(bool(repeated))
            bucket["first_contact_resolved"] += int(not handed_off and not repeated)
    overall = dict.fromkeys(resolution.COUNTS, 0)
    for values in counts.values():
        for name in resolution.COUNTS:
            overall[name] += values[name]
    result: dict[str, Any] = {
        "metric": "resolution",
        "filters": flt.describe(),
        "repeat_hours": hours,
        **resolution._with_rates(overall),
    }
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), **resolution._with_rates(values)}
            for key, values in sorted(counts.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def _type_rows(engine: Engine, flt: MetricFilter, prefer: str) -> list[tuple[Any, ...]]:
    scope = conversation_scope(flt).subquery()
    rule = aliased(ConversationAttribute)
    survey = aliased(Survey)
    statement = (
        select(
            scope.c.group_key, Conversation.intent, rule.value, Conversation.resolved, survey.score
        )
        .join(Conversation, Conversation.id == scope.c.conversation_id)
        .outerjoin(rule, and_(rule.conversation_id == Conversation.id, rule.name == "query_type"))
        .outerjoin(
            survey,
            and_(
                survey.conversation_id == Conversation.id,
                survey.kind == "csat",
                survey.score.is_not(None),
            ),
        )
    )
    rows = []
    with engine.connect() as connection:
        for group_key, intent, ruled, resolved, score in connection.execute(statement):
            chosen = (intent or ruled) if prefer == "intent" else (ruled or intent)
            rows.append((group_key, chosen or "unclassified", bool(resolved), score))
    return rows


def _type_figures(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    resolved: dict[str, int] = defaultdict(int)
    scores: dict[str, list[int]] = defaultdict(list)
    for _, kind, is_resolved, score in rows:
        counts[kind] += 1
        resolved[kind] += int(is_resolved)
        if score is not None:
            scores[kind].append(int(score))

    def csat(values: list[int]) -> dict[str, Any]:
        share = rate(sum(1 for value in values if value >= 4), len(values))
        return {
            "responses": len(values),
            "csat_pct": None if share is None else round(share * 100, 2),
            "mean": round(sum(values) / len(values), 3) if values else None,
        }

    total = len(rows)
    return {
        "conversations": total,
        "classified": total - counts.get("unclassified", 0),
        "types": [
            {
                "type": kind,
                "conversations": counts[kind],
                "share": rate(counts[kind], total),
                "resolved": resolved[kind],
                "resolution_rate": rate(resolved[kind], counts[kind]),
                "csat": csat(scores[kind]),
            }
            for kind in sorted(counts, key=lambda item: (-counts[item], item))
        ],
    }


def query_types(engine: Engine, flt: MetricFilter, options: Mapping[str, Any]) -> dict[str, Any]:
    prefer = options.get("prefer") or "intent"
    rows = _type_rows(engine, flt, prefer)
    result: dict[str, Any] = {
        "metric": "query-types",
        "filters": flt.describe(),
        "prefer": prefer,
        **_type_figures(rows),
    }
    if flt.group_by is not None:
        by_group: dict[Any, list[tuple[Any, ...]]] = defaultdict(list)
        for row in rows:
            by_group[row[0]].append(row)
        result["groups"] = [
            {"group": group_label(key), **_type_figures(items)}
            for key, items in sorted(by_group.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def _pct(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole * 100, 2)


def _csat_figures(items: list[tuple[bool, int | None]]) -> dict[str, Any]:
    scores = [score for sent, score in items if sent and score is not None]
    sent = sum(1 for was_sent, _ in items if was_sent)
    satisfied = sum(1 for score in scores if score >= 4)
    return {
        "sent": sent,
        "answers": len(scores),
        "satisfied": satisfied,
        "score": _pct(satisfied, len(scores)),
        "mean": None if not scores else round(sum(scores) / len(scores), 3),
        "distribution": {str(value): scores.count(value) for value in range(1, 6)},
        "response_rate_pct": _pct(len(scores), sent),
    }


def _nps_figures(items: list[tuple[bool, int | None]]) -> dict[str, Any]:
    scores = [score for sent, score in items if sent and score is not None]
    sent = sum(1 for was_sent, _ in items if was_sent)
    promoters = sum(1 for score in scores if score >= 9)
    detractors = sum(1 for score in scores if score <= 6)
    return {
        "sent": sent,
        "answers": len(scores),
        "promoters": promoters,
        "passives": len(scores) - promoters - detractors,
        "detractors": detractors,
        "promoters_pct": _pct(promoters, len(scores)),
        "detractors_pct": _pct(detractors, len(scores)),
        "nps": round((promoters - detractors) / len(scores) * 100, 2) if scores else None,
        "distribution": {str(value): scores.count(value) for value in range(0, 11)},
        "response_rate_pct": _pct(len(scores), sent),
    }


def survey_metric(engine: Engine, flt: MetricFilter, kind: str) -> dict[str, Any]:
    scope = conversation_scope(flt).subquery()
    statement = (
        select(scope.c.group_key, Survey.sent_at_ms, Survey.score)
        .join(Survey, Survey.conversation_id == scope.c.conversation_id)
        .where(Survey.kind == kind)
    )
    grouped: dict[Any, list[tuple[bool, int | None]]] = defaultdict(list)
    with engine.connect() as connection:
        for key, sent_at, score in connection.execute(statement):
            grouped[key].append((sent_at is not None, score))
    figures = _csat_figures if kind == "csat" else _nps_figures
    everything = [item for items in grouped.values() for item in items]
    result: dict[str, Any] = {"metric": kind, "filters": flt.describe(), **figures(everything)}
    if flt.group_by is not None:
        keys = sorted(grouped, key=group_label)
        result["groups"] = [{"group": group_label(key), **figures(grouped[key])} for key in keys]
    return result


def _leads_in_scope(
    engine: Engine, flt: MetricFilter, stored: Sequence[tuple[Any, ...]]
) -> list[Any]:
    with engine.connect() as connection:
        group_of = {row[0]: row[1] for row in connection.execute(conversation_scope(flt))}
    return [
        leads._LeadRow(group_of[conv_id], lead_id, kind, origin, score, occurred_ms, contact_id)
        for lead_id, kind, origin, score, occurred_ms, contact_id, conv_id in stored
        if conv_id in group_of
    ]


def leads_metric(engine: Engine, flt: MetricFilter) -> dict[str, Any]:
    with engine.connect() as connection:
        stored = [tuple(row) for row in connection.execute(leads.lead_conversations())]
    rows = _leads_in_scope(engine, flt, stored)
    by_source = _leads_in_scope(
        engine, dataclasses.replace(flt, group_by=GroupBy("source")), stored
    )
    converted_after: dict[int, int] = {}
    for item in load_all_conversions(engine):
        if item.contact_id is not None:
            converted_after[item.contact_id] = max(
                item.occurred_at_ms, converted_after.get(item.contact_id, -1)
            )
    result: dict[str, Any] = {
        "metric": "leads",
        "filters": flt.describe(),
        **leads._figures(rows, converted_after),
    }
    result["by_source"] = leads._split(by_source, converted_after)
    if flt.group_by is not None:
        result["groups"] = leads._split(rows, converted_after)
    return result


def retention_metric(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any]
) -> dict[str, Any]:
    period = options.get("period") or "week"
    following = int(options.get("periods") or 12)
    scope = conversation_scope(flt, window=False).subquery()
    statement = (
        select(Conversation.contact_id, Conversation.started_at_ms, scope.c.group_key)
        .join(scope, Conversation.id == scope.c.conversation_id)
        .where(Conversation.contact_id.is_not(None))
    )
    if flt.until_ms is not None:
        statement = statement.where(Conversation.started_at_ms < flt.until_ms)
    by_contact: dict[int, list[tuple[int, Any]]] = defaultdict(list)
    with engine.connect() as connection:
        for contact_id, started, key in connection.execute(statement):
            by_contact[contact_id].append((started, key))
    for starts in by_contact.values():
        starts.sort(key=lambda item: item[0])
    end_ms = flt.until_ms if flt.until_ms is not None else to_ms(datetime.now(UTC))
    result: dict[str, Any] = {
        "metric": "retention",
        "filters": flt.describe(),
        "period": period,
        "periods": following,
    }
    contacts = list(by_contact.values())
    result["cohorts"] = retention._table_for(contacts, flt, period, following, end_ms)
    if flt.group_by is not None:
        members: dict[Any, list[list[tuple[int, Any]]]] = defaultdict(list)
        for conversations in contacts:
            members[conversations[0][1]].append(conversations)
        result["groups"] = [
            {
                "group": group_label(key),
                "cohorts": retention._table_for(items, flt, period, following, end_ms),
            }
            for key, items in sorted(members.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def load_all_conversions(engine: Engine) -> list[ResolvedConversion]:
    with engine.connect() as connection:
        return [
            ResolvedConversion(
                row.conversion_id,
                row.name,
                row.value_micros,
                row.occurred_at_ms,
                row.conversation_external_id is not None,
                row.contact_id,
                row.linked_conversation_id,
            )
            for row in connection.execute(conversion.resolved_conversions())
        ]


def attributed_conversions(
    engine: Engine,
    flt: MetricFilter,
    days: float,
    conversions: Sequence[ResolvedConversion] | None = None,
) -> list[AttributedConversion]:
    """Match every stored conversion against every conversation in scope."""
    if conversions is None:
        conversions = load_all_conversions(engine)
    scope = conversation_scope(flt).subquery()
    statement = select(
        scope.c.conversation_id,
        scope.c.group_key,
        Conversation.contact_id,
        Conversation.started_at_ms,
    ).join(Conversation, Conversation.id == scope.c.conversation_id)
    with engine.connect() as connection:
        scoped = [tuple(row) for row in connection.execute(statement)]
    group_of = {conversation_id: key for conversation_id, key, _, _ in scoped}
    by_contact: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for conversation_id, _, contact_id, started_ms in scoped:
        if contact_id is not None:
            by_contact[contact_id].append((started_ms, conversation_id))
    for entries in by_contact.values():
        entries.sort()
    window_ms = int(days * DAY_MS)
    rows: list[AttributedConversion] = []
    for item in conversions:
        targets: list[int] = []
        if item.names_conversation:
            if item.linked_conversation_id in group_of:
                targets.append(item.linked_conversation_id)
        elif item.contact_id is not None:
            entries = by_contact.get(item.contact_id, [])
            low = bisect_left(entries, (item.occurred_at_ms - window_ms, -1))
            high = bisect_right(entries, (item.occurred_at_ms, sys.maxsize))
            targets.extend(conversation_id for _, conversation_id in entries[low:high])
        rows.extend(
            AttributedConversion(
                group_of[target],
                target,
                item.conversion_id,
                item.name,
                item.value_micros,
                item.occurred_at_ms,
                item.contact_id,
            )
            for target in targets
        )
    return rows


def spend_by_group(engine: Engine, flt: MetricFilter, group_by: GroupBy) -> dict[str, int]:
    """Sum every spend row whose day's local midnight falls in the window."""
    statement = select(Spend.day, Spend.channel, Spend.campaign, Spend.amount_micros)
    if flt.channels:
        statement = statement.where(Spend.channel.in_(flt.channels))
    if "campaign" in flt.touch_filters:
        statement = statement.where(Spend.campaign == flt.touch_filters["campaign"])
    spend: dict[str, int] = defaultdict(int)
    with engine.connect() as connection:
        for day, channel, campaign, micros in connection.execute(statement):
            if _day_in_window(day, flt):
                key = channel if group_by.kind == "channel" else campaign
                spend[key or UNKNOWN_GROUP] += micros
    return spend


def business_durations(engine: Engine, flt: MetricFilter, hours: Any) -> dict[Any, Any]:
    """Return durations in ms, with each answer's business time computed on its own."""
    scope = conversation_scope(flt).subquery()
    statement = (
        select(
            scope.c.group_key,
            Message.channel,
            Message.role,
            Message.occurred_at_ms,
            Message.response_ms,
            Message.is_first_response,
        )
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.response_ms.is_not(None))
    )
    collected: dict[Any, Any] = defaultdict(business_hours._empty)
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    for key, channel, role, answered_ms, response_ms, is_first in rows:
        began_ms = answered_ms - int(round(response_ms))
        business = float(hours.for_channel(channel).business_ms(began_ms, answered_ms))
        figures = ("reply_time", "first_response") if is_first else ("reply_time",)
        for figure in figures:
            for basis, value in (("calendar", float(response_ms)), ("business", business)):
                collected[key][figure][basis]["all"].append(value)
                if role in business_hours.ROLES:
                    collected[key][figure][basis][role].append(value)
    return collected
