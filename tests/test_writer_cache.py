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
from sqlalchemy import Engine, select
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
