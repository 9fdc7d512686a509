"""Several writers against one database: sessions, row locks and deadlocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.store.engine import make_engine
from chatmw.store.writer import Writer

STEPS = 5
USERS = 10
PROCESSES = ("first", "second", "third")

WRITER_SCRIPT = textwrap.dedent("""
    import sys
    import time
    from datetime import UTC, datetime, timedelta

    from chatmw import events as ev
    from chatmw.store.engine import make_engine
    from chatmw.store.writer import Writer

    class SlowCommitWriter(Writer):
        # Holds each transaction open after its writes, so that concurrent writers meet
        # sessions that another process created but has not committed yet.
        def write_in(self, session, batch):
            super().write_in(session, batch)
            time.sleep(0.3)

    url, name, offset_ms, begin_at, steps, users = sys.argv[1:7]
    writer = SlowCommitWriter(make_engine(url))
    # Each process starts its messages a few milliseconds apart, so each would name a new
    # session differently: only the contact lock keeps them from starting one each.
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(milliseconds=int(offset_ms))
    time.sleep(max(0.0, float(begin_at) - time.time()))
    for step in range(int(steps)):
        writer.write([
            ev.Message(channel="web", occurred_at=start + timedelta(minutes=31 * step),
                       role="user", key=f"{name}-{user}-{step}", user_id=f"user-{user}",
                       text="hi")
            for user in range(int(users))
        ])
""")


def test_writer_processes_share_sessions(database_url: str, engine: Engine) -> None:
    begin_at = str(time.time() + 3)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, database_url, name, str(offset), begin_at,
             str(STEPS), str(USERS)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for offset, name in enumerate(PROCESSES)
    ]
    outputs = [process.communicate(timeout=120)[0].decode() for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output

    with engine.connect() as connection:
        per_user = connection.execute(text(
            "SELECT contacts.external_id, COUNT(DISTINCT conversations.id), "
            "SUM(conversations.message_count) FROM conversations "
            "JOIN contacts ON contacts.id = conversations.contact_id "
            "GROUP BY contacts.external_id")).all()
        messages = connection.execute(text("SELECT COUNT(*) FROM messages")).scalar_one()
    assert messages == len(PROCESSES) * STEPS * USERS
    assert len(per_user) == USERS
    # Steps are 31 minutes apart, so each starts a session holding every process's message.
    for user, conversations, count in per_user:
        assert conversations == STEPS, user
        assert count == len(PROCESSES) * STEPS, user


ROUNDS = 6
SHARED_USERS = 40


def _round_batch(name: str, step: int, users: Sequence[int], named: int) -> list[ev.Message]:
    # Each user gets a user message and a reply. Users whose number has the parity
    # ``named`` name their conversation, and the others leave it to sessions. The user
    # message's key is the same in both writers, so both write it, and the reply's key is
    # each writer's own.
    at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(minutes=step)
    batch = []
    for user in users:
        conversation = f"conversation-{user}" if user % 2 == named else None
        batch.append(ev.Message(
            channel="web", occurred_at=at, role="user", key=f"user-{user}-{step}",
            user_id=f"user-{user}", conversation_id=conversation, text="where is my order",
            attributes={"plan": "pro"}))
        batch.append(ev.Message(
            channel="web", occurred_at=at + timedelta(seconds=1), role="bot",
            key=f"{name}-reply-{user}-{step}", user_id=f"user-{user}",
            conversation_id=conversation, text="it ships today", intent="shipping"))
    return batch


class _HeldWriter(Writer):
    """Keeps each transaction open after its statements, so that two writers overlap."""

    def write_in(self, session: Session, batch: Sequence[ev.Event]) -> None:
        super().write_in(session, batch)
        time.sleep(0.05)


def test_threaded_writers_overlapping_users(database_url: str, engine: Engine,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # Both writers write every user in every round, one in ascending and one in descending
    # order, at the same time. A user's conversation is named in one writer's batches and
    # sessionised in the other's, so each writer reaches each contact by another statement.
    orders = {"ascending": list(range(SHARED_USERS)),
              "descending": list(reversed(range(SHARED_USERS)))}
    parities = {"ascending": 0, "descending": 1}
    barrier = threading.Barrier(len(orders))
    errors: list[BaseException] = []

    def run(name: str) -> None:
        writer = _HeldWriter(make_engine(database_url))
        try:
            for step in range(ROUNDS):
                barrier.wait(timeout=60)
                writer.write(_round_batch(name, step, orders[name], parities[name]))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)
            barrier.abort()
        finally:
            writer.engine.dispose()

    threads = [threading.Thread(target=run, args=(name,)) for name in orders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    # The lock order alone avoids deadlocks here: no write was rolled back and retried.
    assert not [record for record in caplog.records if "rolled back" in record.getMessage()]

    with engine.connect() as connection:
        messages = connection.execute(text("SELECT COUNT(*) FROM messages")).scalar_one()
        keys = connection.execute(text("SELECT COUNT(DISTINCT key) FROM messages")).scalar_one()
        conversations = connection.execute(text(
            "SELECT c.id, c.message_count, c.user_message_count, c.last_message_at_ms, "
            "COUNT(m.id), SUM(CASE WHEN m.role = 'user' THEN 1 ELSE 0 END), "
            "MAX(m.occurred_at_ms) FROM conversations AS c "
            "JOIN messages AS m ON m.conversation_id = c.id "
            "GROUP BY c.id, c.message_count, c.user_message_count, c.last_message_at_ms"
        )).all()
        contacts = connection.execute(text("SELECT COUNT(*) FROM contacts")).scalar_one()
    # One user message per user and round, and one reply per writer, user and round.
    assert messages == SHARED_USERS * ROUNDS * 3
    assert keys == messages
    assert contacts == SHARED_USERS
    # Rounds are a minute apart, within the session gap. A message without conversation id
    # joins the user's latest conversation, which may be the named one, so each user has
    # the named conversation and at most one session.
    assert SHARED_USERS <= len(conversations) <= 2 * SHARED_USERS
    for row in conversations:
        assert row[1] == row[4], row
        assert row[2] == row[5], row
        assert row[3] == row[6], row


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_deadlocked_batch_written_again(database_url: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    # Another transaction locks the second contact, the writer locks the first and waits
    # for the second, then the other transaction requests the first. PostgreSQL ends the
    # writer's transaction, whose deadlock check runs first (deadlock_timeout 1 s against
    # the other session's 30 s), and the writer writes the batch again once it can.
    engine = make_engine(database_url)
    writer = Writer(engine)
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    writer.write([ev.Message(channel="web", occurred_at=start, role="user", key=f"first-{user}",
                             user_id=f"user-{user}", text="hi") for user in ("a", "b")])
    with engine.connect() as connection:
        ids = {external: contact_id for external, contact_id in connection.execute(text(
            "SELECT external_id, id FROM contacts"))}
    retried: list[BaseException] = []

    def write_second() -> None:
        try:
            writer.write([ev.Message(channel="web", occurred_at=start + timedelta(minutes=1),
                                     role="user", key=f"second-{user}", user_id=f"user-{user}",
                                     text="hello again") for user in ("a", "b")])
        except BaseException as error:  # reported by the assertion below
            retried.append(error)

    other = make_engine(database_url)
    with other.connect() as connection:
        connection.execute(text("SET deadlock_timeout = '30s'"))
        connection.execute(text("SELECT id FROM contacts WHERE id = :id FOR UPDATE"),
                           {"id": ids["user-b"]})
        thread = threading.Thread(target=write_second)
        thread.start()
        _wait_for_lock_wait(connection)
        connection.execute(text("SELECT id FROM contacts WHERE id = :id FOR UPDATE"),
                           {"id": ids["user-a"]})
        connection.commit()
    thread.join(timeout=60)
    other.dispose()
    assert not retried, retried
    rolled_back = [record.getMessage() for record in caplog.records
                   if "rolled back" in record.getMessage()]
    assert len(rolled_back) == 1
    assert "SQLSTATE 40P01" in rolled_back[0]

    with engine.connect() as connection:
        keys = connection.execute(text("SELECT key FROM messages ORDER BY key")).scalars().all()
    assert keys == ["first-a", "first-b", "second-a", "second-b"]
    engine.dispose()


def _wait_for_lock_wait(connection: Connection) -> None:
    # Returns once another session of the database waits for a row lock.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = connection.execute(text(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalar_one()
        if waiting:
            return
        time.sleep(0.05)
    raise TimeoutError("the writer did not wait for the locked contact within 30 s")
