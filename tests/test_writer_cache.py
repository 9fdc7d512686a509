"""The conversation states a writer keeps between batches change no stored row.

Each test writes the traffic of tests/test_writer_reference.py in a way that leaves a
writer's states stale, evicted or planned in a transaction that then failed, and compares
the stored rows with the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.runtime import build_writer
from chatmw.store.derive import ConversationCache
from tests.test_writer_reference import check_reference, traffic


def test_writers_taking_turns_store_reference_rows(engine: Engine) -> None:
    # Each writer's states go stale whenever the other one writes the same conversations.
    writers = [build_writer(Settings(sentiment=False), engine) for _ in range(2)]
    for index, batch in enumerate(traffic()):
        writers[index % 3 == 0].write(batch)
    assert len(writers[0].conversations) and len(writers[1].conversations)
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
    # then written again; the states planned in the failed transaction must not be used.
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
        from sqlalchemy import select

        from chatmw.store import models

        table = models.Conversation
        rows = {row[0]: tuple(row[1:]) for row in connection.execute(select(
            table.id, table.channel, table.external_id, table.started_at_ms,
            table.last_message_at_ms, table.message_count, table.user_message_count,
            table.first_response_ms, table.first_response_role))}
    states = writer.conversations._states
    assert states
    for conversation_id, state in states.items():
        assert state[:8] == rows[conversation_id]
