"""Late messages written in one batch and one by one reach the same conversations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.recorder import is_retryable
from chatmw.store import identity, models
from chatmw.store.writer import Writer, WriterSettings

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
GAP_MINUTES = 30


def message(key: str, minutes: float, user: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0 + timedelta(minutes=minutes), key=key,
                      role="user", user_id=user, text=key)


def conversation_of(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.execute(select(models.Message.key, models.Message.conversation_id)).all()
    return dict(rows)


def write_history(writer: Writer, user: str) -> None:
    # An earlier conversation at 09:00-09:10 and the latest one at 14:00.
    writer.write([message(f"{user}-a0", 0, user), message(f"{user}-a10", 10, user)])
    writer.write([message(f"{user}-c300", 300, user)])


def test_late_batch_matches_one_by_one(engine: Engine) -> None:
    # Late messages at 35 and 60 minutes: 35 is within the gap of the earlier
    # conversation's last message (10), and 60 within the gap of 35. The ones at 120 and
    # 121 are covered by no stored conversation: 120 starts one, and 121 joins it.
    writer = Writer(engine, WriterSettings(session_gap_ms=GAP_MINUTES * 60_000))
    late_minutes = [35, 60, 120, 121]
    write_history(writer, "batch")
    write_history(writer, "single")
    writer.write([message(f"batch-{minute}", minute, "batch") for minute in late_minutes])
    for minute in late_minutes:
        writer.write([message(f"single-{minute}", minute, "single")])

    stored = conversation_of(engine)
    for user in ("single", "batch"):
        earlier = stored[f"{user}-a0"]
        assert stored[f"{user}-35"] == earlier, user
        assert stored[f"{user}-60"] == earlier, user
        assert stored[f"{user}-120"] == stored[f"{user}-121"], user
        assert stored[f"{user}-120"] not in {earlier, stored[f"{user}-c300"]}, user
    with Session(engine) as session:
        rows = session.execute(
            select(models.Contact.external_id, models.Conversation.started_at_ms,
                   models.Conversation.last_message_at_ms, models.Conversation.message_count)
            .join(models.Conversation, models.Conversation.contact_id == models.Contact.id)
            .order_by(models.Contact.external_id, models.Conversation.started_at_ms)
        ).all()
    start_ms = int(T0.timestamp() * 1000)
    expected = [(0, 60, 4), (120, 121, 2), (300, 300, 1)]
    for user in ("batch", "single"):
        conversations = [(int((started - start_ms) / 60_000), int((last - start_ms) / 60_000),
                          count) for external, started, last, count in rows if external == user]
        assert conversations == expected, user


def test_lost_connection_at_lookup_retryable(engine: Engine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The server ends the writer's connection just before a late message's covering
    # conversation is read. The write fails as when the connection ends at any other
    # statement: with SQLAlchemy's OperationalError, which the recorder retries.
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL ends a connection on request (pg_terminate_backend)")
    writer = Writer(engine, WriterSettings(session_gap_ms=GAP_MINUTES * 60_000))
    write_history(writer, "u1")
    lookup = identity._covering_conversation
    ended: list[int] = []

    def end_connection_first(session: Session, *args: object) -> object:
        if not ended:
            pid = session.connection().connection.driver_connection.info.backend_pid
            with engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
            ended.append(pid)
        return lookup(session, *args)

    monkeypatch.setattr(identity, "_covering_conversation", end_connection_first)
    with pytest.raises(Exception) as raised:
        writer.write([message("u1-120", 120, "u1")])

    assert ended
    assert isinstance(raised.value, OperationalError)
    assert is_retryable(raised.value)
    # The pool hands out a working connection, and the batch written again is stored.
    writer.write([message("u1-120", 120, "u1")])
    stored = conversation_of(engine)
    assert stored["u1-120"] not in {stored["u1-a0"], stored["u1-c300"]}


def test_lookup_error_is_sqlalchemy_error(engine: Engine) -> None:
    # The lookup runs on the driver's connection, and its errors come out as SQLAlchemy's,
    # as those of every other statement of the writer do.
    with Session(engine) as session, session.begin():
        session.execute(text("ALTER TABLE conversations RENAME TO conversations_moved"))
        with pytest.raises(DBAPIError) as raised:
            identity._covering_conversation(session, "web", 1, 0, 60_000)
        session.rollback()
    assert isinstance(raised.value.orig, engine.dialect.loaded_dbapi.Error)
    assert "conversations" in str(raised.value.orig)


def test_lookup_lock_timeout_retryable(engine: Engine) -> None:
    # A lookup that PostgreSQL cancels (here at its lock timeout) fails as retryable.
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite readers do not wait for a lock in WAL mode")
    with engine.connect() as holder:
        holder.execute(text("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"))
        with Session(engine) as session, session.begin():
            session.execute(text("SET LOCAL lock_timeout = '100ms'"))
            with pytest.raises(OperationalError) as raised:
                identity._covering_conversation(session, "web", 1, 0, 60_000)
            session.rollback()
        holder.rollback()
    assert is_retryable(raised.value)
