"""The conversation states a writer keeps between batches change no stored row.

Each test writes the traffic of tests/test_writer_reference.py in a way that leaves a
writer's states stale, evicted or planned in a transaction that then failed, and compares
the stored rows with the reference.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.runtime import build_writer
from chatmw.security.erasure import erase_person
from chatmw.store import models
from chatmw.store.derive import ConversationCache
from chatmw.store.identity import KnownKeys, resolve_contacts
from tests.test_writer_reference import check_reference, traffic


def test_alternating_writers_store_reference_rows(engine: Engine) -> None:
    # Each writer's states go stale whenever the other one writes the same conversations.
    writers = [build_writer(Settings(sentiment=False), engine) for _ in range(2)]
    for index, batch in enumerate(traffic()):
        writers[index % 3 == 0].write(batch)
    assert len(writers[0].conversations) > 0
    assert len(writers[1].conversations) > 0
    check_reference(engine)


def test_small_cache_stores_reference_rows(engine: Engine) -> None:
    writer = build_writer(Settings(sentiment=False), engine)
    writer.conversations = ConversationCache(size=3)
    for batch in traffic():
        writer.write(batch)
        assert len(writer.conversations) <= 3
    check_reference(engine)


class _Failure(Exception):
    pass


def test_failed_batches_leave_no_state(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every batch is first written in a transaction that fails after the messages went in,
    # then written again. The states planned in the failed transaction must not be kept.
    writer = build_writer(Settings(sentiment=False), engine)
    message_handler = writer.handlers[ev.Message]
    failing = {"on": False}

    def handler(session: Session, messages: list[Any]) -> None:
        message_handler(session, messages)
        if failing["on"]:
            raise _Failure

    writer.handlers[ev.Message] = handler
    for batch in traffic():
        if any(isinstance(event, ev.Message) for event in batch):
            failing["on"] = True
            before = dict(writer.conversations._states)
            with pytest.raises(_Failure):
                writer.write(batch)
            assert writer.conversations._states == before
            failing["on"] = False
        writer.write(batch)
    check_reference(engine)


def test_states_follow_committed_figures(engine: Engine) -> None:
    writer = build_writer(Settings(sentiment=False), engine)
    for batch in traffic():
        writer.write(batch)
    with engine.connect() as connection:
        table = models.Conversation
        rows = {row[0]: tuple(row[1:]) for row in connection.execute(select(
            table.id, table.channel, table.external_id, table.started_at_ms,
            table.last_message_at_ms, table.message_count, table.user_message_count,
            table.first_response_ms, table.first_response_role))}
    states = writer.conversations._states
    assert states
    for conversation_id, state in states.items():
        assert state[:8] == rows[conversation_id]


def _conversation_rows(engine: Engine) -> list[tuple[Any, ...]]:
    table = models.Conversation
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(select(
            table.channel, table.external_id, table.started_at_ms, table.last_message_at_ms,
            table.message_count, table.user_message_count, table.first_response_ms,
            table.first_response_role)))


def _exchange(prefix: str, start_ms: int) -> list[ev.Event]:
    at = datetime(2025, 6, 1, tzinfo=UTC) + timedelta(milliseconds=start_ms)
    step = timedelta(seconds=3)
    return [
        ev.Message(channel="web", occurred_at=at, key=f"{prefix}1", role="user",
                   user_id="erased", conversation_id="named", text="hello"),
        ev.Message(channel="web", occurred_at=at + step, key=f"{prefix}2", role="bot",
                   user_id="erased", conversation_id="named", text="hi", intent="greeting"),
        ev.Message(channel="web", occurred_at=at, key=f"{prefix}3", role="user",
                   user_id="erased", text="anyone?"),
        ev.Message(channel="web", occurred_at=at + step, key=f"{prefix}4", role="bot",
                   user_id="erased", text="yes"),
    ]


def test_writer_recreates_erased_rows(engine: Engine) -> None:
    # The writer has seen the contact, the named conversation and their figures. Erasure
    # removes them, so the next messages of that person must create them again.
    writer = build_writer(Settings(sentiment=False), engine)
    writer.write(_exchange("a", 0))
    assert len(writer.contact_keys) > 0
    assert len(writer.conversation_keys) > 0
    assert len(writer.conversations) > 0
    erase_person(engine, "web", "erased")
    assert _conversation_rows(engine) == []
    writer.write(_exchange("b", 60_000))
    with_cache = _conversation_rows(engine)

    fresh = build_writer(Settings(sentiment=False), engine)
    erase_person(engine, "web", "erased")
    fresh.write(_exchange("b", 60_000))
    assert with_cache == _conversation_rows(engine)
    # Unnamed messages join the contact's latest conversation, the named one.
    assert [row[4] for row in with_cache] == [4]


def test_known_contacts_still_take_write_lock(engine: Engine) -> None:
    # Skipping the insert of known contacts must not leave the sessionisation reads of an
    # SQLite transaction outside the write lock, where another process may write.
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: PostgreSQL locks the contacts it sessionises")
    known = KnownKeys()
    with Session(engine) as session, session.begin():
        resolve_contacts(session, {("web", "u1"): 1000}, known)
    assert ("web", "u1") in known
    other = sqlite3.connect(engine.url.database, timeout=0)
    try:
        with Session(engine) as session, session.begin():
            resolve_contacts(session, {("web", "u1"): 2000}, known)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()


def _person_rows(engine: Engine) -> dict[str, Any]:
    # Each user's contact, with the natural keys of the conversations and the contacts
    # that its messages point to.
    message, contact, conversation = models.Message, models.Contact, models.Conversation
    with engine.connect() as connection:
        contacts = {row.id: row for row in connection.execute(select(contact))}
        conversations = {row.id: row for row in connection.execute(select(conversation))}
        messages = connection.execute(select(message.key, message.contact_id,
                                             message.conversation_id)).all()
    return {
        "contacts": sorted((row.channel, row.external_id, row.first_seen_ms, row.last_seen_ms)
                           for row in contacts.values()),
        "conversations": sorted(
            (row.channel, row.external_id, contacts[row.contact_id].external_id,
             row.message_count) for row in conversations.values()),
        "messages": sorted(
            (key, contacts[contact_id].external_id, conversations[conversation_id].external_id)
            for key, contact_id, conversation_id in messages),
    }


def _named_message(key: str, user_id: str, conversation_id: str, at_ms: int) -> ev.Message:
    at = datetime(2025, 6, 1, tzinfo=UTC) + timedelta(milliseconds=at_ms)
    return ev.Message(channel="web", occurred_at=at, key=key, role="user", user_id=user_id,
                      conversation_id=conversation_id, text="hello")


def test_remembered_ids_of_replaced_rows(engine: Engine) -> None:
    # The writer remembers the ids of a contact and a conversation. Erasure removes both,
    # and another writer stores a new person, to whom SQLite gives the same ids (the
    # highest ones). The next message of the erased person must get rows of its own.
    writer = build_writer(Settings(sentiment=False), engine)
    writer.write([_named_message("a1", "erased", "c-erased", 0)])
    erase_person(engine, "web", "erased")
    other = build_writer(Settings(sentiment=False), engine)
    other.write([_named_message("b1", "other", "c-other", 1_000)])
    writer.write([_named_message("a2", "erased", "c-erased", 2_000)])

    stored = _person_rows(engine)
    assert stored["messages"] == [
        ("a2", "erased", "c-erased"),
        ("b1", "other", "c-other"),
    ]
    assert stored["contacts"] == [
        ("web", "erased", 1_748_736_002_000, 1_748_736_002_000),
        ("web", "other", 1_748_736_001_000, 1_748_736_001_000),
    ]
    assert stored["conversations"] == [
        ("web", "c-erased", "erased", 1),
        ("web", "c-other", "other", 1),
    ]


def test_remembered_ids_skip_reads(engine: Engine) -> None:
    # A second batch of known users reads neither contacts nor conversations by their
    # natural keys, and stores the same rows as a writer that remembers nothing.
    writer = build_writer(Settings(sentiment=False), engine)
    writer.write([_named_message(f"a{i}", f"u{i}", f"c{i}", i) for i in range(5)])
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        writer.write([_named_message(f"b{i}", f"u{i}", f"c{i}", 100 + i) for i in range(5)])
    finally:
        event.remove(engine, "before_cursor_execute", record)
    by_natural_key = [s for s in statements if s.startswith("SELECT t.channel, t.external_id")]
    assert by_natural_key == []
    assert len(writer.contact_keys) == 5
    assert len(writer.conversation_keys) == 5
    assert [row[3] for row in _person_rows(engine)["conversations"]] == [2] * 5


def test_failed_write_forgets_ids(engine: Engine) -> None:
    # The rows that a failed transaction inserted are gone, so their ids are forgotten.
    writer = build_writer(Settings(sentiment=False), engine)
    message_handler = writer.handlers[ev.Message]

    def failing(session: Session, messages: list[Any]) -> None:
        message_handler(session, messages)
        raise _Failure

    writer.handlers[ev.Message] = failing
    with pytest.raises(_Failure):
        writer.write([_named_message("a1", "u1", "c1", 0)])
    assert len(writer.contact_keys) == 0
    assert len(writer.conversation_keys) == 0
    writer.handlers[ev.Message] = message_handler
    writer.write([_named_message("a1", "u1", "c1", 0)])
    assert _person_rows(engine)["messages"] == [("a1", "u1", "c1")]
