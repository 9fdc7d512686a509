"""Resolution, survey and query type counts per conversation start slot, and their refresh.

``rollup_outcomes``, ``rollup_surveys`` and ``rollup_query_types`` count the conversations
that started in a slot, with slot, hour, day and week rows (``chatmw.metrics.rollup_levels``).
The same functions count the slot rows and the raw ranges of a query
(``chatmw.metrics.outcome_query``), so both give the figures of the raw metrics.

Whether a conversation is a repeat depends on the contact's later conversations. A new
conversation, or one whose start moves, can make earlier conversations of its contact
repeats or stop them being repeats, so :func:`repeat_slots` returns their start slots,
which the refresher recomputes too (``chatmw.metrics.rollup_refresh.changes_after``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.rollup_levels import LeveledSums, Ranges
from chatmw.metrics.rollup_refresh import slot_expression, slot_of, time_in_ranges
from chatmw.store.models import Conversation, ConversationAttribute
from chatmw.store.models_rollups import (
    LEVEL_SLOT,
    RollupOutcomes,
    RollupQueryTypes,
    RollupSurveys,
)
from chatmw.store.models_surveys import Survey

__all__ = [
    "OUTCOMES",
    "SURVEYS",
    "QUERY_TYPES",
    "OUTCOME_TABLES",
    "OutcomeCounts",
    "SurveyCounts",
    "TypeCounts",
    "collect_outcomes",
    "collect_surveys",
    "collect_query_types",
    "delete_outcomes",
    "insert_outcomes",
    "repeat_slots",
]

OUTCOMES = LeveledSums(
    RollupOutcomes,
    ("channel",),
    (
        "conversations",
        "resolved",
        "resolved_handed_off",
        "resolved_repeated",
        "first_contact_resolved",
    ),
)
SURVEYS = LeveledSums(RollupSurveys, ("channel", "kind", "answered", "score"), ("surveys", "sent"))
QUERY_TYPES = LeveledSums(
    RollupQueryTypes,
    ("channel", "intent", "rule_type"),
    ("conversations", "resolved", "csat_responses", "csat_satisfied", "csat_score_sum"),
)
OUTCOME_TABLES = (RollupOutcomes, RollupSurveys, RollupQueryTypes)
HOUR_MS = 3_600_000
# Contacts per statement when looking up the conversations a change can make repeats.
_CONTACTS_PER_STATEMENT = 500


@dataclass(slots=True)
class OutcomeCounts:
    """The counts of the ``resolution`` metric for a set of conversations."""

    conversations: int = 0
    resolved: int = 0
    resolved_handed_off: int = 0
    resolved_repeated: int = 0
    first_contact_resolved: int = 0

    def add(self, other: OutcomeCounts) -> None:
        self.conversations += other.conversations
        self.resolved += other.resolved
        self.resolved_handed_off += other.resolved_handed_off
        self.resolved_repeated += other.resolved_repeated
        self.first_contact_resolved += other.first_contact_resolved


@dataclass(slots=True)
class SurveyCounts:
    """Surveys of one kind: all of them, those sent, and the count of each counted score."""

    surveys: int = 0
    sent: int = 0
    scores: dict[int, int] = field(default_factory=dict)

    def add(self, other: SurveyCounts) -> None:
        self.surveys += other.surveys
        self.sent += other.sent
        for score, count in other.scores.items():
            self.scores[score] = self.scores.get(score, 0) + count


@dataclass(slots=True)
class TypeCounts:
    """Conversations of one query type, resolved ones, and their CSAT scores."""

    conversations: int = 0
    resolved: int = 0
    responses: int = 0
    satisfied: int = 0
    score_sum: int = 0

    def add(self, other: TypeCounts) -> None:
        self.conversations += other.conversations
        self.resolved += other.resolved
        self.responses += other.responses
        self.satisfied += other.satisfied
        self.score_sum += other.score_sum


def _flag(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return case((condition, 1), else_=0)


def collect_outcomes(
    connection: Connection, where: ColumnElement[bool]
) -> dict[tuple[int, str], OutcomeCounts]:
    """Return the resolution counts per (start slot, channel) of the conversations ``where``."""
    from chatmw.metrics.resolution import DEFAULT_REPEAT_HOURS, repeated_condition

    start = slot_expression(Conversation.started_at_ms)
    resolved = Conversation.resolved.is_(True)
    handed_off = _flag(Conversation.handed_off.is_(True))
    # CASE evaluates its branches in order, so the repeat lookup runs for resolved ones only.
    repeated = case((resolved, _flag(repeated_condition(DEFAULT_REPEAT_HOURS))), else_=0)
    flags = (_flag(resolved), handed_off, repeated)
    statement = (
        select(start, Conversation.channel, *flags, func.count())
        .where(where)
        .group_by(start, Conversation.channel, *flags)
    )
    counts: dict[tuple[int, str], OutcomeCounts] = defaultdict(OutcomeCounts)
    for slot, channel, is_resolved, is_handed_off, is_repeated, number in connection.execute(
        statement
    ):
        item = counts[(int(slot), channel)]
        item.conversations += int(number)
        if not is_resolved:
            continue
        item.resolved += int(number)
        item.resolved_handed_off += int(number) * int(is_handed_off)
        item.resolved_repeated += int(number) * int(is_repeated)
        if not is_handed_off and not is_repeated:
            item.first_contact_resolved += int(number)
    return counts


def collect_surveys(
    connection: Connection, where: ColumnElement[bool]
) -> dict[tuple[int, str, str], SurveyCounts]:
    """Return the surveys per (start slot, channel, kind) of the conversations ``where``.

    A score counts only when the survey was sent, as in ``chatmw.surveys.metrics``.
    """
    start = slot_expression(Conversation.started_at_ms)
    sent = Survey.sent_at_ms.is_not(None)
    score = case((sent, Survey.score), else_=None)
    statement = (
        select(start, Conversation.channel, Survey.kind, score, func.count(), func.sum(_flag(sent)))
        .join(Conversation, Conversation.id == Survey.conversation_id)
        .where(where)
        .group_by(start, Conversation.channel, Survey.kind, score)
    )
    counts: dict[tuple[int, str, str], SurveyCounts] = defaultdict(SurveyCounts)
    for slot, channel, kind, value, number, sent_number in connection.execute(statement):
        item = counts[(int(slot), channel, kind)]
        item.surveys += int(number)
        item.sent += int(sent_number or 0)
        if value is not None:
            item.scores[int(value)] = item.scores.get(int(value), 0) + int(number)
    return counts


def collect_query_types(
    connection: Connection, where: ColumnElement[bool]
) -> dict[tuple[int, str, str, str], TypeCounts]:
    """Return the counts per (start slot, channel, intent, rule type) of conversations ``where``.

    A missing intent or rule type is ``""``, which the metric treats like an empty one.
    """
    from chatmw.metrics.query_types import CSAT_SATISFIED_MIN, RULES_ATTRIBUTE

    start = slot_expression(Conversation.started_at_ms)
    rule = aliased(ConversationAttribute)
    survey = aliased(Survey)
    statement = (
        select(
            start,
            Conversation.channel,
            Conversation.intent,
            rule.value,
            func.count(),
            func.sum(_flag(Conversation.resolved.is_(True))),
            func.count(survey.score),
            func.sum(_flag(survey.score >= CSAT_SATISFIED_MIN)),
            func.sum(survey.score),
        )
        .select_from(Conversation)
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
        .where(where)
        .group_by(start, Conversation.channel, Conversation.intent, rule.value)
    )
    counts: dict[tuple[int, str, str, str], TypeCounts] = defaultdict(TypeCounts)
    for slot, channel, intent, rule_type, *figures in connection.execute(statement):
        part = TypeCounts(*(int(value or 0) for value in figures))
        counts[(int(slot), channel, intent or "", rule_type or "")].add(part)
    return counts


def _insert(connection: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        connection.execute(insert(table), rows)


def _insert_slot_rows(connection: Connection, where: ColumnElement[bool]) -> None:
    outcomes = [
        {"level": LEVEL_SLOT, "start_ms": slot, "channel": channel, **_fields(counts)}
        for (slot, channel), counts in collect_outcomes(connection, where).items()
    ]
    _insert(connection, RollupOutcomes, outcomes)
    surveys = []
    for (slot, channel, kind), counts in collect_surveys(connection, where).items():
        key = {"level": LEVEL_SLOT, "start_ms": slot, "channel": channel, "kind": kind}
        answered = sum(counts.scores.values())
        unanswered = counts.surveys - answered
        # The sent surveys among the unanswered ones: every answered survey was sent.
        surveys.append(
            {
                **key,
                "answered": False,
                "score": 0,
                "surveys": unanswered,
                "sent": counts.sent - answered,
            }
        )
        for score, number in counts.scores.items():
            surveys.append(
                {**key, "answered": True, "score": score, "surveys": number, "sent": number}
            )
    _insert(connection, RollupSurveys, [row for row in surveys if row["surveys"]])
    types = [
        {
            "level": LEVEL_SLOT,
            "start_ms": slot,
            "channel": channel,
            "intent": intent,
            "rule_type": rule_type,
            "conversations": counts.conversations,
            "resolved": counts.resolved,
            "csat_responses": counts.responses,
            "csat_satisfied": counts.satisfied,
            "csat_score_sum": counts.score_sum,
        }
        for (slot, channel, intent, rule_type), counts in collect_query_types(
            connection, where
        ).items()
    ]
    _insert(connection, RollupQueryTypes, types)


def _fields(counts: OutcomeCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in OUTCOMES.sums}


def delete_outcomes(connection: Connection, ranges: Ranges) -> None:
    """Delete the rows of the start slots in ``ranges`` and the hours, days and weeks around."""
    for table in (OUTCOMES, SURVEYS, QUERY_TYPES):
        table.delete(connection, ranges)


def insert_outcomes(connection: Connection, ranges: Ranges) -> None:
    """Count the conversations that started in ``ranges`` (whole slots) into emptied rows."""
    for index in range(0, len(ranges), 50):
        part = ranges[index : index + 50]
        _insert_slot_rows(connection, time_in_ranges(Conversation.started_at_ms, part))
    for table in (OUTCOMES, SURVEYS, QUERY_TYPES):
        table.sum_levels(connection, ranges)


def repeat_slots(connection: Connection, spans: Mapping[int, list[tuple[int, int]]]) -> set[int]:
    """Return the start slots of conversations whose repeat flag a change may have flipped.

    ``spans`` maps a contact to the ``(first, last)`` times (ms) of its changed
    conversations, each over the conversation's start and all its messages, so that
    their old and new starts lie inside. A conversation ``C`` of the contact can gain or
    lose a repeat only when such a start lies after ``C``'s start and at most the default
    repeat window after ``C``'s end.
    """
    from chatmw.metrics.resolution import DEFAULT_REPEAT_HOURS, end_expression

    window = int(DEFAULT_REPEAT_HOURS * HOUR_MS)
    contacts = sorted(spans)
    slots: set[int] = set()
    for index in range(0, len(contacts), _CONTACTS_PER_STATEMENT):
        chunk = contacts[index : index + _CONTACTS_PER_STATEMENT]
        low = min(first for contact in chunk for first, _ in spans[contact])
        high = max(last for contact in chunk for _, last in spans[contact])
        candidates = select(
            Conversation.contact_id, Conversation.started_at_ms, end_expression()
        ).where(
            Conversation.contact_id.in_(chunk),
            Conversation.started_at_ms < high,
            end_expression() + window >= low,
        )
        for contact_id, started_ms, end_ms in connection.execute(candidates):
            if any(
                started_ms < last and end_ms + window >= first for first, last in spans[contact_id]
            ):
                slots.add(slot_of(started_ms))
    return slots
