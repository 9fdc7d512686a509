"""Figures derived from a conversation's messages, recomputed whenever it changes.

Recomputing from the stored messages, instead of adding to counters, keeps the figures
right when messages arrive late, out of order or twice.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatmw.store.identity import bulk_update, id_in, select_by_keys
from chatmw.store.models import Conversation, Message

__all__ = [
    "UNTIMED_KINDS",
    "MessageTiming",
    "RefreshPlan",
    "apply_refresh",
    "compute_timings",
    "plan_refresh",
    "refresh_conversations",
]

# Message kinds that are not part of the dialogue: they neither open nor answer a run of
# user messages, and they are not counted as messages of the conversation.
UNTIMED_KINDS = frozenset({"survey_prompt", "survey_answer", "reaction"})
RESPONDER_ROLES = frozenset({"bot", "agent"})
# Conversations refreshed per query; ids travel as one array or JSON parameter, so this
# only bounds the rows held in memory at once.
REFRESH_CHUNK = 5000


@dataclass(slots=True)
class MessageTiming:
    """One message's role, kind and time, as input to the timing computation."""

    id: int
    role: str
    kind: str
    occurred_at_ms: int
    response_ms: float | None = None
    is_first_response: bool = False


def compute_timings(messages: Sequence[MessageTiming]) -> tuple[float | None, str | None]:
    """Set ``response_ms`` and ``is_first_response`` on ``messages`` (sorted by time).

    A run of user messages is answered by the next bot or agent message; its response time
    runs from the first user message of the run. The first answer in the conversation is
    its first response. Returns the first response time and the role that gave it.
    """
    run_started: int | None = None
    first: tuple[float | None, str | None] = (None, None)
    for message in messages:
        message.response_ms = None
        message.is_first_response = False
        if message.kind in UNTIMED_KINDS:
            continue
        if message.role == "user":
            if run_started is None:
                run_started = message.occurred_at_ms
            continue
        if message.role in RESPONDER_ROLES and run_started is not None:
            message.response_ms = float(message.occurred_at_ms - run_started)
            if first[0] is None:
                message.is_first_response = True
                first = (message.response_ms, message.role)
            run_started = None
    return first


def refresh_conversations(session: Session, conversation_ids: Iterable[int]) -> None:
    """Recompute counts, times and response times of the given conversations."""
    ids = sorted(set(conversation_ids))
    for start in range(0, len(ids), REFRESH_CHUNK):
        _refresh_chunk(session, ids[start:start + REFRESH_CHUNK])


def _refresh_chunk(session: Session, ids: Sequence[int]) -> None:
    rows = _stored_timings(session, ids)
    ended = _ended_times(session, ids)
    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    for group in _groups(rows):
        changed: list[tuple[Any, float | None, bool]] = []
        conversation_changes.append(_conversation_figures(group, ended.get(group[0][0]), changed))
        message_changes.extend({"id": message_id, "response_ms": response_ms,
                                "is_first_response": is_first}
                               for message_id, response_ms, is_first in changed)
    _apply(session, message_changes, conversation_changes)


def _stored_timings(session: Session, ids: Sequence[int]) -> list[Any]:
    statement = (
        select(Message.conversation_id, Message.id, Message.role, Message.kind,
               Message.occurred_at_ms, Message.response_ms, Message.is_first_response)
        .where(id_in(session, Message.conversation_id, ids))
        .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
    )
    return session.connection().execute(statement).all()


def _ended_times(session: Session, ids: Sequence[int]) -> dict[int, int | None]:
    statement = select(Conversation.id, Conversation.ended_at_ms).where(
        id_in(session, Conversation.id, ids))
    return dict(session.connection().execute(statement).all())  # type: ignore[arg-type]


def _groups(rows: Sequence[Any]) -> list[list[Any]]:
    # Runs of rows with the same conversation id (the first column).
    return [list(group) for _, group in itertools.groupby(rows, key=itemgetter(0))]


def _apply(session: Session, message_changes: list[dict[str, Any]],
           conversation_changes: list[dict[str, Any]]) -> None:
    bulk_update(session, Message.__table__, message_changes, ("response_ms", "is_first_response"))
    bulk_update(session, Conversation.__table__, conversation_changes,
                ("started_at_ms", "last_message_at_ms", "message_count", "user_message_count",
                 "first_response_ms", "first_response_role", "ended_at_ms"))


def _conversation_figures(rows: Sequence[Any], ended_at_ms: int | None,
                          changed: list[tuple[Any, float | None, bool]]) -> dict[str, Any]:
    """Return one conversation's figures from its message rows, sorted by time and id.

    The rows are ``(conversation id, message, role, kind, time, stored response_ms,
    stored is_first_response)``, where ``message`` identifies the message to the caller.
    ``(message, response_ms, is_first_response)`` of each message whose figures differ from
    the stored ones is appended to ``changed``. The figures are those of
    :func:`compute_timings`, computed on the rows without building objects.
    """
    run_started: int | None = None
    first_ms: float | None = None
    first_role: str | None = None
    count = 0
    user_count = 0
    last_user_ms: int | None = None
    for _, message, role, kind, at_ms, stored_response, stored_first in rows:
        response_ms: float | None = None
        is_first = False
        if kind not in UNTIMED_KINDS:
            count += 1
            if role == "user":
                user_count += 1
                # Rows come in time order, so the last user message seen is the latest.
                last_user_ms = at_ms
                if run_started is None:
                    run_started = at_ms
            elif role in RESPONDER_ROLES and run_started is not None:
                response_ms = float(at_ms - run_started)
                if first_ms is None:
                    is_first = True
                    first_ms, first_role = response_ms, role
                run_started = None
        if stored_response != response_ms or bool(stored_first) != is_first:
            changed.append((message, response_ms, is_first))
    # A user message after the end reopens the conversation.
    if ended_at_ms is not None and last_user_ms is not None and last_user_ms > ended_at_ms:
        ended_at_ms = None
    return {
        "id": rows[0][0],
        "started_at_ms": rows[0][4],
        "last_message_at_ms": rows[-1][4],
        "message_count": count,
        "user_message_count": user_count,
        "first_response_ms": first_ms,
        "first_response_role": first_role,
        "ended_at_ms": ended_at_ms,
    }


@dataclass(slots=True)
class RefreshPlan:
    """Figures computed before a batch of message rows is inserted; see :func:`plan_refresh`.

    ``expected`` are the keys of the rows the plan counts as new, in row order.
    """

    conversation_ids: list[int]
    expected: list[str]
    message_changes: list[dict[str, Any]]
    conversation_changes: list[dict[str, Any]]


def plan_refresh(session: Session, rows: Sequence[dict[str, Any]]) -> RefreshPlan:
    """Compute the figures of the conversations of message ``rows`` before they are inserted.

    A row is new when no stored message and no earlier row has its key. New rows get ids
    above every stored id, in row order, so they sort after stored messages of the same
    time, as :func:`refresh_conversations` sorts them once inserted. Their
    ``response_ms`` and ``is_first_response`` are set in place, so that they go in with
    their final values, and only stored messages whose figures change need an update.
    The plan holds only if exactly the expected rows are then inserted, in order
    (:func:`chatmw.store.identity.insert_ignore_expected`): apply it with
    :func:`apply_refresh`, or else call :func:`refresh_conversations`.
    """
    ids = sorted({row["conversation_id"] for row in rows})
    stored_keys = {key for (key,) in select_by_keys(
        session, Message.__table__, ("key",), [(row["key"],) for row in rows], ("key",))}
    new_rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    expected: list[str] = []
    for row in rows:
        if row["key"] not in stored_keys:
            stored_keys.add(row["key"])
            new_rows[row["conversation_id"]].append(row)
            expected.append(row["key"])

    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    for start in range(0, len(ids), REFRESH_CHUNK):
        chunk = ids[start:start + REFRESH_CHUNK]
        stored = {group[0][0]: group for group in _groups(_stored_timings(session, chunk))}
        ended = _ended_times(session, chunk)
        for conversation_id in chunk:
            merged = _merged(stored.get(conversation_id, ()), new_rows.get(conversation_id, ()))
            if not merged:
                continue
            changed: list[tuple[Any, float | None, bool]] = []
            conversation_changes.append(
                _conversation_figures(merged, ended.get(conversation_id), changed))
            for message, response_ms, is_first in changed:
                if isinstance(message, dict):
                    message["response_ms"] = response_ms
                    message["is_first_response"] = is_first
                else:
                    message_changes.append({"id": message, "response_ms": response_ms,
                                            "is_first_response": is_first})
    return RefreshPlan(ids, expected, message_changes, conversation_changes)


def _merged(stored: Sequence[Any], new_rows: Sequence[dict[str, Any]]) -> Sequence[Any]:
    # Stored rows come sorted by time and id. New rows follow them at equal times, in row
    # order, because their ids will be higher. The sorts are stable, so that order holds.
    if not new_rows:
        return stored
    added = sorted(((row["conversation_id"], row, row["role"], row["kind"], row["occurred_at_ms"],
                     row["response_ms"], row["is_first_response"]) for row in new_rows),
                   key=itemgetter(4))
    if not stored or stored[-1][4] <= added[0][4]:
        # The common case: every new message is at least as late as the stored ones.
        return [*stored, *added]
    entries = [(row[4], 0, row) for row in stored] + [(row[4], 1, row) for row in added]
    entries.sort(key=itemgetter(0, 1))
    return [entry[2] for entry in entries]


def apply_refresh(session: Session, plan: RefreshPlan) -> None:
    """Store the figures of ``plan`` once its rows went in as expected."""
    _apply(session, plan.message_changes, plan.conversation_changes)
