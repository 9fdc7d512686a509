"""The batch writer: turns a batch of events into rows in one transaction.

Every write is idempotent: messages, touches and exposures carry unique keys and are
inserted with ``ON CONFLICT DO NOTHING``; statuses are unique per message and status; the
derived figures of a conversation are recomputed from its stored messages. A batch that
is written twice therefore stores the same rows as one written once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Boolean, Engine, Integer, String, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.exchange import expand_all
from chatmw.store import models
from chatmw.store.changes import record_changes
from chatmw.store.derive import (
    MESSAGE_COLUMNS,
    UNTIMED_KINDS,
    ConversationCache,
    ConversationState,
    apply_refresh,
    plan_refresh,
    refresh_conversations,
)
from chatmw.store.identity import (
    CHUNK,
    KnownKeys,
    assign_sessions,
    bulk_update,
    derived_table,
    id_in,
    insert_ignore,
    insert_ignore_expected,
    lock_rows,
    resolve_contacts,
    resolve_named_conversations,
    select_by_keys,
    update_from,
    upsert,
)
from chatmw.store.statistics import GrowthAnalyzer

__all__ = ["Writer", "WriterSettings", "Enricher", "Preprocessor", "Handler", "STATUS_RANK",
           "stored_messages"]

# An enricher returns extra column values for a message row (for example its sentiment).
Enricher = Callable[[ev.Message], Mapping[str, Any]]
# A preprocessor may replace the messages of a batch before they are stored, with the
# session at hand (for example to recognise survey answers).
Preprocessor = Callable[[Session, list[ev.Message]], list[ev.Message]]
Handler = Callable[[Session, list[Any]], None]

logger = logging.getLogger("chatmw")

# SQLSTATEs of a PostgreSQL transaction rolled back to break a deadlock or a serialization
# failure: nothing of it was stored, so the writer writes the batch again.
_CONFLICT_STATES = frozenset({"40P01", "40001"})
# Writes of one batch, the first included, while it meets such conflicts.
_CONFLICT_ATTEMPTS = 5

# The position of each column in the message rows that the writer builds.
_COLUMN_INDEX = {name: index for index, name in enumerate(MESSAGE_COLUMNS)}

# A status only moves forward: a late "sent" after "read" changes nothing.
STATUS_RANK = {"sent": 1, "delivered": 2, "read": 3, "failed": 4}


@dataclass(slots=True)
class WriterSettings:
    """Settings of the writer. ``session_gap_ms`` is the silence that starts a new conversation."""

    session_gap_ms: int = 30 * 60 * 1000


@dataclass
class Writer:
    """Writes batches of events into the store.

    Extra event types are handled by functions added to ``handlers``; ``enrichers`` add
    columns to message rows off the request path; ``preprocessors`` may rewrite messages.
    ``transform`` (the recorder's, such as pseudonyms) is applied to the events decoded
    from chat exchanges (:mod:`chatmw.exchange`), which the recorder never saw.
    """

    engine: Engine
    settings: WriterSettings = field(default_factory=WriterSettings)
    enrichers: list[Enricher] = field(default_factory=list)
    preprocessors: list[Preprocessor] = field(default_factory=list)
    handlers: dict[type, Handler] = field(default_factory=dict)
    transform: Callable[[ev.Event], ev.Event] | None = None
    # A recorder in this writer's thread decodes chat exchanges before it writes a batch,
    # so a batch written again after a failure is decoded and counted once and a failing
    # event is isolated from the other events of its exchange. A writer process
    # (chatmw.writer_process) takes them undecoded, and this writer decodes them there.
    expands_exchanges: bool = field(default=False, init=False)
    # The figures of the conversations this writer stored last (see plan_refresh).
    conversations: ConversationCache = field(default_factory=ConversationCache, init=False,
                                              repr=False, compare=False)
    # Contacts and named conversations this writer found stored, whose insert it skips.
    contact_keys: KnownKeys = field(default_factory=KnownKeys, init=False, repr=False,
                                    compare=False)
    conversation_keys: KnownKeys = field(default_factory=KnownKeys, init=False, repr=False,
                                         compare=False)
    # Analyses the tables of a young PostgreSQL store as its messages double.
    statistics: GrowthAnalyzer = field(default_factory=GrowthAnalyzer, init=False,
                                       repr=False, compare=False)

    def __post_init__(self) -> None:
        defaults: dict[type, Handler] = {
            ev.Message: self._write_messages,
            ev.Status: self._write_statuses,
            ev.Touch: self._write_touches,
            ev.ConversationUpdate: self._write_updates,
            ev.Exposure: self._write_exposures,
            ev.RawPayload: self._write_raw,
        }
        for event_type, handler in defaults.items():
            self.handlers.setdefault(event_type, handler)

    def __getstate__(self) -> dict[str, Any]:
        # A writer is pickled into the writer process (chatmw.writer_process): the engine
        # travels as its URL, with the password, and the child opens its own.
        state = dict(self.__dict__)
        state["engine"] = self.engine.url.render_as_string(hide_password=False)
        state["conversations"] = ConversationCache(self.conversations.size)
        state["contact_keys"] = KnownKeys(self.contact_keys.size)
        state["conversation_keys"] = KnownKeys(self.conversation_keys.size)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from chatmw.store.engine import make_engine

        state = dict(state)
        state["engine"] = make_engine(state["engine"])
        self.__dict__.update(state)

    def write(self, batch: Sequence[ev.Event]) -> int:
        """Write ``batch`` in one transaction, in order, grouping runs of one event type.

        Returns the number of events written once chat exchanges are decoded.
        """
        return self.write_counted(batch)[0]

    def write_counted(self, batch: Sequence[ev.Event]) -> tuple[int, int]:
        """Write ``batch`` as :meth:`write` does, and return its events and new messages.

        New messages are those whose keys were not stored when the transaction read them
        (one each for keys repeated in the batch), so a repeated batch has none.
        """
        batch = self.expand(batch)
        attempt = 1
        while True:
            try:
                return self._write_checked(batch)
            except DBAPIError as error:
                state = getattr(error.orig, "sqlstate", None)
                if state not in _CONFLICT_STATES or attempt >= _CONFLICT_ATTEMPTS:
                    raise
            attempt += 1
            logger.warning("store write of %d events rolled back (SQLSTATE %s), writing it "
                           "again (attempt %d of %d)", len(batch), state, attempt,
                           _CONFLICT_ATTEMPTS)

    def _write_checked(self, batch: Sequence[ev.Event]) -> tuple[int, int]:
        remembered = len(self.contact_keys) + len(self.conversation_keys)
        try:
            return self._write_once(batch)
        except (_RowsRemoved, IntegrityError) as error:
            # A remembered id may name a removed row. Then the batch fails the checks of
            # its ids (_RowsRemoved) or a foreign key of a new conversation, and the second
            # write reads every id (see _write_once).
            if isinstance(error, IntegrityError) and not remembered:
                raise
            return self._write_once(batch)

    def _write_once(self, batch: Sequence[ev.Event]) -> tuple[int, int]:
        try:
            with Session(self.engine) as session:
                with session.begin():
                    self.write_in(session, batch)
                # Committed: the conversation figures planned in the transaction now hold.
                self.conversations.update(session.info.pop(_PENDING_STATES, {}))
                new_messages = session.info.get(_NEW_MESSAGES, 0)
            self.statistics.after_commit(self.engine, new_messages)
            return len(batch), new_messages
        except BaseException:
            # The remembered ids may name rows that erasure or retention removed, or rows
            # inserted by this failed transaction, so all of them are read again.
            self.contact_keys.clear()
            self.conversation_keys.clear()
            raise

    def expand(self, batch: Sequence[ev.Event]) -> Sequence[ev.Event]:
        """Decode the chat exchanges of ``batch`` into events, passed through ``transform``.

        The other events of a batch were transformed by the recorder already.
        """
        return expand_all(batch, None if self.transform is None else self._transform_all)

    def _transform_all(self, events: list[ev.Event]) -> list[ev.Event]:
        return [self.transform(event) for event in events]  # type: ignore[misc]

    def write_in(self, session: Session, batch: Sequence[ev.Event]) -> None:
        """Write ``batch`` inside an open ``session`` transaction.

        Runs of one event type are written in batch order, except that in a stretch of
        messages and conversation updates alone, every message is written before every
        update. A bot's exchanges alternate the two (user message, reply, update), and one
        handler call per exchange costs a dozen statements each. The result is the same:
        updates set fields that messages never overwrite (a message sets a conversation's
        intent only while it has none), and ends are checked against message times again
        after the updates (see ``_write_updates``).
        """
        for event_type, run in _coalesced_runs(batch):
            handler = self._handler_for(event_type)
            handler(session, run)

    def _handler_for(self, event_type: type) -> Handler:
        for klass in event_type.__mro__:
            if klass in self.handlers:
                return self.handlers[klass]
        raise TypeError(f"no handler for event type {event_type.__name__}")

    # Messages

    def _write_messages(self, session: Session, messages: list[ev.Message]) -> None:
        for preprocess in self.preprocessors:
            messages = preprocess(session, messages)
        if not messages:
            return
        to_ms = ev.to_ms
        times = [to_ms(message.occurred_at) for message in messages]
        identities = [(message.channel, message.user_id) for message in messages]
        contacts = self._contacts_for(session, identities, times)
        lock_rows(session, models.Contact.__table__, contacts.values())
        contact_ids = [contacts[identity] for identity in identities]
        conversation_ids, named_ids = self._conversations_for(session, messages, times,
                                                              contact_ids)

        # Rows are lists in MESSAGE_COLUMNS order, because the insert sends sequences and a
        # dict per row cost more to build and to turn back into one.
        rows = []
        append = rows.append
        enrichers = self.enrichers
        column_index = _COLUMN_INDEX
        for message, at_ms, conversation_id, contact_id in zip(
                messages, times, conversation_ids, contact_ids, strict=True):
            meta = message.meta
            row = [message.key, conversation_id, contact_id, message.channel, message.role,
                   message.kind, message.text, at_ms, message.platform_message_id,
                   message.reply_to, message.latency_ms, None, False, message.intent, None,
                   None, None, dict(meta) if meta else None]
            for enrich in enrichers:
                for name, value in enrich(message).items():
                    try:
                        row[column_index[name]] = value
                    except KeyError:
                        raise ValueError(f"an enricher returned {name!r}, which is not a "
                                         "column of messages") from None
            append(row)
        # The response figures are computed before the insert, so that new messages go in
        # with them. When the insert differs from the plan, the conversations are
        # recomputed from the stored messages instead.
        pending: dict[int, ConversationState] = session.info.setdefault(_PENDING_STATES, {})
        plan = plan_refresh(session, rows, lambda conversation_id: (
            pending.get(conversation_id) or self.conversations.get(conversation_id)))
        # The ids of named conversations may come from memory (KnownKeys): the plan's read
        # of their rows checks them before any message goes in.
        if any(plan.identities.get(cid) != key for key, cid in named_ids.items()):
            raise _removed_meanwhile("conversations", 1)
        planned = insert_ignore_expected(session, models.Message.__table__, rows, ["key"],
                                         plan.expected, MESSAGE_COLUMNS)
        session.info[_NEW_MESSAGES] = session.info.get(_NEW_MESSAGES, 0) + len(plan.expected)
        if len(plan.expected) < len(rows) or not planned:
            self._record_repeated(session, rows, plan.stored, plan.expected if planned else ())

        self._write_attributes(session, messages, conversation_ids)
        self._touch_contacts(session, messages, times, contacts, contact_ids)
        self._apply_intents(session, messages, conversation_ids, plan.with_intent)
        if planned:
            updated = apply_refresh(session, plan)
            if updated < len(plan.conversation_changes):
                raise _removed_meanwhile("conversations",
                                         len(plan.conversation_changes) - updated)
            pending.update(plan.states)
            session.info.setdefault(_STORED_MESSAGES, {}).update(plan.stored)
        else:
            # NOTE: this path does not check that the conversations are still stored (the
            # contacts' update above does check the contacts).
            refresh_conversations(session, conversation_ids)
            for conversation_id in plan.conversation_ids:
                pending.pop(conversation_id, None)
            self.conversations.discard(plan.conversation_ids)
            session.info.pop(_STORED_MESSAGES, None)
        outbound = [(m.channel, m.platform_message_id) for m in messages
                    if m.role != "user" and m.platform_message_id]
        if outbound:
            refresh_statuses(session, outbound)
        link_pending_touches(session, set(conversation_ids), self.settings.session_gap_ms)

    @staticmethod
    def _record_repeated(session: Session, rows: Sequence[Sequence[Any]],
                         stored: Mapping[str, tuple[int, int]], new_keys: Collection[str]) -> None:
        # A message whose key was stored already adds no message id. Its attributes, intent
        # and owner still go to the conversation it was assigned, and the business handlers
        # write to the stored message's conversation, so both are logged. ``new_keys`` is
        # empty when the insert did not go as planned, and then every row is logged. Rows
        # are in MESSAGE_COLUMNS order, so a row's key is its first value and its
        # conversation its second.
        new = set(new_keys)
        repeated: set[int] = set()
        for row in rows:
            key = row[0]
            if key in new:
                continue
            repeated.add(row[1])
            if key in stored:
                repeated.add(stored[key][0])
        record_changes(session.connection(), conversations=[(cid, None) for cid in repeated])

    def _contacts_for(self, session: Session, identities: Sequence[tuple[str, str]],
                      times: Sequence[int]) -> dict[tuple[str, str], int]:
        first_seen: dict[tuple[str, str], int] = {}
        for identity, at_ms in zip(identities, times, strict=True):
            earliest = first_seen.get(identity)
            if earliest is None or at_ms < earliest:
                first_seen[identity] = at_ms
        return resolve_contacts(session, first_seen, self.contact_keys)

    def _conversations_for(
        self, session: Session, messages: Sequence[ev.Message], times: Sequence[int],
        contact_ids: Sequence[int],
    ) -> tuple[list[int], dict[tuple[str, str], int]]:
        # Returns each message's conversation id, and the ids of the named conversations.
        named: dict[tuple[str, str], tuple[int, int | None]] = {}
        unnamed: list[tuple[str, int, str, int]] = []
        unnamed_index: list[int] = []
        keys: list[tuple[str, str] | None] = []
        for index, (message, at_ms, contact_id) in enumerate(
                zip(messages, times, contact_ids, strict=True)):
            external_id = message.conversation_id
            if external_id is None:
                unnamed.append((message.channel, contact_id, message.user_id, at_ms))
                unnamed_index.append(index)
                keys.append(None)
                continue
            key = (message.channel, external_id)
            keys.append(key)
            found = named.get(key)
            if found is None:
                named[key] = (at_ms, contact_id if message.role == "user" else None)
                continue
            earliest, owner = found
            if owner is None and message.role == "user":
                owner = contact_id
            elif at_ms >= earliest:
                continue
            named[key] = (min(earliest, at_ms), owner)
        named_ids = resolve_named_conversations(session, named, self.conversation_keys)
        sessions = assign_sessions(session, unnamed, self.settings.session_gap_ms)
        result: list[int] = [0 if key is None else named_ids[key] for key in keys]
        for position, index in enumerate(unnamed_index):
            result[index] = sessions[position]
        self._claim_owners(session, named, named_ids)
        return result, named_ids

    def _claim_owners(self, session: Session, named: Mapping[tuple[str, str], tuple[int, int | None]],
                      named_ids: Mapping[tuple[str, str], int]) -> None:
        # A conversation created by a bot message first gets its contact from the first user.
        owners = {named_ids[key]: owner for key, (_, owner) in named.items() if owner is not None}
        rows = [{"conversation_id": cid, "owner": owner} for cid, owner in sorted(owners.items())]
        update_from(session, models.Conversation.__table__, rows,
                    {"conversation_id": Integer(), "owner": Integer()},
                    "conversations.id = changes.conversation_id "
                    # The unary + keeps SQLite from driving the join through the index on
                    # contact_id, which scans the changes once per ownerless conversation.
                    "AND +conversations.contact_id IS NULL",
                    "contact_id = changes.owner")

    def _write_attributes(self, session: Session, messages: Sequence[ev.Message],
                          conversation_ids: Sequence[int]) -> None:
        values: dict[tuple[int, str], str] = {}
        for message, conversation_id in zip(messages, conversation_ids, strict=True):
            for name, value in message.attributes.items():
                values[(conversation_id, name)] = value
        write_attributes(session, values)

    def _touch_contacts(self, session: Session, messages: Sequence[ev.Message],
                        times: Sequence[int], contacts: Mapping[tuple[str, str], int],
                        contact_ids: Sequence[int]) -> None:
        # The ids of contacts may come from memory (KnownKeys), so the update matches each
        # row by its id and natural key, and a row that does not match fails the batch.
        # ``contact_ids`` are the messages' contacts, in message order.
        identities = {cid: identity for identity, cid in contacts.items()}
        if len(identities) < len(contacts):
            raise _removed_meanwhile("contacts", len(contacts) - len(identities))
        seen: dict[int, list[int | None]] = {}
        for message, at_ms, contact_id in zip(messages, times, contact_ids, strict=True):
            counted_user = message.role == "user" and message.kind not in UNTIMED_KINDS
            entry = seen.get(contact_id)
            if entry is None:
                seen[contact_id] = [at_ms, at_ms, at_ms if counted_user else None]
                continue
            if at_ms < entry[0]:  # type: ignore[operator]
                entry[0] = at_ms
            elif at_ms > entry[1]:  # type: ignore[operator]
                entry[1] = at_ms
            if counted_user and (entry[2] is None or at_ms > entry[2]):
                entry[2] = at_ms
        if session.get_bind().dialect.name == "sqlite":
            # The update of _touch_contacts_joined, run by executemany: SQLite 3.40 took
            # 1.9 ms for 1,300 contacts this way and 3.4 ms for the join with a JSON table.
            updated = session.connection().exec_driver_sql(
                _TOUCH_CONTACTS_SQLITE,
                [(first, last, last_user, cid, *identities[cid]) for cid, (first, last, last_user)
                 in sorted(seen.items())]).rowcount
        else:
            updated = self._touch_contacts_joined(session, seen, identities)
        if updated < len(seen):
            raise _removed_meanwhile("contacts", len(seen) - updated)

    def _touch_contacts_joined(self, session: Session, seen: Mapping[int, list[int | None]],
                               identities: Mapping[int, tuple[str, str]]) -> int:
        rows = [{"contact_id": cid, "channel": identities[cid][0],
                 "external_id": identities[cid][1], "first": first, "last": last,
                 "last_user": last_user}
                for cid, (first, last, last_user) in sorted(seen.items())]
        return update_from(
            session, models.Contact.__table__, rows,
            {"contact_id": Integer(), "channel": String(), "external_id": String(),
             "first": BigInteger(), "last": BigInteger(), "last_user": BigInteger()},
            "contacts.id = changes.contact_id AND contacts.channel = changes.channel "
            "AND contacts.external_id = changes.external_id",
            "first_seen_ms = CASE WHEN contacts.first_seen_ms > changes.first "
            "THEN changes.first ELSE contacts.first_seen_ms END, "
            "last_seen_ms = CASE WHEN contacts.last_seen_ms < changes.last "
            "THEN changes.last ELSE contacts.last_seen_ms END, "
            "last_user_message_ms = CASE WHEN changes.last_user IS NULL "
            "THEN contacts.last_user_message_ms "
            "WHEN contacts.last_user_message_ms IS NULL THEN changes.last_user "
            "WHEN contacts.last_user_message_ms < changes.last_user THEN changes.last_user "
            "ELSE contacts.last_user_message_ms END",
        )

    def _apply_intents(self, session: Session, messages: Sequence[ev.Message],
                       conversation_ids: Sequence[int], with_intent: Collection[int]) -> None:
        # Conversations in ``with_intent`` had an intent when the plan read their rows, and
        # an intent is never cleared, so the statement would leave them as they are.
        intents: dict[int, str] = {}
        for message, conversation_id in zip(messages, conversation_ids, strict=True):
            if (message.intent and conversation_id not in intents
                    and conversation_id not in with_intent):
                intents[conversation_id] = message.intent
        if not intents:
            return
        update_from(
            session, models.Conversation.__table__,
            [{"conversation_id": cid, "new_intent": intent} for cid, intent in sorted(intents.items())],
            {"conversation_id": Integer(), "new_intent": String()},
            "conversations.id = changes.conversation_id AND conversations.intent IS NULL",
            "intent = changes.new_intent")

    # Statuses

    def _write_statuses(self, session: Session, statuses: list[ev.Status]) -> None:
        rows = [
            {"channel": status.channel, "platform_message_id": status.platform_message_id,
             "status": status.status, "occurred_at_ms": ev.to_ms(status.occurred_at),
             "error_code": status.error_code, "error_title": status.error_title}
            for status in statuses
        ]
        insert_ignore(session, models.MessageStatus.__table__, rows,
                      ["channel", "platform_message_id", "status"])
        refresh_statuses(session, [(s.channel, s.platform_message_id) for s in statuses])

    # Touches

    def _write_touches(self, session: Session, touches: list[ev.Touch]) -> None:
        times = [ev.to_ms(touch.occurred_at) for touch in touches]
        first_seen: dict[tuple[str, str], int] = {}
        for touch, at_ms in zip(touches, times, strict=True):
            identity = (touch.channel, touch.user_id)
            first_seen[identity] = min(at_ms, first_seen.get(identity, at_ms))
        contacts = resolve_contacts(session, first_seen)
        lock_rows(session, models.Contact.__table__, contacts.values())
        named = {(t.channel, t.conversation_id): (at_ms, contacts[(t.channel, t.user_id)])
                 for t, at_ms in zip(touches, times, strict=True) if t.conversation_id}
        named_ids = resolve_named_conversations(session, named)
        rows = []
        for touch, at_ms in zip(touches, times, strict=True):
            conversation_id = named_ids.get((touch.channel, touch.conversation_id or ""))
            rows.append({
                "key": touch.key, "contact_id": contacts[(touch.channel, touch.user_id)],
                "conversation_id": conversation_id, "channel": touch.channel, "kind": touch.kind,
                "occurred_at_ms": at_ms, "source": touch.source, "medium": touch.medium,
                "campaign": touch.campaign, "term": touch.term, "content": touch.content,
                "ad_id": touch.ad_id, "ref": touch.ref, "click_id": touch.click_id,
                "referrer": touch.referrer, "landing_url": touch.landing_url,
                "meta": dict(touch.meta) or None,
            })
        insert_ignore(session, models.Touch.__table__, rows, ["key"])
        link_touches_to_open_conversations(session, set(contacts.values()),
                                           self.settings.session_gap_ms)
        refresh_touch_pointers(session, contact_ids=set(contacts.values()))
        # The touches can be linked to any conversation of their contacts.
        record_changes(session.connection(), contacts=contacts.values())

    # Conversation updates

    def _write_updates(self, session: Session, updates: list[ev.ConversationUpdate]) -> None:
        times = [ev.to_ms(item.occurred_at) for item in updates]
        conversation_ids = self._update_targets(session, updates, times)
        lock_rows(session, models.Conversation.__table__,
                  [cid for cid in conversation_ids if cid is not None])
        values: dict[int, dict[str, Any]] = {}
        attributes: dict[tuple[int, str], str] = {}
        ended: set[int] = set()
        for item, at_ms, conversation_id in zip(updates, times, conversation_ids, strict=True):
            if conversation_id is None:
                continue
            # Later updates of one conversation override earlier ones field by field, as if
            # each were applied in turn.
            changes = values.setdefault(conversation_id, {})
            if item.ended is True:
                changes.update(ended_at_ms=at_ms, ended_reason=item.ended_reason or "ended")
                ended.add(conversation_id)
            elif item.ended is False:
                changes.update(ended_at_ms=None, ended_reason=None)
            for name, column in (("resolved", "resolved"), ("handed_off", "handed_off"),
                                 ("intent", "intent"), ("step", "last_step")):
                if getattr(item, name) is not None:
                    changes[column] = getattr(item, name)
            for name, value in item.attributes.items():
                attributes[(conversation_id, name)] = value
        self._apply_conversation_values(session, values)
        write_attributes(session, attributes)
        changed = {cid for cid, fields in values.items() if fields}
        changed.update(cid for cid, _ in attributes)
        # No foreign key rejects an attribute of a removed conversation, and an update of
        # one changes no row. The check runs after the writes, because SQLite then holds
        # this transaction's write lock and PostgreSQL keeps the rows that lock_rows locked.
        missing = len(changed) - _count_stored_conversations(session, changed)
        if missing:
            raise _removed_meanwhile("conversations", missing)
        record_changes(session.connection(), conversations=[(cid, None) for cid in changed])
        if ended:
            # A user message later than the end reopens the conversation, whichever came first.
            refresh_conversations(session, ended)

    def _update_targets(self, session: Session, updates: Sequence[ev.ConversationUpdate],
                        times: Sequence[int]) -> list[int | None]:
        # Each update's conversation: its named one (created when missing), or the latest
        # conversation of its contact on the channel that started at or before the update.
        named: dict[tuple[str, str], tuple[int, None]] = {}
        identities: dict[tuple[str, str], int] = {}
        for item, at_ms in zip(updates, times, strict=True):
            if item.conversation_id is not None:
                named.setdefault((item.channel, item.conversation_id), (at_ms, None))
            else:
                identities.setdefault((item.channel, item.user_id), at_ms)
        named_ids = resolve_named_conversations(session, named)
        # A contact not stored yet has no conversation to update, so the update creates
        # none. Created here, it would get the update's time as its first seen time, and
        # that time would then depend on whether a message of the same batch came first.
        contacts = {(channel, external_id): contact_id for channel, external_id, contact_id
                    in select_by_keys(session, models.Contact.__table__,
                                      ("channel", "external_id"), list(identities),
                                      ("channel", "external_id", "id"))}
        lookups = [
            {"idx": index, "channel": item.channel,
             "contact_id": contacts[(item.channel, item.user_id)], "at_ms": at_ms}
            for index, (item, at_ms) in enumerate(zip(updates, times, strict=True))
            if item.conversation_id is None and (item.channel, item.user_id) in contacts
        ]
        latest = latest_conversations_at(session, lookups)
        targets: list[int | None] = []
        for index, item in enumerate(updates):
            if item.conversation_id is not None:
                targets.append(named_ids[(item.channel, item.conversation_id)])
            else:
                targets.append(latest.get(index))
        return targets

    def _apply_conversation_values(self, session: Session,
                                   values: Mapping[int, Mapping[str, Any]]) -> None:
        # One UPDATE per distinct set of columns; most batches have one or two sets.
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for conversation_id, changes in sorted(values.items()):
            if changes:
                columns = tuple(sorted(changes))
                by_columns.setdefault(columns, []).append({"id": conversation_id, **changes})
        for columns, rows in by_columns.items():
            types = {"id": Integer(), **{name: _UPDATE_TYPES[name] for name in columns}}
            update_from(session, models.Conversation.__table__, rows, types,
                        "conversations.id = changes.id",
                        ", ".join(f"{name} = changes.{name}" for name in columns))

    # Exposures and raw payloads

    def _write_exposures(self, session: Session, exposures: list[ev.Exposure]) -> None:
        times = [ev.to_ms(item.occurred_at) for item in exposures]
        first_seen: dict[tuple[str, str], int] = {}
        for item, at_ms in zip(exposures, times, strict=True):
            identity = (item.channel, item.user_id)
            first_seen[identity] = min(at_ms, first_seen.get(identity, at_ms))
        contacts = resolve_contacts(session, first_seen)
        rows = [
            {"key": item.key, "contact_id": contacts[(item.channel, item.user_id)],
             "channel": item.channel, "kind": item.kind, "occurred_at_ms": at_ms,
             "meta": dict(item.meta) or None}
            for item, at_ms in zip(exposures, times, strict=True)
        ]
        insert_ignore(session, models.Exposure.__table__, rows, ["key"])

    def _write_raw(self, session: Session, payloads: list[ev.RawPayload]) -> None:
        rows = [
            {"channel": item.channel, "source": item.source, "received_at_ms": ev.to_ms(item.occurred_at),
             "reason": item.reason, "body": item.body}
            for item in payloads
        ]
        session.execute(models.RawPayload.__table__.insert(), rows)


# The key in ``Session.info`` of the conversation states a transaction has stored so far,
# which the writer remembers once it commits.
_PENDING_STATES = "chatmw.conversation_states"
# The key in ``Session.info`` of the number of new messages the transaction stored.
_NEW_MESSAGES = "chatmw.new_messages"
# The key in ``Session.info`` of the conversation id and time of each message key the
# transaction's message runs stored or found stored (see stored_messages).
_STORED_MESSAGES = "chatmw.stored_messages"


def stored_messages(session: Session, keys: Iterable[str]) -> dict[str, tuple[int, int]] | None:
    """Return the conversation id and time of the stored message of each of ``keys``.

    The result comes from the reads of the writer's message runs in this transaction,
    without a query. It is ``None`` when those reads did not cover every key.
    """
    known = session.info.get(_STORED_MESSAGES)
    if known is None:
        return None
    try:
        return {key: known[key] for key in keys}
    except KeyError:
        return None


def _count_stored_conversations(session: Session, ids: Iterable[int]) -> int:
    id_list = sorted(ids)
    stored = 0
    for start in range(0, len(id_list), CHUNK):
        chunk = id_list[start:start + CHUNK]
        stored += session.scalar(select(func.count()).select_from(models.Conversation)
                                 .where(models.Conversation.id.in_(chunk))) or 0
    return stored


class _RowsRemoved(OperationalError):
    """Rows that a batch resolved are gone, so the batch fails as retryable."""


def _removed_meanwhile(table: str, count: int) -> OperationalError:
    # Erasure or retention removed rows that this transaction resolved and gave its messages
    # (PostgreSQL, in another transaction), or rows whose ids the writer remembered.
    # Messages have no foreign keys that would reject them, so the batch fails as
    # retryable, and its next write creates the rows again.
    return _RowsRemoved(None, None, RuntimeError(
        f"{count} rows of {table} that the batch uses were removed while it was written; "
        "write the batch again"))


# Moves a contact's first and last seen times and last user message time to include a
# batch's messages (parameters: first, last, last user message or NULL, contact id,
# channel, external id).
_TOUCH_CONTACTS_SQLITE = (
    "UPDATE contacts SET first_seen_ms = min(first_seen_ms, ?1), "
    "last_seen_ms = max(last_seen_ms, ?2), "
    "last_user_message_ms = CASE WHEN ?3 IS NULL THEN last_user_message_ms "
    "WHEN last_user_message_ms IS NULL THEN ?3 ELSE max(last_user_message_ms, ?3) END "
    "WHERE id = ?4 AND channel = ?5 AND external_id = ?6")

# Types of the conversation columns that a ConversationUpdate sets.
_UPDATE_TYPES: dict[str, Any] = {
    "ended_at_ms": BigInteger(), "ended_reason": String(), "resolved": Boolean(),
    "handed_off": Boolean(), "intent": String(), "last_step": String(),
}


def _coalesced_runs(batch: Sequence[ev.Event]) -> list[tuple[type, list[Any]]]:
    """Group ``batch`` into runs of one type, messages before updates in mixed stretches."""
    runs: list[tuple[type, list[Any]]] = []
    messages: list[ev.Event] = []
    updates: list[ev.Event] = []
    for event_type, run in itertools.groupby(batch, key=type):
        if event_type is ev.Message:
            messages.extend(run)
            continue
        if event_type is ev.ConversationUpdate:
            updates.extend(run)
            continue
        _flush_stretch(runs, messages, updates)
        messages, updates = [], []
        runs.append((event_type, list(run)))
    _flush_stretch(runs, messages, updates)
    return runs


def _flush_stretch(runs: list[tuple[type, list[Any]]], messages: list[ev.Event],
                   updates: list[ev.Event]) -> None:
    if messages:
        runs.append((ev.Message, messages))
    if updates:
        runs.append((ev.ConversationUpdate, updates))


def latest_conversations_at(session: Session, lookups: Sequence[dict[str, Any]]) -> dict[int, int]:
    """Map each lookup's ``idx`` to the latest conversation started at or before ``at_ms``.

    Lookups are dicts of ``idx``, ``channel``, ``contact_id`` and ``at_ms``; one statement
    answers all of them through the ``(contact_id, started_at_ms)`` index.
    """
    if not lookups:
        return {}
    source, parameters = derived_table(
        session, "lookups",
        {"idx": Integer(), "channel": String(), "contact_id": Integer(), "at_ms": BigInteger()},
        lookups)
    statement = text(
        "SELECT lookups.idx, (SELECT c.id FROM conversations AS c "
        "WHERE c.channel = lookups.channel AND c.contact_id = lookups.contact_id "
        "AND c.started_at_ms <= lookups.at_ms ORDER BY c.started_at_ms DESC LIMIT 1) "
        f"FROM {source}")
    return {int(idx): int(cid) for idx, cid in session.connection().execute(statement, parameters)
            if cid is not None}


def write_attributes(session: Session, values: Mapping[tuple[int, str], str]) -> None:
    """Set conversation attributes; a later value of the same name replaces the earlier one."""
    rows = [{"conversation_id": cid, "name": name, "value": value}
            for (cid, name), value in sorted(values.items())]
    upsert(session, models.ConversationAttribute.__table__, rows, ["conversation_id", "name"], ["value"])


def refresh_statuses(session: Session, keys: Iterable[tuple[str, str]]) -> None:
    """Set each outbound message's status to the furthest one stored for it."""
    by_channel: dict[str, set[str]] = {}
    for channel, platform_id in keys:
        by_channel.setdefault(channel, set()).add(platform_id)
    status = models.MessageStatus
    for channel, ids in by_channel.items():
        id_list = sorted(ids)
        for start in range(0, len(id_list), CHUNK):
            chunk = id_list[start:start + CHUNK]
            best: dict[str, tuple[int, str, int]] = {}
            rows = session.connection().execute(
                select(status.platform_message_id, status.status, status.occurred_at_ms)
                .where(status.channel == channel, status.platform_message_id.in_(chunk))
            )
            for platform_id, name, at_ms in rows:
                rank = STATUS_RANK.get(name, 0)
                if platform_id not in best or rank > best[platform_id][0]:
                    best[platform_id] = (rank, name, at_ms)
            changes = [{"channel": channel, "platform_id": platform_id, "status": name,
                        "at_ms": at_ms}
                       for platform_id, (_, name, at_ms) in sorted(best.items())]
            update_from(session, models.Message.__table__, changes,
                        {"channel": String(), "platform_id": String(), "status": String(),
                         "at_ms": BigInteger()},
                        "messages.channel = changes.channel "
                        "AND messages.platform_message_id = changes.platform_id",
                        "status = changes.status, status_at_ms = changes.at_ms")


def link_touches_to_open_conversations(session: Session, contact_ids: Iterable[int], gap_ms: int) -> None:
    """Attach unlinked touches to the contact's conversation that was active at the time.

    A touch belongs to the conversation that started at most ``gap_ms`` after it, or that
    was running when it happened.
    """
    touch, conversation = models.Touch, models.Conversation
    ids = sorted(set(contact_ids))
    if ids:
        loose = session.execute(
            select(touch.id, touch.contact_id, touch.channel, touch.occurred_at_ms)
            .where(id_in(session, touch.contact_id, ids), touch.conversation_id.is_(None))
        ).all()
        for touch_id, contact_id, channel, at_ms in loose:
            target = session.execute(
                select(conversation.id)
                .where(conversation.contact_id == contact_id, conversation.channel == channel,
                       conversation.started_at_ms <= at_ms + gap_ms,
                       conversation.last_message_at_ms >= at_ms - gap_ms)
                .order_by(func.abs(conversation.started_at_ms - at_ms))
                .limit(1)
            ).scalar_one_or_none()
            if target is not None:
                session.execute(update(touch).where(touch.id == touch_id).values(conversation_id=target))


def link_pending_touches(session: Session, conversation_ids: set[int], gap_ms: int) -> None:
    """Link loose touches of the contacts of ``conversation_ids`` and refresh first and last touch."""
    if not conversation_ids:
        return
    conversation, touch = models.Conversation, models.Touch
    # Contacts of these conversations that have touches not linked to a conversation.
    with_loose = set(session.connection().execute(
        select(touch.contact_id).distinct()
        .join(conversation, conversation.contact_id == touch.contact_id)
        .where(id_in(session, conversation.id, sorted(conversation_ids)),
               touch.conversation_id.is_(None))
    ).scalars())
    if with_loose:
        link_touches_to_open_conversations(session, with_loose, gap_ms)
        refresh_touch_pointers(session, contact_ids=with_loose)
        record_changes(session.connection(), contacts=with_loose)


def refresh_touch_pointers(session: Session, contact_ids: Iterable[int]) -> None:
    """Set first and last touch on the contacts and on their conversations.

    A touch may name a conversation of another contact. Such conversations are written to
    the change log here; the callers log ``contact_ids``, which covers their own ones.
    """
    touch = models.Touch
    ids = sorted(set(contact_ids))
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        rows = session.connection().execute(
            select(touch.id, touch.contact_id, touch.conversation_id, touch.occurred_at_ms)
            .where(id_in(session, touch.contact_id, chunk))
            .order_by(touch.occurred_at_ms, touch.id)
        ).all()
        by_contact: dict[int, list[int]] = {}
        by_conversation: dict[int, list[int]] = {}
        for touch_id, contact_id, conversation_id, _ in rows:
            by_contact.setdefault(contact_id, []).append(touch_id)
            if conversation_id is not None:
                by_conversation.setdefault(conversation_id, []).append(touch_id)
        bulk_update(session, models.Contact.__table__,
                    [{"id": contact_id, "first_touch_id": touch_ids[0],
                      "last_touch_id": touch_ids[-1]}
                     for contact_id, touch_ids in by_contact.items()],
                    ("first_touch_id", "last_touch_id"))
        bulk_update(session, models.Conversation.__table__,
                    [{"id": conversation_id, "first_touch_id": touch_ids[0],
                      "last_touch_id": touch_ids[-1]}
                     for conversation_id, touch_ids in by_conversation.items()],
                    ("first_touch_id", "last_touch_id"))
        owners = session.connection().execute(
            select(models.Conversation.id, models.Conversation.contact_id)
            .where(id_in(session, models.Conversation.id, sorted(by_conversation)))
        ).all() if by_conversation else []
        owned = set(chunk)
        record_changes(session.connection(), conversations=[
            (conversation_id, None) for conversation_id, owner in owners if owner not in owned])
