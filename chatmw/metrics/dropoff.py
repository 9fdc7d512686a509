"""Drop-off: where conversations that ended without an outcome stopped, and a step funnel."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, select

from chatmw.events import to_ms
from chatmw.metrics.conversion import (
    ATTRIBUTION_PARAM,
    ROLLUP_NOTE,
    attributed_conversions,
    attribution_days,
)
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.identity import CHUNK
from chatmw.store.models import Conversation, Message

__all__ = [
    "dropoff",
    "DROPOFF",
    "UNKNOWN_STEP",
    "DropoffTally",
    "nameable_step",
    "stopped_step",
]

UNKNOWN_STEP = "(unknown)"
DEFAULT_IDLE_MINUTES = 30.0
MAX_STEPS = 50
MAX_STEP_LENGTH = 128
_STEP = re.compile(rf"^[^\x00-\x1f,]{{1,{MAX_STEP_LENGTH}}}$")


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
        if len(step) > MAX_STEP_LENGTH:
            raise FilterError(
                "steps", f"step name {step[:40]!r}... longer than {MAX_STEP_LENGTH} characters"
            )
        if not _STEP.match(step):
            raise FilterError(
                "steps", f"invalid step name {step[:40]!r}: control characters are not allowed"
            )
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


@dataclass(slots=True)
class DropoffTally:
    """The drop-off counts of a set of conversations.

    ``dropped`` maps a last step to its dropped conversations, and ``step_sets`` a set of
    steps seen (bot message intents and ``last_step``) to its conversations.
    """

    conversations: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    step_sets: dict[frozenset[str], int] = field(default_factory=dict)

    def add(self, other: DropoffTally) -> None:
        self.conversations += other.conversations
        for step, count in other.dropped.items():
            self.dropped[step] = self.dropped.get(step, 0) + count
        for steps, count in other.step_sets.items():
            self.step_sets[steps] = self.step_sets.get(steps, 0) + count


@lru_cache(maxsize=4096)
def nameable_step(step: str) -> bool:
    """Return whether ``steps=`` can name ``step`` (what :func:`_parse_steps` accepts)."""
    return step == step.strip() and _STEP.match(step) is not None


def stopped_step(last_step: str | None, bot_intents: Sequence[str]) -> str:
    """Return the step a conversation stopped at: ``last_step``, else its last bot intent."""
    return last_step or (bot_intents[-1] if bot_intents else None) or UNKNOWN_STEP


def _raw_tallies(
    rows: Sequence[tuple[Any, int, bool, int | None, int, str | None]],
    converted: set[int],
    idle_before_ms: int,
    intents: Mapping[int, list[str]],
    steps: Sequence[str],
) -> dict[Any, DropoffTally]:
    named = set(steps)
    tallies: dict[Any, DropoffTally] = defaultdict(DropoffTally)
    for key, conversation_id, resolved, ended, last, last_step in rows:
        tally = tallies[key]
        tally.conversations += 1
        bot_intents = intents.get(conversation_id, [])
        if steps:
            seen = frozenset({*bot_intents, *([last_step] if last_step else [])} & named)
            tally.step_sets[seen] = tally.step_sets.get(seen, 0) + 1
        if (
            not resolved
            and conversation_id not in converted
            and (ended is not None or last < idle_before_ms)
        ):
            step = stopped_step(last_step, bot_intents)
            tally.dropped[step] = tally.dropped.get(step, 0) + 1
    return tallies


def _funnel(steps: Sequence[str], tally: DropoffTally) -> list[dict[str, Any]]:
    position = {step: index for index, step in enumerate(steps)}
    # The index of the furthest named step -> conversations; -1 when none was seen.
    furthest: dict[int, int] = defaultdict(int)
    for seen, count in tally.step_sets.items():
        indexes = [position[step] for step in seen if step in position]
        furthest[max(indexes) if indexes else -1] += count
    funnel = []
    previous = tally.conversations
    for index, step in enumerate(steps):
        reached = sum(count for value, count in furthest.items() if value >= index)
        lost = previous - reached
        funnel.append(
            {
                "step": step,
                "reached": reached,
                "lost": lost,
                "lost_share": rate(lost, previous),
                "share_of_start": rate(reached, tally.conversations),
            }
        )
        previous = reached
    return funnel


def _section(tally: DropoffTally, steps: Sequence[str]) -> dict[str, Any]:
    dropped = sum(tally.dropped.values())
    section: dict[str, Any] = {
        "conversations": tally.conversations,
        "dropped": dropped,
        "last_steps": [
            {"step": step, "conversations": count, "share": rate(count, dropped)}
            for step, count in sorted(tally.dropped.items(), key=lambda item: (-item[1], item[0]))
        ],
        "dropoff_rate": rate(dropped, tally.conversations),
    }
    if steps:
        section["funnel"] = _funnel(steps, tally)
    return section


def _tallies(
    engine: Engine, flt: MetricFilter, days: float, idle_before_ms: int, steps: Sequence[str]
) -> dict[Any, DropoffTally]:
    """Return the counts per group key, from rollups where they apply, else from raw rows."""
    # Imported here: the rollup modules import this one.
    from chatmw.metrics.business_query import serves_days
    from chatmw.metrics.dropoff_rollups import dropoff_tallies

    if serves_days(days):
        rolled = dropoff_tallies(engine, flt, idle_before_ms, bool(steps))
        if rolled is not None:
            if flt.group_by is None:
                return {None: _total(rolled.values())} if rolled else {}
            return dict(rolled)
    rows = _conversations(engine, flt)
    converted = {row.conversation_id for row in attributed_conversions(engine, flt, days)}
    intents = _bot_intents(engine, [row[1] for row in rows])
    return _raw_tallies(rows, converted, idle_before_ms, intents, steps)


def _total(tallies: Iterable[DropoffTally]) -> DropoffTally:
    total = DropoffTally()
    for tally in tallies:
        total.add(tally)
    return total


def dropoff(
    engine: Engine,
    flt: MetricFilter,
    options: Mapping[str, Any] | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """Compute the last steps of conversations that ended without an outcome, and a step funnel.

    ``now_ms`` is the time of the query that the idle cut-off counts back from (default:
    the current time).
    """
    options = options or {}
    days = attribution_days(options)
    idle = options.get("idle_minutes")
    idle = DEFAULT_IDLE_MINUTES if idle is None else idle
    if not 0 <= idle <= 60 * 24 * 366:
        raise FilterError("idle_minutes", f"must be between 0 and {60 * 24 * 366}, got {idle:g}")
    steps = _parse_steps(options.get("steps"))
    now_ms = to_ms(datetime.now(UTC)) if now_ms is None else now_ms
    idle_before_ms = now_ms - int(idle * 60_000)

    tallies = _tallies(engine, flt, days, idle_before_ms, steps)
    result: dict[str, Any] = {
        "metric": "dropoff",
        "filters": flt.describe(),
        "attribution_days": days,
        "idle_minutes": idle,
        "steps": steps,
        **_section(_total(tallies.values()), steps),
    }
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), **_section(tally, steps)}
            for key, tally in sorted(tallies.items(), key=lambda item: group_label(item[0]))
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
            "Rates are `null` when their denominator is 0." + ROLLUP_NOTE
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
