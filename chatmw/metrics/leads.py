"""Leads: contact details users gave, and the share of them that later converted."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Select, and_, func, select
from sqlalchemy.orm import aliased

from chatmw.metrics.business_query import serves_filter
from chatmw.metrics.conversion import ROLLUP_NOTE, resolved_conversions
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.lead_query import LeadSums, rolled_leads
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_business import Lead

__all__ = ["lead_conversations", "leads", "LEADS"]

# Conversation ids bound per query, below SQLite's default limit of 32,766 bound
# parameters (SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32.0).
IDS_PER_QUERY = 10_000


def lead_conversations() -> Select[*tuple[Any, ...]]:
    """Select each lead with its contact and conversation.

    The conversation is the one the lead was found in, else the one it names, else the
    user's latest conversation on the channel that started at or before the lead.
    """
    contact = aliased(Contact)
    named = aliased(Conversation)
    earlier = aliased(Conversation)
    latest = (
        select(earlier.id)
        .where(
            earlier.contact_id == contact.id,
            earlier.channel == Lead.channel,
            earlier.started_at_ms <= Lead.occurred_at_ms,
        )
        .order_by(earlier.started_at_ms.desc(), earlier.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        select(
            Lead.id.label("lead_id"),
            Lead.kind,
            Lead.origin,
            Lead.score,
            Lead.occurred_at_ms,
            contact.id.label("contact_id"),
            func.coalesce(Lead.conversation_id, named.id, latest).label("conversation_id"),
        )
        .outerjoin(
            contact, and_(contact.channel == Lead.channel, contact.external_id == Lead.user_id)
        )
        .outerjoin(
            named,
            and_(named.channel == Lead.channel, named.external_id == Lead.conversation_external_id),
        )
    )


@dataclass(frozen=True, slots=True)
class _LeadRow:
    group_key: Any
    lead_id: int
    kind: str
    origin: str
    score: float | None
    occurred_at_ms: int
    contact_id: int | None


def _load_leads(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(lead_conversations())]


def _group_keys(engine: Engine, flt: MetricFilter, ids: Sequence[int]) -> dict[int, Any]:
    """Return conversation id -> group key for those of ``ids`` that ``flt`` covers."""
    # Matched here rather than by joining two derived tables, which SQLite runs as a
    # nested loop without an index. Only the conversations that leads point to are read,
    # in chunks that stay under SQLite's limit on bound parameters.
    group_of: dict[int, Any] = {}
    with engine.connect() as connection:
        for first in range(0, len(ids), IDS_PER_QUERY):
            chunk = ids[first : first + IDS_PER_QUERY]
            scope = conversation_scope(flt).where(Conversation.id.in_(chunk))
            group_of.update((row[0], row[1]) for row in connection.execute(scope))
    return group_of


def _leads_in_scope(
    group_of: Mapping[int, Any], leads: Sequence[tuple[Any, ...]]
) -> list[_LeadRow]:
    return [
        _LeadRow(group_of[conversation_id], lead_id, kind, origin, score, occurred_ms, contact_id)
        for lead_id, kind, origin, score, occurred_ms, contact_id, conversation_id in leads
        if conversation_id in group_of
    ]


def _conversion_times(engine: Engine) -> dict[int, int]:
    """Return each contact's latest conversion time in ms."""
    resolved = resolved_conversions().subquery()
    statement = (
        select(resolved.c.contact_id, func.max(resolved.c.occurred_at_ms))
        .where(resolved.c.contact_id.is_not(None))
        .group_by(resolved.c.contact_id)
    )
    with engine.connect() as connection:
        return {
            int(contact_id): int(latest) for contact_id, latest in connection.execute(statement)
        }


def _figures(rows: Sequence[_LeadRow], converted_after: Mapping[int, int]) -> dict[str, Any]:
    # One lead can be attached to several scope rows only through grouping; count ids once.
    unique = {row.lead_id: row for row in rows}.values()
    sums = LeadSums()
    for row in unique:
        sums.leads += 1
        sums.kinds[row.kind] += 1
        sums.origins[row.origin] += 1
        if row.contact_id is not None:
            sums.converted += converted_after.get(row.contact_id, -1) >= row.occurred_at_ms
        if row.score is not None:
            sums.scored += 1
    sums.users = len({row.contact_id for row in unique if row.contact_id is not None})
    scores = [row.score for row in unique if row.score is not None]
    return _section(sums, math.fsum(scores))


def _section(sums: LeadSums, score_sum: float | None = None) -> dict[str, Any]:
    """Return the figures of one group (``score_sum`` defaults to ``sums.score_sum``)."""
    total = sums.score_sum if score_sum is None else score_sum
    return {
        "leads": sums.leads,
        "users": sums.users,
        "by_kind": {kind: sums.kinds.get(kind, 0) for kind in ("email", "phone")},
        "by_origin": {origin: sums.origins.get(origin, 0) for origin in ("message", "api")},
        "converted_leads": sums.converted,
        "lead_quality": rate(sums.converted, sums.leads),
        "scored_leads": sums.scored,
        "average_score": round(total / sums.scored, 2) if sums.scored else None,
    }


def _split(rows: Sequence[_LeadRow], converted_after: Mapping[int, int]) -> list[dict[str, Any]]:
    by_group: dict[Any, list[_LeadRow]] = defaultdict(list)
    for row in rows:
        by_group[row.group_key].append(row)
    return [
        {"group": group_label(key), **_figures(items, converted_after)}
        for key, items in sorted(by_group.items(), key=lambda item: group_label(item[0]))
    ]


def leads(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute leads, lead quality and scores for the conversations of ``flt``, per source."""
    if serves_filter(flt):
        splits = rolled_leads(engine, flt)
        if splits is not None:
            return _rolled_result(flt, splits)
    stored = _load_leads(engine)
    ids = sorted({lead[-1] for lead in stored if lead[-1] is not None})
    source_of = _group_keys(engine, dataclasses.replace(flt, group_by=GroupBy("source")), ids)
    # Grouping never changes which conversations a filter covers, only their keys.
    group_of = dict.fromkeys(source_of) if flt.group_by is None else _group_keys(engine, flt, ids)
    rows = _leads_in_scope(group_of, stored)
    by_source = _leads_in_scope(source_of, stored)
    return _result(flt, rows, by_source, _conversion_times(engine))


def _rolled_result(
    flt: MetricFilter, splits: Mapping[str, Mapping[Any, LeadSums]]
) -> dict[str, Any]:
    def ordered(split: str) -> list[dict[str, Any]]:
        items = sorted(splits[split].items(), key=lambda item: group_label(item[0]))
        return [{"group": group_label(key), **_section(sums)} for key, sums in items]

    result: dict[str, Any] = {
        "metric": "leads",
        "filters": flt.describe(),
        **_section(splits["all"].get(None, LeadSums())),
    }
    result["by_source"] = ordered("by_source")
    if flt.group_by is not None:
        result["groups"] = ordered("groups")
    return result


def _result(
    flt: MetricFilter,
    rows: Sequence[_LeadRow],
    by_source: Sequence[_LeadRow],
    converted_after: Mapping[int, int],
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "metric": "leads",
        "filters": flt.describe(),
        **_figures(rows, converted_after),
    }
    result["by_source"] = _split(by_source, converted_after)
    if flt.group_by is not None:
        result["groups"] = _split(rows, converted_after)
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    names = ("leads", "users", "converted_leads", "lead_quality", "scored_leads", "average_score")
    rows = [{"split": "(all)", "group": "(all)", **{name: result[name] for name in names}}]
    for split in ("by_source", "groups"):
        rows.extend(
            {"split": split, "group": item["group"], **{name: item[name] for name in names}}
            for item in result.get(split, [])
        )
    return rows


LEADS = register(
    MetricSpec(
        name="leads",
        summary="Leads captured, lead quality and score, per source",
        description=(
            "A **lead** is an e-mail address or phone number a user gave: found in a user "
            "message by the writer (when `chatmw.business.install` is active), or recorded "
            "through `POST /business/leads`. One user giving the same address twice is one "
            "lead; an address and a phone number are two. Leads count for the conversation they "
            "were found in, else the conversation they name, else the user's latest conversation "
            "on the channel that started at or before them; so a lead counts in the window in "
            "which that conversation started. Leads with no such conversation are not counted.\n\n"
            "- `leads`, `users` (distinct users with a lead), `by_kind` (email, phone), "
            "`by_origin` (message, api).\n"
            "- **Lead quality** = leads whose user has a conversion at or after the lead's time "
            "/ leads (`null` when there are no leads).\n"
            "- `average_score`: the mean of the optional scores (0-100) given through the API, "
            "over `scored_leads`; `null` when none has a score.\n"
            "- `by_source`: the same per source of the conversation's touch (`touch`, last by "
            "default); `(none)` when it has no touch. `groups` (with `group_by`): per group."
            + ROLLUP_NOTE
        ),
        compute=leads,
        rows=_rows,
    )
)
