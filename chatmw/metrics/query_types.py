"""Query types: what conversations are about, with each type's resolution rate and CSAT."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, case, func, select
from sqlalchemy.orm import aliased

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.outcome_query import query_type_sums
from chatmw.metrics.outcome_rollups import TypeCounts
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.sql import disable_jit
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation, ConversationAttribute
from chatmw.store.models_surveys import Survey

__all__ = ["query_types", "QUERY_TYPES", "UNCLASSIFIED", "CSAT_SATISFIED_MIN"]

UNCLASSIFIED = "unclassified"
# The attribute the writer's keyword rules set (chatmw.business.QUERY_TYPE_ATTRIBUTE).
RULES_ATTRIBUTE = "query_type"
# CSAT scores range from 1 to 5, and 4 and 5 count as satisfied.
CSAT_SATISFIED_MIN = 4


def _chosen_type(prefer: str, intent: Any, ruled: Any) -> ColumnElement[str]:
    # An empty intent or rule type counts as missing, as it does in Python truthiness.
    first, second = (intent, ruled) if prefer == "intent" else (ruled, intent)
    return func.coalesce(func.nullif(first, ""), func.nullif(second, ""), UNCLASSIFIED)


def _type_name(prefer: str, intent: str, ruled: str) -> str:
    first, second = (intent, ruled) if prefer == "intent" else (ruled, intent)
    return first or second or UNCLASSIFIED


def _rolled_type_counts(
    engine: Engine, flt: MetricFilter, prefer: str
) -> dict[Any, dict[str, TypeCounts]] | None:
    """Return group key -> query type -> counts from rollups, or None."""
    by_channel = query_type_sums(engine, flt)
    if by_channel is None:
        return None
    counts: dict[Any, dict[str, TypeCounts]] = defaultdict(lambda: defaultdict(TypeCounts))
    for channel, pairs in by_channel.items():
        group = counts[channel if flt.group_by is not None else None]
        for (intent, ruled), item in pairs.items():
            group[_type_name(prefer, intent, ruled)].add(item)
    return counts


def _type_counts(
    engine: Engine, flt: MetricFilter, prefer: str
) -> dict[Any, dict[str, TypeCounts]]:
    """Return group key -> query type -> counts, from rollups or aggregated in SQL."""
    rolled = _rolled_type_counts(engine, flt, prefer)
    if rolled is not None:
        return rolled
    scope = conversation_scope(flt).subquery()
    rule = aliased(ConversationAttribute)
    survey = aliased(Survey)
    kind = _chosen_type(prefer, Conversation.intent, rule.value).label("kind")
    answered = survey.score.is_not(None)
    statement = (
        select(
            scope.c.group_key,
            kind,
            func.count(),
            func.coalesce(func.sum(case((Conversation.resolved.is_(True), 1), else_=0)), 0),
            func.count(survey.score),
            func.coalesce(
                func.sum(case((and_(answered, survey.score >= CSAT_SATISFIED_MIN), 1), else_=0)),
                0,
            ),
            func.coalesce(func.sum(survey.score), 0),
        )
        .select_from(scope)
        .join(Conversation, Conversation.id == scope.c.conversation_id)
        .outerjoin(
            rule, and_(rule.conversation_id == Conversation.id, rule.name == RULES_ATTRIBUTE)
        )
        .outerjoin(
            survey,
            and_(
                survey.conversation_id == Conversation.id,
                survey.kind == "csat",
                survey.score.is_not(None),
            ),
        )
        .group_by(scope.c.group_key, kind)
    )
    counts: dict[Any, dict[str, TypeCounts]] = defaultdict(dict)
    with engine.connect() as connection:
        disable_jit(connection)
        for group_key, name, *figures in connection.execute(statement):
            counts[group_key][name] = TypeCounts(*(int(value) for value in figures))
    return counts


def _csat(counts: TypeCounts) -> dict[str, Any]:
    share = rate(counts.satisfied, counts.responses)
    return {
        "responses": counts.responses,
        "csat_pct": None if share is None else round(share * 100, 2),
        "mean": round(counts.score_sum / counts.responses, 3) if counts.responses else None,
    }


def _types(counts: Mapping[str, TypeCounts]) -> dict[str, Any]:
    total = sum(item.conversations for item in counts.values())
    types = [
        {
            "type": kind,
            "conversations": counts[kind].conversations,
            "share": rate(counts[kind].conversations, total),
            "resolved": counts[kind].resolved,
            "resolution_rate": rate(counts[kind].resolved, counts[kind].conversations),
            "csat": _csat(counts[kind]),
        }
        for kind in sorted(counts, key=lambda item: (-counts[item].conversations, item))
    ]
    unclassified = counts.get(UNCLASSIFIED)
    return {
        "conversations": total,
        "classified": total - (unclassified.conversations if unclassified else 0),
        "types": types,
    }


def query_types(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Count the conversations of ``flt`` per query type, with resolution rate and CSAT."""
    prefer = (options or {}).get("prefer") or "intent"
    by_group = _type_counts(engine, flt, prefer)
    overall: dict[str, TypeCounts] = defaultdict(TypeCounts)
    for counts in by_group.values():
        for kind, item in counts.items():
            overall[kind].add(item)
    result: dict[str, Any] = {
        "metric": "query-types",
        "filters": flt.describe(),
        "prefer": prefer,
        **_types(overall),
    }
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), **_types(counts)}
            for key, counts in sorted(by_group.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows = []
    for group, section in sections:
        for item in section["types"]:
            csat = item["csat"]
            rows.append(
                {
                    "group": group,
                    "type": item["type"],
                    "conversations": item["conversations"],
                    "share": item["share"],
                    "resolved": item["resolved"],
                    "resolution_rate": item["resolution_rate"],
                    "csat_responses": csat["responses"],
                    "csat_pct": csat["csat_pct"],
                    "csat_mean": csat["mean"],
                }
            )
    return rows


QUERY_TYPES = register(
    MetricSpec(
        name="query-types",
        summary="Query types with their share, resolution rate and CSAT",
        description=(
            "Each conversation that started in the window gets one **type**: the bot's intent "
            "(`conversations.intent`, the first intent the bot or a `ConversationUpdate` "
            "reported), or the type given by keyword rules, or `unclassified`. With "
            "`prefer=intent` (default) the intent wins when both exist; with `prefer=rules` the "
            "rules win.\n\n"
            "Keyword rules are set in `chatmw.business.BusinessSettings` (`query_rules` or "
            "`query_rules_path`: a TOML file of `[[rule]]` tables or a JSON list, each with a "
            "`type` and `keywords` (whole words, any case) or a regular expression `pattern`). "
            "The writer applies them, off the request path, to each conversation's first user "
            "message and stores the first matching type as the conversation attribute "
            "`query_type` (so `attr.query_type=...` and `group_by=attr:query_type` work too). "
            "Rules apply to messages written after they are configured.\n\n"
            "Per type: `conversations`, `share` of all conversations, `resolved` and "
            "`resolution_rate` = resolved / conversations of the type, and `csat` from answered "
            "CSAT surveys (1-5): `responses`, `csat_pct` = share of scores >= "
            f"{CSAT_SATISFIED_MIN} in percent, and `mean`; `null` when there are no responses. "
            "Types are sorted by conversations, most first. An empty window gives "
            "`conversations: 0` and no types."
        ),
        compute=query_types,
        params=(
            Param(
                "prefer",
                "Which type wins when a conversation has both an intent and a rule type.",
                default="intent",
                choices=("intent", "rules"),
            ),
        ),
        rows=_rows,
    )
)
