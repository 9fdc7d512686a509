"""Drop-off: where conversations that ended without an outcome stopped, and a step funnel."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from chatmw.events import to_ms
from chatmw.metrics.conversion import ATTRIBUTION_PARAM, attributed_conversions, attribution_days
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.identity import CHUNK
from chatmw.store.models import Conversation, Message

__all__ = ["dropoff", "DROPOFF", "UNKNOWN_STEP"]

UNKNOWN_STEP = "(unknown)"
DEFAULT_IDLE_MINUTES = 30.0
MAX_STEPS = 50
_STEP = re.compile(r"^[^\x00-\x1f,]{1,128}$")


def _parse_steps(text: str | None) -> list[str]:
    if not text:
        return []
    steps = [part.strip() for part in text.split(",")]
    if any(not step for step in steps):
        raise FilterError(
            "steps", "empty step name; give names separated by commas, e.g. steps=greet,ask,pay"
        )
    if len(steps) > MAX_STEPS:
        raise FilterError("steps", f"at most {MAX_STEPS} steps, got {len(steps)}")
    for step in steps:
        if not _STEP.match(step):
            raise FilterError("steps", f"invalid step name {step[:40]!r}")
    if len(set(steps)) != len(steps):
        raise FilterError("steps", "a step is named twice")
    return steps


def _conversations(
    engine: Engine, flt: MetricFilter
) -> list[tuple[Any, int, bool, int | None, int, str | None]]:
    scope = conversation_scope(flt).subquery()
    statement = select(
        scope.c.group_key,
        Conversation.id,
        Conversation.resolved,
        Conversation.ended_at_ms,
        Conversation.last_message_at_ms,
        Conversation.last_step,
    ).join(Conversation, Conversation.id == scope.c.conversation_id)
    with engine.connect() as connection:
        return [
            (key, cid, bool(resolved), ended, last, step)
            for key, cid, resolved, ended, last, step in connection.execute(statement)
        ]


def _bot_intents(engine: Engine, conversation_ids: Sequence[int]) -> dict[int, list[str]]:
    """Return the intents of each conversation's bot messages, in time order."""
    intents: dict[int, list[str]] = defaultdict(list)
    with engine.connect() as connection:
        for start in range(0, len(conversation_ids), CHUNK):
            statement = (
                select(Message.conversation_id, Message.intent)
                .where(
                    Message.conversation_id.in_(conversation_ids[start : start + CHUNK]),
                    Message.role == "bot",
                    Message.intent.is_not(None),
                )
                .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
            )
            for conversation_id, intent in connection.execute(statement):
                if intent is not None:
                    intents[conversation_id].append(intent)
    return intents


def _last_steps(
    dropped: Sequence[tuple[Any, int, bool, int | None, int, str | None]],
    intents: Mapping[int, list[str]],
) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    for _, conversation_id, _, _, _, last_step in dropped:
        bot_intents = intents.get(conversation_id)
        step = last_step or (bot_intents[-1] if bot_intents else None) or UNKNOWN_STEP
        counts[step] += 1
    return {
        "dropped": len(dropped),
        "last_steps": [
            {"step": step, "conversations": count, "share": rate(count, len(dropped))}
            for step, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        ],
    }


def _funnel(
    steps: Sequence[str],
    rows: Sequence[tuple[Any, int, bool, int | None, int, str | None]],
    intents: Mapping[int, list[str]],
) -> list[dict[str, Any]]:
    position = {step: index for index, step in enumerate(steps)}
    furthest: list[int] = []
    for _, conversation_id, _, _, _, last_step in rows:
        seen = [*intents.get(conversation_id, []), *([last_step] if last_step else [])]
        indexes = [position[step] for step in seen if step in position]
        furthest.append(max(indexes) if indexes else -1)
    funnel = []
    previous = len(rows)
    for index, step in enumerate(steps):
        reached = sum(1 for value in furthest if value >= index)
        lost = previous - reached
        funnel.append(
            {
                "step": step,
                "reached": reached,
                "lost": lost,
                "lost_share": rate(lost, previous),
                "share_of_start": rate(reached, len(rows)),
            }
        )
        previous = reached
    return funnel


def _section(
    rows: Sequence[tuple[Any, int, bool, int | None, int, str | None]],
    converted: set[int],
    idle_before_ms: int,
    intents: Mapping[int, list[str]],
    steps: Sequence[str],
) -> dict[str, Any]:
    dropped = [
        row
        for row in rows
        if not row[2]
        and row[1] not in converted
        and (row[3] is not None or row[4] < idle_before_ms)
    ]
    section: dict[str, Any] = {"conversations": len(rows), **_last_steps(dropped, intents)}
    section["dropoff_rate"] = rate(len(dropped), len(rows))
    if steps:
        section["funnel"] = _funnel(steps, rows, intents)
    return section


def dropoff(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute the last steps of conversations that ended without an outcome, and a step funnel."""
    options = options or {}
    days = attribution_days(options)
    idle = options.get("idle_minutes")
    idle = DEFAULT_IDLE_MINUTES if idle is None else idle
    if not 0 <= idle <= 60 * 24 * 366:
        raise FilterError("idle_minutes", f"must be between 0 and {60 * 24 * 366}, got {idle:g}")
    steps = _parse_steps(options.get("steps"))
    idle_before_ms = to_ms(datetime.now(UTC)) - int(idle * 60_000)

    rows = _conversations(engine, flt)
    converted = {row.conversation_id for row in attributed_conversions(engine, flt, days)}
    intents = _bot_intents(engine, [row[1] for row in rows])
    result: dict[str, Any] = {
        "metric": "dropoff",
        "filters": flt.describe(),
        "attribution_days": days,
        "idle_minutes": idle,
        "steps": steps,
        **_section(rows, converted, idle_before_ms, intents, steps),
    }
    if flt.group_by is not None:
        by_group: dict[Any, list[tuple[Any, int, bool, int | None, int, str | None]]] = defaultdict(
            list
        )
        for row in rows:
            by_group[row[0]].append(row)
        result["groups"] = [
            {
                "group": group_label(key),
                **_section(items, converted, idle_before_ms, intents, steps),
            }
            for key, items in sorted(by_group.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows: list[dict[str, Any]] = []
    for group, section in sections:
        rows.extend(
            {
                "group": group,
                "kind": "last_step",
                "step": item["step"],
                "conversations": item["conversations"],
                "share": item["share"],
            }
            for item in section["last_steps"]
        )
        rows.extend(
            {"group": group, "kind": "funnel", **item} for item in section.get("funnel", [])
        )
    return rows


DROPOFF = register(
    MetricSpec(
        name="dropoff",
        summary="Where conversations without an outcome stopped, and a step funnel",
        description=(
            "**Dropped conversations** started in the window and ended without an outcome: not "
            "resolved, with no attributed conversion (as in the `conversion` metric, "
            "`attribution_days`), and either ended (an end was reported) or idle, with no message "
            "for `idle_minutes` (default 30) before the time of the query.\n\n"
            "- `dropoff_rate` = dropped / conversations.\n"
            "- `last_steps`: dropped conversations per **last bot step** before the user went "
            "silent: the conversation's `last_step` (from a `ConversationUpdate`), else the "
            "intent of its last bot message, else `(unknown)`; with each step's `share` of the "
            "dropped conversations, most frequent first.\n"
            "- `funnel` (with `steps=a,b,c`): over all conversations of the window, `reached` = "
            "conversations whose furthest named step (from bot message intents and `last_step`) "
            "is this step or a later one; `lost` = reached at the step before (all conversations "
            "for the first step) minus reached here; `lost_share` = lost / reached at the step "
            "before; `share_of_start` = reached / conversations.\n\n"
            "Rates are `null` when their denominator is 0."
        ),
        compute=dropoff,
        params=(
            ATTRIBUTION_PARAM,
            Param(
                "idle_minutes",
                "Minutes without a message after which an open conversation counts "
                f"as ended (default {DEFAULT_IDLE_MINUTES:g}).",
                default=DEFAULT_IDLE_MINUTES,
                kind=float,
            ),
            Param(
                "steps", "Named steps of the funnel, comma-separated in order, e.g. greet,ask,pay."
            ),
        ),
        rows=_rows,
    )
)
