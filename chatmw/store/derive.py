"""Figures derived from a conversation's messages, recomputed whenever it changes.

Recomputing from the stored messages, instead of adding to counters, keeps the figures
right when messages arrive late, out of order or twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatmw.store.identity import bulk_update, id_in
from chatmw.store.models import Conversation, Message

__all__ = ["UNTIMED_KINDS", "MessageTiming", "compute_timings", "refresh_conversations"]

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
    connection = session.connection()
    statement = (
        select(Message.conversation_id, Message.id, Message.role, Message.kind,
               Message.occurred_at_ms, Message.response_ms, Message.is_first_response)
        .where(id_in(session, Message.conversation_id, ids))
        .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
    )
    ended = dict(connection.execute(
        select(Conversation.id, Conversation.ended_at_ms).where(id_in(session, Conversation.id, ids))
    ).all())
    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    rows = connection.execute(statement).all()
    start = 0
    while start < len(rows):
        conversation_id = rows[start][0]
        end = start + 1
        while end < len(rows) and rows[end][0] == conversation_id:
            end += 1
        change = _conversation_figures(rows[start:end], ended.get(conversation_id), message_changes)
        conversation_changes.append(change)
        start = end

    bulk_update(session, Message.__table__, message_changes, ("response_ms", "is_first_response"))
    bulk_update(session, Conversation.__table__, conversation_changes,
                ("started_at_ms", "last_message_at_ms", "message_count", "user_message_count",
                 "first_response_ms", "first_response_role", "ended_at_ms"))


def _conversation_figures(rows: Sequence[Any], ended_at_ms: int | None,
                          message_changes: list[dict[str, Any]]) -> dict[str, Any]:
    """Return one conversation's figures from its message rows, sorted by time and id.

    The rows are ``(conversation id, message id, role, kind, time, stored response_ms,
    stored is_first_response)``. Messages whose response figures differ from the stored
    ones are appended to ``message_changes``. The figures are those of
    :func:`compute_timings`, computed on the rows without building objects.
    """
    run_started: int | None = None
    first_ms: float | None = None
    first_role: str | None = None
    count = 0
    user_count = 0
    last_user_ms: int | None = None
    for _, message_id, role, kind, at_ms, stored_response, stored_first in rows:
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
            message_changes.append({"id": message_id, "response_ms": response_ms,
                                    "is_first_response": is_first})
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
