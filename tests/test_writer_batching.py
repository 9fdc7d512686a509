"""The writer stores the same rows whether events come in one batch or one at a time.

Within a batch the writer writes every message before every conversation update of a
stretch of the two, so these tests write the same traffic twice, on two channels: once as
a single batch, once as one batch per event, and compare what was stored.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.store.models import Conversation, ConversationAttribute, Message
from chatmw.store.writer import Writer

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def _traffic(channel: str, seed: int = 3) -> list[ev.Event]:
    """Exchanges of a bot: user message, reply, update; some end and are reopened."""
    rng = random.Random(seed)
    events: list[ev.Event] = []
    clock = T0
    for turn in range(120):
        number = rng.randrange(12)
        user = f"user{number}"
        # A source either names its conversations or leaves them to sessionisation.
        named = f"conv-{user}" if number % 2 else None
        clock += timedelta(seconds=rng.randint(1, 400))
        key = f"{channel}:{turn}"
        events.append(ev.Message(channel=channel, occurred_at=clock, key=key, role="user",
                                 user_id=user, text="hello", conversation_id=named,
                                 attributes={"plan": rng.choice(("free", "pro"))}))
        reply_at = clock + timedelta(milliseconds=rng.randint(50, 3000))
        events.append(ev.Message(channel=channel, occurred_at=reply_at, key=f"{key}:r",
                                 role="bot", user_id=user, text="hi", conversation_id=named,
                                 intent=rng.choice(("greeting", "refund"))))
        fields: dict[str, Any] = {"intent": rng.choice(("greeting", "refund", None))}
        roll = rng.random()
        if roll < 0.2:
            fields.update(ended=True, ended_reason="bot")
        elif roll < 0.3:
            fields["ended"] = False
        if rng.random() < 0.3:
            fields["resolved"] = rng.random() < 0.5
        if rng.random() < 0.2:
            fields["handed_off"] = True
        if rng.random() < 0.3:
            fields["step"] = rng.choice(("menu", "checkout"))
        if rng.random() < 0.3:
            fields["attributes"] = {"country": rng.choice(("fr", "de"))}
        events.append(ev.ConversationUpdate(channel=channel, occurred_at=reply_at, user_id=user,
                                            conversation_id=named, **fields))
    return events


def _stored(engine: Engine, channel: str) -> dict[str, Any]:
    conversation = Conversation
    with engine.connect() as connection:
        conversations = connection.execute(
            select(conversation.id, conversation.external_id, conversation.started_at_ms,
                   conversation.last_message_at_ms, conversation.ended_at_ms,
                   conversation.ended_reason, conversation.message_count,
                   conversation.user_message_count, conversation.first_response_ms,
                   conversation.resolved, conversation.handed_off, conversation.intent,
                   conversation.last_step)
            .where(conversation.channel == channel)).all()
        external = {row[0]: row[1] for row in conversations}
        attributes = connection.execute(
            select(ConversationAttribute.conversation_id, ConversationAttribute.name,
                   ConversationAttribute.value)
            .where(ConversationAttribute.conversation_id.in_(list(external)))).all()
        messages = connection.execute(
            select(Message.key, Message.conversation_id, Message.response_ms,
                   Message.is_first_response).where(Message.channel == channel)).all()
    return {
        "conversations": sorted(tuple(row[1:]) for row in conversations),
        "attributes": sorted((external[cid], name, value) for cid, name, value in attributes),
        "messages": sorted((key.split(":", 1)[1], external[cid], response, bool(first))
                           for key, cid, response, first in messages),
    }


def test_batch_equals_one_event_at_a_time(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write(_traffic("batched"))
    for event in _traffic("single"):
        writer.write([event])

    batched = _stored(engine, "batched")
    single = _stored(engine, "single")

    assert len(batched["conversations"]) > 12
    assert any(row[3] is not None for row in batched["conversations"])
    assert batched["conversations"] == single["conversations"]
    assert batched["attributes"] == single["attributes"]
    assert batched["messages"] == single["messages"]


def test_late_end_is_reopened_by_later_message(engine: Engine) -> None:
    writer = Writer(engine)
    later = ev.Message(channel="web", occurred_at=T0 + timedelta(minutes=5), key="m2",
                       role="user", user_id="u1", text="one more thing", conversation_id="c1")
    writer.write([
        ev.Message(channel="web", occurred_at=T0, key="m1", role="user", user_id="u1",
                   text="hi", conversation_id="c1"),
        later,
        ev.ConversationUpdate(channel="web", occurred_at=T0 + timedelta(minutes=1),
                              user_id="u1", conversation_id="c1", ended=True),
    ])

    with engine.connect() as connection:
        ended_at, reason = connection.execute(
            select(Conversation.ended_at_ms, Conversation.ended_reason)).one()
    assert ended_at is None
    assert reason == "ended"


def test_update_of_unnamed_conversation_finds_latest(engine: Engine) -> None:
    writer = Writer(engine)
    first = ev.Message(channel="web", occurred_at=T0, key="a", role="user", user_id="u1", text="x")
    second = ev.Message(channel="web", occurred_at=T0 + timedelta(hours=2), key="b", role="user",
                        user_id="u1", text="y")
    writer.write([
        first,
        ev.ConversationUpdate(channel="web", occurred_at=T0 + timedelta(minutes=1), user_id="u1",
                              resolved=True),
        second,
        ev.ConversationUpdate(channel="web", occurred_at=T0 + timedelta(hours=2, minutes=1),
                              user_id="u1", intent="refund"),
    ])

    with engine.connect() as connection:
        rows = connection.execute(
            select(Conversation.started_at_ms, Conversation.resolved, Conversation.intent)
            .order_by(Conversation.started_at_ms)).all()
    assert len(rows) == 2
    assert (bool(rows[0][1]), rows[0][2]) == (True, None)
    assert (rows[1][1], rows[1][2]) == (None, "refund")
