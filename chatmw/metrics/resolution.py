"""First-contact resolution: resolved conversations with no hand-off and no repeat contact."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, case, exists, func, select
from sqlalchemy.orm import aliased

from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.outcome_query import outcome_sums
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.sql import disable_jit
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation

__all__ = [
    "first_contact_resolution",
    "conversation_outcomes",
    "outcome_counts",
    "RESOLUTION",
    "DEFAULT_REPEAT_HOURS",
]

DEFAULT_REPEAT_HOURS = 24.0
MAX_REPEAT_HOURS = 24.0 * 366
HOUR_MS = 3_600_000
COUNTS = (
    "conversations",
    "resolved",
    "resolved_handed_off",
    "resolved_repeated",
    "first_contact_resolved",
)


def repeat_hours(options: Mapping[str, Any]) -> float:
    """Return the validated ``repeat_hours`` option."""
    hours = options.get("repeat_hours")
    hours = DEFAULT_REPEAT_HOURS if hours is None else hours
    if not 0 <= hours <= MAX_REPEAT_HOURS:
        raise FilterError(
            "repeat_hours", f"must be between 0 and {MAX_REPEAT_HOURS:g}, got {hours:g}"
        )
    return float(hours)


def end_expression() -> ColumnElement[Any]:
    """Return SQL for a conversation's end: its ``ended_at_ms``, else its last message."""
    return func.coalesce(Conversation.ended_at_ms, Conversation.last_message_at_ms)


def repeated_condition(hours: float) -> ColumnElement[bool]:
    """Return SQL true when a ``Conversation`` row is followed by a repeat within ``hours``.

    That is, the same contact started another conversation after this one started and at
    most ``hours`` after it ended (or after its last message, if it has no end).
    """
    later = aliased(Conversation)
    repeated = exists().where(
        later.contact_id == Conversation.contact_id,
        later.id != Conversation.id,
        later.started_at_ms > Conversation.started_at_ms,
        later.started_at_ms <= end_expression() + int(hours * HOUR_MS),
    )
    return and_(Conversation.contact_id.is_not(None), repeated)


def conversation_outcomes(flt: MetricFilter, hours: float) -> Select[Any]:
    """Select group key, conversation id, resolved, handed_off and ``repeated`` per conversation.

    ``repeated`` is :func:`repeated_condition`.
    """
    scope = conversation_scope(flt).subquery()
    return select(
        scope.c.group_key,
        Conversation.id,
        Conversation.resolved,
        Conversation.handed_off,
        repeated_condition(hours).label("repeated"),
    ).join(scope, scope.c.conversation_id == Conversation.id)


def _empty() -> dict[str, int]:
    return dict.fromkeys(COUNTS, 0)


def _with_rates(counts: Mapping[str, int]) -> dict[str, Any]:
    return {
        **counts,
        "resolution_rate": rate(counts["resolved"], counts["conversations"]),
        "fcr_rate": rate(counts["first_contact_resolved"], counts["resolved"]),
    }


def outcome_counts(flt: MetricFilter, hours: float) -> Select[Any]:
    """Select group key, resolved, handed-off and repeated flags (0 or 1), and a count.

    Each row counts the conversations of one group with one combination of flags.
    ``repeated`` is 0 for unresolved conversations, which spares their repeat lookup.
    """
    outcomes = conversation_outcomes(flt, hours).subquery()
    resolved = outcomes.c.resolved.is_(True)
    flags = (
        case((resolved, 1), else_=0),
        case((outcomes.c.handed_off.is_(True), 1), else_=0),
        # CASE evaluates its branches in order, so the EXISTS behind ``repeated`` runs only
        # for resolved conversations.
        case((resolved, case((outcomes.c.repeated.is_(True), 1), else_=0)), else_=0),
    )
    return select(outcomes.c.group_key, *flags, func.count()).group_by(outcomes.c.group_key, *flags)


def _add_outcomes(
    counts: dict[str, int], resolved: int, handed_off: int, repeated: int, number: int
) -> None:
    counts["conversations"] += number
    if not resolved:
        return
    counts["resolved"] += number
    counts["resolved_handed_off"] += number * handed_off
    counts["resolved_repeated"] += number * repeated
    if not handed_off and not repeated:
        counts["first_contact_resolved"] += number


def _raw_counts(engine: Engine, flt: MetricFilter, hours: float) -> dict[Any, dict[str, int]]:
    counts: dict[Any, dict[str, int]] = defaultdict(_empty)
    with engine.connect() as connection:
        disable_jit(connection)
        for group_key, resolved, handed_off, repeated, number in connection.execute(
            outcome_counts(flt, hours)
        ):
            _add_outcomes(
                counts[group_key], int(resolved), int(handed_off), int(repeated), int(number)
            )
    return counts


def _rolled_counts(engine: Engine, flt: MetricFilter) -> dict[Any, dict[str, int]] | None:
    """Return the counts per group key from rollups (default repeat window), or None."""
    by_channel = outcome_sums(engine, flt)
    if by_channel is None:
        return None
    counts: dict[Any, dict[str, int]] = defaultdict(_empty)
    for channel, figures in by_channel.items():
        group = counts[channel if flt.group_by is not None else None]
        for name, value in dataclasses.asdict(figures).items():
            group[name] += value
    return counts


def first_contact_resolution(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute first-contact resolution for the conversations of ``flt``."""
    hours = repeat_hours(options or {})
    counts = _rolled_counts(engine, flt) if hours == DEFAULT_REPEAT_HOURS else None
    if counts is None:
        counts = _raw_counts(engine, flt, hours)
    overall = _empty()
    for values in counts.values():
        for name in COUNTS:
            overall[name] += values[name]
    result: dict[str, Any] = {
        "metric": "resolution",
        "filters": flt.describe(),
        "repeat_hours": hours,
        **_with_rates(overall),
    }
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), **_with_rates(values)}
            for key, values in sorted(counts.items(), key=lambda item: group_label(item[0]))
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    names = (*COUNTS, "resolution_rate", "fcr_rate")
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    return [
        {"group": group, **{name: section[name] for name in names}} for group, section in sections
    ]


RESOLUTION = register(
    MetricSpec(
        name="resolution",
        summary="First-contact resolution",
        description=(
            "**First-contact resolution rate** (`fcr_rate`) = first-contact resolved / resolved "
            "conversations, over conversations that started in the window.\n\n"
            "A conversation is **resolved** when its `resolved` flag is true (set by a "
            "`ConversationUpdate` event from the bot, its codec or a rule). It is "
            "**first-contact resolved** when it is resolved, was not handed off to an agent "
            "(`resolved_handed_off` counts those that were), and the same contact started no "
            "other conversation after it started and at most `repeat_hours` (default 24) after "
            "it ended, or after its last message when it has no end (`resolved_repeated` counts "
            "those that did; the later conversation may fall outside the window). Contacts are "
            "per channel, so a repeat on another channel is not seen.\n\n"
            "Also `resolution_rate` = resolved / conversations. Rates are `null` when their "
            "denominator is 0."
        ),
        compute=first_contact_resolution,
        params=(
            Param(
                "repeat_hours",
                "Hours after a conversation's end within which a new conversation of the same "
                f"contact is a repeat (default {DEFAULT_REPEAT_HOURS:g}). Other values read raw "
                "rows instead of rollups (slower on large stores).",
                default=DEFAULT_REPEAT_HOURS,
                kind=float,
            ),
        ),
        rows=_rows,
    )
)
