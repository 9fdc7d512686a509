"""The production writer stores the rows that the writer of commit e56bb98 stored.

That writer inserted rows through arrays, read through the ORM, loaded every conversation
of a contact to sessionise its messages and updated statuses and touch pointers row by
row. ``fixtures/writer_reference.json`` is what it stored for the traffic below, written
in uneven batches. The traffic has duplicate keys within and across batches, late and
out-of-order messages, and unnamed conversations sessionised by silence next to named
ones. It also has messages at the same millisecond, untimed kinds, conversation ends and
reopenings, statuses and touches. Ids are replaced by the natural keys of the rows they
point to, so the same reference serves SQLite and PostgreSQL.

To record the reference again, run this module as a script with a PostgreSQL URL.
"""

from __future__ import annotations

import json
import math
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.runtime import build_writer
from chatmw.store import identity, models
from chatmw.store import writer as writer_module
from chatmw.store.derive import UNTIMED_KINDS, MessageTiming, compute_timings

REFERENCE = Path(__file__).parent / "fixtures" / "writer_reference.json"
T0 = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
GAP = timedelta(minutes=30)
# Floats whose text or sign a careless encoding changes.
LATENCIES = (0.1, 1e-07, 123456.789, -0.0, 2.5e300, 7.0)


def traffic(seed: int = 11) -> list[list[ev.Event]]:
    """Return the events of the reference, cut into batches of 1 to 40 events."""
    rng = random.Random(seed)
    events: list[ev.Event] = []
    clock = T0
    sent: list[ev.Message] = []
    for serial in range(400):
        clock += timedelta(seconds=rng.choice((0, 1, 5, 40, 200, 1900, 4000)))
        events.extend(_events_at(rng, serial, clock, sent))
    batches: list[list[ev.Event]] = []
    start = 0
    while start < len(events):
        size = rng.randint(1, 40)
        batches.append(events[start:start + size])
        start += size
    return batches


def _events_at(rng: random.Random, serial: int, clock: datetime,
               sent: list[ev.Message]) -> list[ev.Event]:
    roll = rng.random()
    if roll < 0.06 and sent:
        # The same message again, as a retried delivery.
        return [rng.choice(sent)]
    channel = rng.choice(("web", "messenger"))
    user = f"user{rng.randrange(9)}"
    if roll < 0.1:
        return [ev.Touch(channel=channel, occurred_at=clock - timedelta(minutes=rng.randint(0, 50)),
                         key=f"touch{serial}", user_id=user, source=rng.choice(("ads", "mail")),
                         conversation_id=rng.choice((None, f"{user}-a")))]
    if roll < 0.2:
        return [ev.ConversationUpdate(
            channel=channel, occurred_at=clock, user_id=user,
            conversation_id=rng.choice((None, f"{user}-a", f"{user}-b")),
            ended=rng.choice((True, True, False, None)), ended_reason=rng.choice((None, "bot")),
            resolved=rng.choice((True, None)), intent=rng.choice((None, "refund")),
            attributes={"stage": rng.choice(("one", "two"))})]
    if roll < 0.25 and sent:
        outbound = [m for m in sent if m.platform_message_id]
        if outbound:
            target = rng.choice(outbound)
            return [ev.Status(channel=target.channel, occurred_at=clock,
                              platform_message_id=target.platform_message_id or "",
                              status=rng.choice(("sent", "delivered", "read", "failed")))]
    at = clock
    if rng.random() < 0.12:
        # A late message, from before the conversations already stored.
        at = clock - rng.choice((timedelta(minutes=5), GAP * 2, timedelta(hours=7)))
    conversation = rng.choice((None, None, f"{user}-a", f"{user}-b"))
    role = rng.choice(("user", "user", "bot", "agent"))
    kind = rng.choice(("message",) * 8 + tuple(sorted(UNTIMED_KINDS)))
    messages = [ev.Message(
        channel=channel, occurred_at=at, key=f"m{serial}", role=role, user_id=user,
        text=rng.choice(("hello", "my order is late 😀", "write to ana@example.org", None)),
        conversation_id=conversation, kind=kind,
        platform_message_id=f"p{serial}" if role != "user" and rng.random() < 0.5 else None,
        latency_ms=rng.choice(LATENCIES) if role != "user" else None,
        intent=rng.choice((None, "greeting", "refund")),
        attributes={"plan": "pro"} if rng.random() < 0.2 else {},
        meta={"source": "é", "n": serial} if rng.random() < 0.3 else {})]
    if rng.random() < 0.2:
        # A reply at the same millisecond: ties are broken by insertion order.
        messages.append(ev.Message(channel=channel, occurred_at=at, key=f"m{serial}:r",
                                   role="bot", user_id=user, text="ok",
                                   conversation_id=conversation))
    sent.extend(messages)
    return list(messages)


def _value(value: Any) -> Any:
    # Floats as their repr, so that -0.0 and the last digit count.
    if isinstance(value, float):
        return repr(value)
    return value


def stored(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Return every row the writer stores, with ids replaced by natural keys."""
    tables = {
        "contacts": models.Contact.__table__,
        "conversations": models.Conversation.__table__,
        "messages": models.Message.__table__,
        "message_statuses": models.MessageStatus.__table__,
        "touches": models.Touch.__table__,
        "conversation_attributes": models.ConversationAttribute.__table__,
    }
    with engine.connect() as connection:
        rows = {name: [dict(row._mapping) for row in connection.execute(select(table))]
                for name, table in tables.items()}
    contacts = {row["id"]: f"{row['channel']}/{row['external_id']}" for row in rows["contacts"]}
    conversations = {row["id"]: f"{row['channel']}/{row['external_id']}"
                     for row in rows["conversations"]}
    touches = {row["id"]: row["key"] for row in rows["touches"]}
    references = {"contact_id": contacts, "conversation_id": conversations,
                  "first_touch_id": touches, "last_touch_id": touches}
    result: dict[str, list[dict[str, Any]]] = {}
    for name, table_rows in rows.items():
        converted = []
        for row in table_rows:
            row.pop("id", None)
            converted.append({column: references[column].get(value)
                              if column in references and value is not None else _value(value)
                              for column, value in row.items()})
        result[name] = sorted(converted, key=lambda row: json.dumps(row, sort_keys=True))
    return result


def write_traffic(engine: Engine) -> None:
    writer = build_writer(Settings(sentiment=False), engine)
    for batch in traffic():
        writer.write(batch)


def test_writer_stores_reference_rows(engine: Engine) -> None:
    write_traffic(engine)
    check_reference(engine)


def test_fallback_refresh_stores_reference_rows(engine: Engine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # As if every insert differed from the plan: the messages go in with the planned
    # figures, and the conversations are then recomputed from the stored messages.
    def unplanned(*args: Any) -> bool:
        identity.insert_ignore_expected(*args)
        return False

    monkeypatch.setattr(writer_module, "insert_ignore_expected", unplanned)
    write_traffic(engine)
    check_reference(engine)


def test_insert_reports_unexpected_rows(engine: Engine) -> None:
    table = models.Message.__table__
    with Session(engine) as session, session.begin():
        ids = identity.resolve_named_conversations(session, {("web", "expected"): (0, None)})
        rows = [{"key": key, "conversation_id": ids[("web", "expected")], "channel": "web",
                 "role": "user", "kind": "message", "occurred_at_ms": 1000,
                 "is_first_response": False}
                for key in ("k1", "k2", "k3")]
        assert identity.insert_ignore_expected(session, table, rows[:1], ["key"], ["k1"])
        # k1 is stored now, as if another writer had inserted it after the plan was made.
        assert not identity.insert_ignore_expected(session, table, rows[:2], ["key"], ["k1", "k2"])
        assert not identity.insert_ignore_expected(session, table, rows[2:], ["key"], [])
        assert identity.insert_ignore_expected(session, table, rows, ["key"], [])


def _first_message_ms(channel: str, user: str) -> int:
    return min(ev.to_ms(event.occurred_at) for batch in traffic() for event in batch
               if isinstance(event, ev.Message)
               and (event.channel, event.user_id) == (channel, user))


def check_reference(engine: Engine) -> None:
    expected = json.loads(REFERENCE.read_text(encoding="utf-8"))
    # The reference writer created the contact of a conversation update that found no
    # conversation. messenger/user3's first event is such an update, so its contact got the
    # update's time as first seen. Now the update creates no contact, and the contact's
    # first seen time is that of its first message.
    for row in expected["contacts"]:
        if (row["channel"], row["external_id"]) == ("messenger", "user3"):
            assert row["first_seen_ms"] < _first_message_ms("messenger", "user3")
            row["first_seen_ms"] = _first_message_ms("messenger", "user3")
    if engine.dialect.name == "sqlite":
        # The reference comes from PostgreSQL. SQLite writes a REAL that has no fraction
        # as an integer on disk, so -0.0 reads back as 0.0.
        for row in expected["messages"]:
            if row["latency_ms"] == "-0.0":
                row["latency_ms"] = "0.0"
    actual = stored(engine)
    for name in expected:
        assert len(actual[name]) == len(expected[name]), name
        for actual_row, expected_row in zip(actual[name], expected[name], strict=True):
            assert actual_row == expected_row, name


def test_derived_figures_match_recomputation(engine: Engine) -> None:
    write_traffic(engine)
    with engine.connect() as connection:
        messages = connection.execute(
            select(models.Message.conversation_id, models.Message.id, models.Message.role,
                   models.Message.kind, models.Message.occurred_at_ms, models.Message.response_ms,
                   models.Message.is_first_response)
            .order_by(models.Message.conversation_id, models.Message.occurred_at_ms,
                      models.Message.id)).all()
        conversations = {row.id: row for row in connection.execute(select(models.Conversation))}
    by_conversation: dict[int, list[Any]] = {}
    for row in messages:
        by_conversation.setdefault(row.conversation_id, []).append(row)
    assert by_conversation
    for conversation_id, rows in by_conversation.items():
        timings = [MessageTiming(row.id, row.role, row.kind, row.occurred_at_ms) for row in rows]
        first_ms, first_role = compute_timings(timings)
        for row, timing in zip(rows, timings, strict=True):
            assert row.response_ms == timing.response_ms
            assert row.is_first_response == timing.is_first_response
        counted = [row for row in rows if row.kind not in UNTIMED_KINDS]
        conversation = conversations[conversation_id]
        assert conversation.started_at_ms == min(row.occurred_at_ms for row in rows)
        assert conversation.last_message_at_ms == max(row.occurred_at_ms for row in rows)
        assert conversation.message_count == len(counted)
        assert conversation.user_message_count == sum(row.role == "user" for row in counted)
        assert conversation.first_response_ms == first_ms
        assert conversation.first_response_role == first_role


def test_reference_traffic_is_tricky() -> None:
    events = [event for batch in traffic() for event in batch]
    messages = [event for event in events if isinstance(event, ev.Message)]
    keys = [message.key for message in messages]
    assert len(keys) - len(set(keys)) >= 10
    assert sum(message.conversation_id is None for message in messages) >= 100
    assert sum(message.kind in UNTIMED_KINDS for message in messages) >= 20
    late = [later for earlier, later in zip(messages, messages[1:], strict=False)
            if later.occurred_at < earlier.occurred_at]
    assert len(late) >= 20
    assert sum(isinstance(event, ev.ConversationUpdate) and event.ended is True
               for event in events) >= 15
    assert any(isinstance(event, ev.Status) for event in events)
    assert any(isinstance(event, ev.Touch) for event in events)
    assert any(math.copysign(1.0, message.latency_ms) < 0 for message in messages
               if message.latency_ms == 0.0)


if __name__ == "__main__":
    from chatmw.store.engine import make_engine, upgrade

    target = make_engine(sys.argv[1])
    upgrade(target)
    write_traffic(target)
    tables = stored(target)
    # One row per line keeps the file small and its diffs readable.
    lines = ",\n".join(
        f"{json.dumps(name)}: [\n" + ",\n".join(json.dumps(row, ensure_ascii=False, sort_keys=True)
                                                 for row in rows) + "\n]"
        for name, rows in tables.items())
    REFERENCE.write_text("{\n" + lines + "\n}\n", encoding="utf-8")
