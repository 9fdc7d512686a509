"""Query types: what conversations are about, with each type's resolution rate and CSAT."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, and_, select
from sqlalchemy.orm import aliased

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation, ConversationAttribute
from chatmw.store.models_surveys import Survey

__all__ = ["query_types", "QUERY_TYPES", "UNCLASSIFIED", "CSAT_SATISFIED_MIN"]

UNCLASSIFIED = "unclassified"
# The attribute the writer's keyword rules set (chatmw.business.QUERY_TYPE_ATTRIBUTE).
RULES_ATTRIBUTE = "query_type"
# CSAT scores range from 1 to 5, and 4 and 5 count as satisfied.
CSAT_SATISFIED_MIN = 4


def _conversation_types(
    engine: Engine, flt: MetricFilter, prefer: str
) -> list[tuple[Any, str, bool, int | None]]:
    scope = conversation_scope(flt).subquery()
    rule = aliased(ConversationAttribute)
    survey = aliased(Survey)
    statement = (
        select(
            scope.c.group_key, Conversation.intent, rule.value, Conversation.resolved, survey.score
        )
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
    )
    rows = []
    with engine.connect() as connection:
        for group_key, intent, ruled, resolved, score in connection.execute(statement):
            chosen = (intent or ruled) if prefer == "intent" else (ruled or intent)
            rows.append((group_key, chosen or UNCLASSIFIED, bool(resolved), score))
    return rows


def _csat(scores: list[int]) -> dict[str, Any]:
    satisfied = sum(1 for score in scores if score >= CSAT_SATISFIED_MIN)
    share = rate(satisfied, len(scores))
    return {
        "responses": len(scores),
        "csat_pct": None if share is None else round(share * 100, 2),
        "mean": round(sum(scores) / len(scores), 3) if scores else None,
    }


def _types(rows: list[tuple[Any, str, bool, int | None]]) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    resolved: dict[str, int] = defaultdict(int)
    scores: dict[str, list[int]] = defaultdict(list)
    for _, kind, is_resolved, score in rows:
        counts[kind] += 1
        resolved[kind] += int(is_resolved)
        if score is not None:
            scores[kind].append(int(score))
    total = len(rows)
    types = [
        {
            "type": kind,
            "conversations": counts[kind],
            "share": rate(counts[kind], total),
            "resolved": resolved[kind],
            "resolution_rate": rate(resolved[kind], counts[kind]),
            "csat": _csat(scores[kind]),
        }
        for kind in sorted(counts, key=lambda item: (-counts[item], item))
    ]
    return {
        "conversations": total,
        "classified": total - counts.get(UNCLASSIFIED, 0),
        "types": types,
    }


def query_types(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Count the conversations of ``flt`` per query type, with resolution rate and CSAT."""
    prefer = (options or {}).get("prefer") or "intent"
    rows = _conversation_types(engine, flt, prefer)
    result: dict[str, Any] = {
        "metric": "query-types",
        "filters": flt.describe(),
        "prefer": prefer,
        **_types(rows),
    }
    if flt.group_by is not None:
        by_group: dict[Any, list[tuple[Any, str, bool, int | None]]] = defaultdict(list)
        for row in rows:
            by_group[row[0]].append(row)
        result["groups"] = [
            {"group": group_label(key), **_types(items)}
            for key, items in sorted(by_group.items(), key=lambda item: group_label(item[0]))
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
