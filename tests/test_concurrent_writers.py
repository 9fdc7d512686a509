"""Several writer processes against one database: one conversation per user session."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from sqlalchemy import Engine, text

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
