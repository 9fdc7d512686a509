"""The batch writer on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.store import models
from chatmw.store.writer import Writer, WriterSettings

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def message(key: str, role: str, seconds: float, user: str = "u1", **fields) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=seconds), key=key,
                      role=role, user_id=user, text=key, **fields)


def test_same_batch_twice_stored_once(engine: Engine) -> None:
    writer = Writer(engine)
    batch = [message("m1", "user", 0), message("m2", "bot", 2)]
    writer.write(batch)
    writer.write(batch)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(models.Message)) == 2
        assert session.scalar(select(func.count()).select_from(models.Conversation)) == 1
        conversation = session.scalars(select(models.Conversation)).one()
    assert conversation.message_count == 2
    assert conversation.first_response_ms == 2000.0


def test_silence_starts_new_conversation(engine: Engine) -> None:
    writer = Writer(engine, WriterSettings(session_gap_ms=30 * 60_000))
    writer.write([message("a", "user", 0), message("b", "bot", 1)])
    writer.write([message("c", "user", 29 * 60)])
    writer.write([message("d", "user", 29 * 60 + 31 * 60)])
    with Session(engine) as session:
        counts = session.execute(
            select(models.Conversation.id, models.Conversation.message_count)
            .order_by(models.Conversation.started_at_ms)
        ).all()
    assert [count for _, count in counts] == [3, 1]


def test_late_message_joins_covering(engine: Engine) -> None:
    # Three conversations of u1 with a 30-minute gap: 09:00-09:10, 09:50-10:00 and
    # 12:00-12:10. A message that comes later but happened earlier joins the latest
    # conversation whose time, widened by the gap, covers it, and starts a conversation of
    # its own when none does.
    writer = Writer(engine, WriterSettings(session_gap_ms=30 * 60_000))
    writer.write([message("a1", "user", 0), message("a2", "bot", 10 * 60)])
    writer.write([message("b1", "user", 50 * 60), message("b2", "bot", 60 * 60)])
    writer.write([message("c1", "user", 180 * 60), message("c2", "bot", 190 * 60)])
    # Another contact's conversation covers the same times, and must not take them.
    writer.write([message("other", "user", 120 * 60, user="u2")])
    writer.write([message("late-5", "user", 5 * 60), message("late-30", "user", 30 * 60),
                  message("late-120", "user", 120 * 60),
                  message("late-160", "user", 160 * 60)])

    with Session(engine) as session:
        rows = session.execute(select(models.Message.key, models.Message.conversation_id)).all()
    conversation_of = dict(rows)
    assert conversation_of["late-5"] == conversation_of["a1"]
    assert conversation_of["late-30"] == conversation_of["b1"]  # a1's covers it too
    assert conversation_of["late-160"] == conversation_of["c1"]
    assert conversation_of["late-120"] not in {
        conversation_of[key] for key in ("a1", "b1", "c1", "other")}
    assert len(set(conversation_of.values())) == 5


def test_reply_time_from_first_message_of_run(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write([message("u1", "user", 0), message("u2", "user", 5), message("a1", "agent", 12),
                  message("u3", "user", 20), message("b1", "bot", 21)])
    with Session(engine) as session:
        rows = dict(session.execute(select(models.Message.key, models.Message.response_ms)).all())
    assert rows["a1"] == 12_000.0
    assert rows["b1"] == 1_000.0
    assert rows["u2"] is None


def test_out_of_order_batches_match_ordered(engine: Engine) -> None:
    writer = Writer(engine)
    conversation = {"conversation_id": "c-1"}
    writer.write([message("b1", "bot", 30, **conversation)])
    writer.write([message("u1", "user", 10, **conversation)])
    with Session(engine) as session:
        stored = session.scalars(select(models.Conversation)).one()
        bot_response = session.scalar(select(models.Message.response_ms).where(models.Message.key == "b1"))
    assert stored.first_response_ms == 20_000.0
    assert stored.first_response_role == "bot"
    assert bot_response == 20_000.0


def test_status_never_goes_backwards(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write([message("m1", "user", 0), message("out", "bot", 1, platform_message_id="wamid.1")])
    for status, seconds in (("read", 9), ("delivered", 5), ("sent", 3)):
        writer.write([ev.Status(channel="web", occurred_at=T0 + timedelta(seconds=seconds),
                                platform_message_id="wamid.1", status=status)])
    with Session(engine) as session:
        stored = session.scalars(select(models.Message).where(models.Message.key == "out")).one()
        times = dict(session.execute(
            select(models.MessageStatus.status, models.MessageStatus.occurred_at_ms)).all())
    assert stored.status == "read"
    assert times["sent"] == ev.to_ms(T0 + timedelta(seconds=3))
    assert len(times) == 3


def test_touch_before_message_links_conversation(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write([ev.Touch(channel="web", occurred_at=T0 - timedelta(seconds=30), key="t1",
                           user_id="u1", source="newsletter", campaign="spring")])
    writer.write([message("m1", "user", 0)])
    with Session(engine) as session:
        conversation = session.scalars(select(models.Conversation)).one()
        touch = session.scalars(select(models.Touch)).one()
        contact = session.scalars(select(models.Contact)).one()
    assert touch.conversation_id == conversation.id
    assert conversation.first_touch_id == touch.id
    assert contact.first_touch_id == touch.id


def _status_enricher(item: ev.Message) -> dict[str, object]:
    return {"status": "read"} if item.role == "bot" else {}


def _unknown_column_enricher(item: ev.Message) -> dict[str, object]:
    return {"mood": "fine"}


def test_enricher_sets_message_columns(engine: Engine) -> None:
    writer = Writer(engine, enrichers=[_status_enricher])
    writer.write([message("m1", "user", 0), message("m2", "bot", 2)])
    with Session(engine) as session:
        statuses = dict(session.execute(select(models.Message.key, models.Message.status)).all())
    assert statuses == {"m1": None, "m2": "read"}


def test_enricher_unknown_column_rejected(engine: Engine) -> None:
    writer = Writer(engine, enrichers=[_unknown_column_enricher])
    with pytest.raises(ValueError, match="'mood'"):
        writer.write([message("m1", "user", 0)])
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(models.Message)) == 0


def test_update_without_conversation_adds_no_contact(engine: Engine) -> None:
    # An update of a user who has no conversation changes nothing, before or after the
    # user's first message in the same batch: the contact is first seen at that message.
    update = ev.ConversationUpdate(channel="web", occurred_at=T0, user_id="u9", resolved=True)
    writer = Writer(engine)

    writer.write([update])
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(models.Contact)) == 0
        assert session.scalar(select(func.count()).select_from(models.Conversation)) == 0

    writer.write([update, message("m1", "user", 60, user="u9"), update])
    with Session(engine) as session:
        contact = session.scalars(select(models.Contact)).one()
        conversation = session.scalars(select(models.Conversation)).one()
    assert contact.external_id == "u9"
    assert contact.first_seen_ms == ev.to_ms(T0 + timedelta(seconds=60))
    # The update after the message names no time later than the conversation's start, so
    # it finds no conversation that started at or before it.
    assert conversation.resolved is not True
