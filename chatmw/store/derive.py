"""Figures derived from a conversation's messages, recomputed whenever it changes.

Recomputing from the stored messages, instead of adding to counters, keeps the figures
right when messages arrive late, out of order or twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatmw.store.changes import record_changes
from chatmw.store.identity import bulk_update, id_in, select_by_keys
from chatmw.store.models import Conversation, Message

__all__ = [
    "MESSAGE_COLUMNS",
    "UNTIMED_KINDS",
    "ConversationCache",
    "ConversationState",
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
# The columns of the message rows that plan_refresh takes, in this order (the writer's
# rows, which the insert sends as they are).
MESSAGE_COLUMNS = ("key", "conversation_id", "contact_id", "channel", "role", "kind", "text",
                   "occurred_at_ms", "platform_message_id", "reply_to", "latency_ms",
                   "response_ms", "is_first_response", "intent", "sentiment", "status",
                   "status_at_ms", "meta")
(_KEY, _CONVERSATION, _ROLE, _KIND, _AT, _RESPONSE, _FIRST) = (
    MESSAGE_COLUMNS.index(name) for name in ("key", "conversation_id", "role", "kind",
                                              "occurred_at_ms", "response_ms",
                                              "is_first_response"))
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
    stored = _start_and_end_times(session, ids)
    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    moved: list[tuple[int, int]] = []
    for group in _groups(rows):
        changed: list[tuple[Any, float | None, bool]] = []
        conversation_id = group[0][0]
        started_at_ms, ended_at_ms = stored.get(conversation_id, (None, None))
        figures = _conversation_figures(group, ended_at_ms, changed)
        conversation_changes.append(figures)
        if started_at_ms is not None and started_at_ms != figures["started_at_ms"]:
            moved.append((conversation_id, started_at_ms))
        message_changes.extend({"id": message_id, "response_ms": response_ms,
                                "is_first_response": is_first}
                               for message_id, response_ms, is_first in changed)
    _apply(session, message_changes, conversation_changes, moved)


def _stored_timings(session: Session, ids: Sequence[int]) -> list[Any]:
    statement = (
        select(Message.conversation_id, Message.id, Message.role, Message.kind,
               Message.occurred_at_ms, Message.response_ms, Message.is_first_response)
        .where(id_in(session, Message.conversation_id, ids))
        .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
    )
    return session.connection().execute(statement).all()


def _start_and_end_times(session: Session,
                         ids: Sequence[int]) -> dict[int, tuple[int, int | None]]:
    statement = select(Conversation.id, Conversation.started_at_ms, Conversation.ended_at_ms).where(
        id_in(session, Conversation.id, ids))
    return {row[0]: (row[1], row[2]) for row in session.connection().execute(statement)}


def _groups(rows: Sequence[Any]) -> list[list[Any]]:
    # Runs of rows with the same conversation id (the first column).
    return [list(group) for _, group in itertools.groupby(rows, key=itemgetter(0))]


# The conversation columns a refresh sets, and those without the start time.
_FIGURES = ("started_at_ms", "last_message_at_ms", "message_count", "user_message_count",
            "first_response_ms", "first_response_role", "ended_at_ms")
_FIGURES_AFTER_START = _FIGURES[1:]


def _apply(session: Session, message_changes: list[dict[str, Any]],
           conversation_changes: list[dict[str, Any]], moved: Sequence[tuple[int, int]] = (),
           same_start: Collection[int] = ()) -> int:
    # ``moved`` are the conversations whose start changes, with their start before. Their
    # old start slot may hold no message, so the rollup refresher learns it from the log.
    # ``same_start`` are conversations whose stored start time the changes keep. On SQLite
    # their update leaves the start out, because SQLite updates the entries of the two
    # indexes on it even for an unchanged value (SQLite 3.40, 1,300 conversations: 2.7 ms
    # without the column, 5.1 ms with it). PostgreSQL compares the values itself. Returns
    # the conversation rows updated.
    bulk_update(session, Message.__table__, message_changes, ("response_ms", "is_first_response"))
    if moved:
        record_changes(session.connection(), conversations=moved)
    if not same_start or session.get_bind().dialect.name != "sqlite":
        return bulk_update(session, Conversation.__table__, conversation_changes, _FIGURES)
    shifted = [change for change in conversation_changes if change["id"] not in same_start]
    unmoved = [change for change in conversation_changes if change["id"] in same_start]
    return (bulk_update(session, Conversation.__table__, shifted, _FIGURES)
            + bulk_update(session, Conversation.__table__, unmoved, _FIGURES_AFTER_START))


def _conversation_figures(rows: Sequence[Any], ended_at_ms: int | None,
                          changed: list[tuple[Any, float | None, bool]]) -> dict[str, Any]:
    """Return one conversation's figures from its message rows, sorted by time and id.

    The rows are ``(conversation id, message, role, kind, time, stored response_ms,
    stored is_first_response)``, where ``message`` identifies the message to the caller.
    ``(message, response_ms, is_first_response)`` of each message whose figures differ from
    the stored ones is appended to ``changed``. The figures are those of
    :func:`compute_timings`, computed on the rows without building objects.
    """
    return _figures(rows[0][0], _walk(rows, _started(rows[0][4]), changed), ended_at_ms)


# What the figures of a conversation's next messages depend on, after its last one:
# ``(started_at_ms, last_at_ms, count, user_count, first_ms, first_role, run_started,
# last_user_ms)``. The first two are the times of its first and last messages, and
# ``run_started`` is the time of the first user message not answered yet. (A tuple, which
# costs less to build than an object, once per conversation of a batch.)
_Running = tuple[int, int, int, int, "float | None", "str | None", "int | None", "int | None"]


def _started(started_at_ms: int) -> _Running:
    # A conversation with no message seen yet that starts at ``started_at_ms``.
    return (started_at_ms, 0, 0, 0, None, None, None, None)


def _walk(rows: Iterable[Any], running: _Running,
          changed: list[tuple[Any, float | None, bool]]) -> _Running:
    # Extends ``running`` by message rows that come after every message it has seen, as
    # in :func:`_conversation_figures`.
    (started_at_ms, at_ms, count, user_count, first_ms, first_role, run_started,
     last_user_ms) = running
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
    return (started_at_ms, at_ms, count, user_count, first_ms, first_role, run_started,
            last_user_ms)


def _figures(conversation_id: int, running: _Running, ended_at_ms: int | None) -> dict[str, Any]:
    (started_at_ms, last_at_ms, count, user_count, first_ms, first_role, _,
     last_user_ms) = running
    # A user message after the end reopens the conversation.
    if ended_at_ms is not None and last_user_ms is not None and last_user_ms > ended_at_ms:
        ended_at_ms = None
    return {
        "id": conversation_id,
        "started_at_ms": started_at_ms,
        "last_message_at_ms": last_at_ms,
        "message_count": count,
        "user_message_count": user_count,
        "first_response_ms": first_ms,
        "first_response_role": first_role,
        "ended_at_ms": ended_at_ms,
    }


# A conversation's figures after its latest message, as this process stored them:
# ``(channel, external_id, started_at_ms, last_message_at_ms, message_count,
# user_message_count, first_response_ms, first_response_role, run_started, last_user_ms)``,
# the channel and external id followed by the fields of ``_Running``. The first eight are
# columns of the conversation row, compared with the stored row before the state is used.
# (A tuple of plain values, which the garbage collector stops tracking, not an object.)
ConversationState = tuple[Any, ...]
_COMPARED = 8


class ConversationCache:
    """The states of the conversations a writer stored last, at most ``size`` of them.

    A state (see ``ConversationState``) is used only while the stored conversation row
    still has its figures. Messages are only added to a conversation, each counted message
    adds to ``message_count``, and the other messages move only its first and last times.
    So a conversation whose row matches has the messages the state was computed from,
    apart from messages that leave every figure unchanged. Erasure and retention remove
    whole conversations, and the channel and external id in a state tell a conversation
    apart from a new one that SQLite gives the same id.
    """

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._states: dict[int, ConversationState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def get(self, conversation_id: int) -> ConversationState | None:
        """Return the state of ``conversation_id``, or ``None``."""
        return self._states.get(conversation_id)

    def update(self, states: Mapping[int, ConversationState]) -> None:
        """Remember ``states``, once the transaction that stored them has committed."""
        entries = self._states
        for conversation_id, state in states.items():
            entries.pop(conversation_id, None)
            entries[conversation_id] = state
        # The states written longest ago go first.
        excess = len(entries) - self.size
        if excess > 0:
            for conversation_id in list(itertools.islice(entries, excess)):
                del entries[conversation_id]

    def discard(self, conversation_ids: Iterable[int]) -> None:
        """Forget the states of ``conversation_ids``."""
        for conversation_id in conversation_ids:
            self._states.pop(conversation_id, None)

    def clear(self) -> None:
        """Forget every state."""
        self._states.clear()


@dataclass(slots=True)
class RefreshPlan:
    """Figures computed before a batch of message rows is inserted; see :func:`plan_refresh`.

    ``expected`` are the keys of the rows the plan counts as new, in row order. ``states``
    are the states of the conversations once the plan is applied. ``stored`` maps the key
    of every row to the conversation id and time of the message stored with that key
    once the plan is applied. ``with_intent`` are the conversations that have an intent.
    ``moved`` are the conversations whose start the plan changes, with their start before.
    ``same_start`` are the conversations whose stored start time the plan keeps.
    ``identities`` maps each stored conversation of the rows to its channel and external id.
    """

    conversation_ids: list[int]
    expected: list[str]
    message_changes: list[dict[str, Any]]
    conversation_changes: list[dict[str, Any]]
    states: dict[int, ConversationState] = field(default_factory=dict)
    stored: dict[str, tuple[int, int]] = field(default_factory=dict)
    with_intent: set[int] = field(default_factory=set)
    moved: list[tuple[int, int]] = field(default_factory=list)
    same_start: set[int] = field(default_factory=set)
    identities: dict[int, tuple[str, str]] = field(default_factory=dict)


def plan_refresh(session: Session, rows: Sequence[list[Any]],
                 known: Callable[[int], ConversationState | None] | None = None) -> RefreshPlan:
    """Compute the figures of the conversations of message ``rows`` before they are inserted.

    Rows are lists of the values of :data:`MESSAGE_COLUMNS`, in that order. A row is new
    when no stored message and no earlier row has its key. New rows get ids above every
    stored id, in row order, so they sort after stored messages of the same time, as
    :func:`refresh_conversations` sorts them once inserted. Their ``response_ms`` and
    ``is_first_response`` are set in place, so that they go in with their final values,
    and only stored messages whose figures change need an update.
    The plan holds only if exactly the expected rows are then inserted, in order
    (:func:`chatmw.store.identity.insert_ignore_expected`): apply it with
    :func:`apply_refresh`, or else call :func:`refresh_conversations`.

    ``known`` returns the state of a conversation as this process stored it last (see
    :class:`ConversationCache`). A conversation whose stored row still matches that state,
    and whose new rows all come at or after its last message, is planned from the state
    alone. The messages of the other conversations are read.
    """
    stored_rows: dict[str, tuple[int, int]] = {
        key: (conversation_id, at_ms) for key, conversation_id, at_ms in select_by_keys(
            session, Message.__table__, ("key",), [(row[_KEY],) for row in rows],
            ("key", "conversation_id", "occurred_at_ms"))}
    new_rows: dict[int, list[list[Any]]] = {}
    expected: list[str] = []
    for row in rows:
        key = row[_KEY]
        if key not in stored_rows:
            conversation_id = row[_CONVERSATION]
            stored_rows[key] = (conversation_id, row[_AT])
            added = new_rows.get(conversation_id)
            if added is None:
                new_rows[conversation_id] = [row]
            else:
                added.append(row)
            expected.append(key)
    ids = sorted({row[_CONVERSATION] for row in rows})

    message_changes: list[dict[str, Any]] = []
    conversation_changes: list[dict[str, Any]] = []
    states: dict[int, ConversationState] = {}
    with_intent: set[int] = set()
    moved: list[tuple[int, int]] = []
    same_start: set[int] = set()
    identities: dict[int, tuple[str, str]] = {}
    for start in range(0, len(ids), REFRESH_CHUNK):
        chunk = ids[start:start + REFRESH_CHUNK]
        conversations = _conversation_rows(session, chunk)
        additions: dict[int, list[Any]] = {}
        planned: dict[int, _Running] = {}
        unknown: list[int] = []
        # The timing rows whose figures change, of every conversation of the chunk.
        changed: list[tuple[Any, float | None, bool]] = []
        for conversation_id in chunk:
            added = _added(new_rows.get(conversation_id))
            additions[conversation_id] = added
            row = conversations.get(conversation_id)
            if row is None:
                unknown.append(conversation_id)
                continue
            identities[conversation_id] = (row[0], row[1])
            if row[9]:
                with_intent.add(conversation_id)
            state = None if known is None else known(conversation_id)
            if (state is not None and row[:_COMPARED] == state[:_COMPARED]
                    and (not added or state[3] <= added[0][4])):
                planned[conversation_id] = state[2:]
            else:
                unknown.append(conversation_id)
        stored = ({group[0][0]: group for group in _groups(_stored_timings(session, unknown))}
                  if unknown else {})
        for conversation_id in chunk:
            running = planned.get(conversation_id)
            if running is not None:
                running = _walk(additions[conversation_id], running, changed)
            else:
                merged = _merged(stored.get(conversation_id, ()), additions[conversation_id])
                if not merged:
                    continue
                running = _walk(merged, _started(merged[0][4]), changed)
            row = conversations.get(conversation_id)
            conversation_changes.append(
                _figures(conversation_id, running, None if row is None else row[8]))
            if row is not None:
                states[conversation_id] = row[:2] + running
                if row[2] != running[0]:
                    moved.append((conversation_id, row[2]))
                else:
                    same_start.add(conversation_id)
        for message, response_ms, is_first in changed:
            if type(message) is list:
                message[_RESPONSE] = response_ms
                message[_FIRST] = is_first
            else:
                message_changes.append({"id": message, "response_ms": response_ms,
                                        "is_first_response": is_first})
    return RefreshPlan(ids, expected, message_changes, conversation_changes, states,
                       stored_rows, with_intent, moved, same_start, identities)


def _conversation_rows(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    # The columns of a ConversationState, the end time and whether there is an intent.
    # On PostgreSQL the read locks the rows in id order with FOR NO KEY UPDATE, the lock
    # the updates to come take. Writers of one conversation then wait for each other here
    # instead of deadlocking later, and plan the figures from committed rows.
    statement = select(
        Conversation.id, Conversation.channel, Conversation.external_id,
        Conversation.started_at_ms, Conversation.last_message_at_ms, Conversation.message_count,
        Conversation.user_message_count, Conversation.first_response_ms,
        Conversation.first_response_role, Conversation.ended_at_ms,
        Conversation.intent.is_not(None),
    ).where(id_in(session, Conversation.id, ids))
    if session.get_bind().dialect.name == "postgresql":
        statement = statement.order_by(Conversation.id).with_for_update(key_share=True)
    return {row[0]: row[1:] for row in session.connection().execute(statement).all()}


def _added(new_rows: Sequence[list[Any]] | None) -> list[Any]:
    # New rows as timing rows, sorted by time. Rows of equal time keep their order. The
    # message of a timing row is the row itself, which the plan updates in place.
    if not new_rows:
        return []
    timings = [(row[_CONVERSATION], row, row[_ROLE], row[_KIND], row[_AT], row[_RESPONSE],
                row[_FIRST]) for row in new_rows]
    if len(timings) > 1:
        timings.sort(key=itemgetter(4))
    return timings


def _merged(stored: Sequence[Any], added: Sequence[Any]) -> Sequence[Any]:
    # Stored rows come sorted by time and id, and ``added`` (see _added) are the new rows.
    # New rows follow stored ones at equal times, in row order, because their ids will be
    # higher. The sorts are stable, so that order holds.
    if not added:
        return stored
    if not stored or stored[-1][4] <= added[0][4]:
        # The common case: every new message is at least as late as the stored ones.
        return [*stored, *added]
    entries = [(row[4], 0, row) for row in stored] + [(row[4], 1, row) for row in added]
    entries.sort(key=itemgetter(0, 1))
    return [entry[2] for entry in entries]


def apply_refresh(session: Session, plan: RefreshPlan) -> int:
    """Store the figures of ``plan`` once its rows went in as expected.

    Returns the conversation rows updated, one per conversation of the plan unless another
    transaction removed a conversation since the plan read it.
    """
    return _apply(session, plan.message_changes, plan.conversation_changes, plan.moved,
                  plan.same_start)
