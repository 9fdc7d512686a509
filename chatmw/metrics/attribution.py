"""Channel attribution: conversations, users, conversions and revenue by touch field."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import aliased

from chatmw.events_business import format_micros
from chatmw.metrics.attribution_rollups import rolled_attribution
from chatmw.metrics.conversion import (
    ATTRIBUTION_PARAM,
    ROLLUP_NOTE,
    attributed_conversions,
    attribution_days,
    currency_of,
)
from chatmw.metrics.filters import TOUCH_FIELDS, FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import UNKNOWN_GROUP, conversation_scope
from chatmw.store.models import Conversation, Touch

__all__ = ["attribution", "ATTRIBUTION"]

MODES = ("first_touch", "last_touch")


def _conversation_touches(
    engine: Engine, flt: MetricFilter
) -> list[tuple[int, int | None, dict[str, dict[str, Any]]]]:
    scope = conversation_scope(flt).subquery()
    first, last = aliased(Touch), aliased(Touch)
    columns = list(TOUCH_FIELDS.values())
    statement = (
        select(
            Conversation.id,
            Conversation.contact_id,
            *(getattr(first, name) for name in columns),
            *(getattr(last, name) for name in columns),
        )
        .join(scope, scope.c.conversation_id == Conversation.id)
        .outerjoin(first, first.id == Conversation.first_touch_id)
        .outerjoin(last, last.id == Conversation.last_touch_id)
    )
    rows = []
    with engine.connect() as connection:
        for row in connection.execute(statement):
            values = list(row[2:])
            touches = {
                "first_touch": dict(zip(TOUCH_FIELDS, values[: len(columns)], strict=True)),
                "last_touch": dict(zip(TOUCH_FIELDS, values[len(columns) :], strict=True)),
            }
            rows.append((row[0], row[1], touches))
    return rows


def attribution(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute conversations, users, conversions and revenue per touch field value.

    Both the first and the last touch of each conversation are reported, each split by
    source, medium, campaign and ad.
    """
    if flt.group_by is not None:
        raise FilterError(
            "group_by",
            "attribution is already split by source, medium, campaign and ad; remove group_by",
        )
    days = attribution_days(options or {})
    rolled = rolled_attribution(engine, flt, days)
    if rolled is not None:
        return {
            "metric": "attribution",
            "filters": flt.describe(),
            "attribution_days": days,
            **currency_of(engine),
            **rolled,
        }
    conversations = _conversation_touches(engine, flt)
    conversions_by_conversation: dict[int, dict[int, int]] = defaultdict(dict)
    all_conversions: dict[int, int] = {}
    for row in attributed_conversions(engine, flt, days):
        conversions_by_conversation[row.conversation_id][row.conversion_id] = row.value_micros
        all_conversions[row.conversion_id] = row.value_micros

    result: dict[str, Any] = {
        "metric": "attribution",
        "filters": flt.describe(),
        "attribution_days": days,
        **currency_of(engine),
        "totals": {
            "conversations": len(conversations),
            "users": len({contact for _, contact, _ in conversations if contact is not None}),
            "conversions": len(all_conversions),
            "revenue": format_micros(sum(all_conversions.values())),
        },
    }
    for mode in MODES:
        result[mode] = {
            field: _split(conversations, conversions_by_conversation, mode, field)
            for field in TOUCH_FIELDS
        }
    return result


def _split(
    conversations: list[tuple[int, int | None, dict[str, dict[str, Any]]]],
    conversions: Mapping[int, Mapping[int, int]],
    mode: str,
    field: str,
) -> list[dict[str, Any]]:
    counts: dict[str, int] = defaultdict(int)
    users: dict[str, set[int]] = defaultdict(set)
    values: dict[str, dict[int, int]] = defaultdict(dict)
    for conversation_id, contact_id, touches in conversations:
        value = touches[mode][field]
        label = UNKNOWN_GROUP if value is None else str(value)
        counts[label] += 1
        if contact_id is not None:
            users[label].add(contact_id)
        values[label].update(conversions.get(conversation_id, {}))
    return [
        {
            "value": label,
            "conversations": counts[label],
            "users": len(users[label]),
            "conversions": len(values[label]),
            "revenue": format_micros(sum(values[label].values())),
        }
        for label in sorted(counts, key=lambda item: (-counts[item], item))
    ]


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        for field, items in result[mode].items():
            rows.extend(
                {"touch": mode, "field": field, **item, "currency": result.get("currency")}
                for item in items
            )
    return rows


ATTRIBUTION = register(
    MetricSpec(
        name="attribution",
        summary="Conversations, users, conversions and revenue by source, medium, campaign and ad",
        description=(
            "For the conversations that started in the window, split by each touch field "
            "(`source`, `medium`, `campaign`, `ad` = ad id) of their **first touch** "
            "(`first_touch`) and of their **last touch** (`last_touch`), both in one response. "
            "Each row gives the field's `value` (`(none)` for conversations without a touch or "
            "without that field), `conversations`, distinct `users`, distinct attributed "
            "`conversions` and their `revenue` (a decimal string in `currency`).\n\n"
            "Conversions are attributed as in the `conversion` metric (`attribution_days`, "
            "default 7). A conversion attributed to conversations with different values counts "
            "in full for each value, so rows may add up to more than `totals`, which count each "
            "conversion and user once. Rows are sorted by conversations, most first. "
            "`group_by` is rejected because the response is already split. Touch filters "
            "(`source`, ...) select conversations by the touch named in `touch`. An empty window "
            "gives `totals` of 0 and empty lists, never `null` figures." + ROLLUP_NOTE
        ),
        compute=attribution,
        params=(ATTRIBUTION_PARAM,),
        rows=_rows,
    )
)
