"""Figures derived from a conversation's messages, recomputed whenever it changes.

Recomputing from the stored messages, instead of adding to counters, keeps the figures
right when messages arrive late, out of order or twice.
"""

from __future__ import annotations

from collections import defaultdict
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
    statement = (
        select(Message.conversation_id, Message.id, Message.role, Message.kind,
               Message.occurred_at_ms, Message.response_ms, Message.is_first_response)
        .where(id_in(session, Message.conversation_id, ids))
        .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
    )
    grouped: dict[int, list[MessageTiming]] = defaultdict(list)
    stored: dict[int, tuple[float | None, bool]] = {}
    for conversation_id, message_id, role, kind, at_ms, response_ms, first in session.execute(statement):
        grouped[conversation_id].append(MessageTiming(message_id, role, kind, at_ms))
        stored[message_id] = (response_ms, bool(first))

    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    ended = dict(session.execute(
        select(Conversation.id, Conversation.ended_at_ms).where(id_in(session, Conversation.id, ids))
    ).all())
    for conversation_id, messages in grouped.items():
        first_ms, first_role = compute_timings(messages)
        for message in messages:
            if stored[message.id] != (message.response_ms, message.is_first_response):
                message_changes.append({"id": message.id, "response_ms": message.response_ms,
                                        "is_first_response": message.is_first_response})
        counted = [m for m in messages if m.kind not in UNTIMED_KINDS]
        user_times = [m.occurred_at_ms for m in counted if m.role == "user"]
        change = {
            "id": conversation_id,
            "started_at_ms": min(m.occurred_at_ms for m in messages),
            "last_message_at_ms": max(m.occurred_at_ms for m in messages),
            "message_count": len(counted),
            "user_message_count": len(user_times),
            "first_response_ms": first_ms,
            "first_response_role": first_role,
            "ended_at_ms": ended.get(conversation_id),
        }
        # A user message after the end reopens the conversation.
        if change["ended_at_ms"] is not None and user_times and max(user_times) > change["ended_at_ms"]:
            change["ended_at_ms"] = None
        conversation_changes.append(change)

    bulk_update(session, Message.__table__, message_changes, ("response_ms", "is_first_response"))
    bulk_update(session, Conversation.__table__, conversation_changes,
                ("started_at_ms", "last_message_at_ms", "message_count", "user_message_count",
                 "first_response_ms", "first_response_role", "ended_at_ms"))
