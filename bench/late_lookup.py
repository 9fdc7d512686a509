"""CPU time of the writer's lookup of the conversation that covers a late message.

A fresh store gets 1,000 contacts with three conversations each, three hours apart (one
message each, written by the store writer with a 30-minute session gap). The script then
calls ``_covering_conversation`` of ``chatmw/store/identity.py`` 2,000 times in one open
``Session``, after 200 warm-up calls, for a time inside each contact's first conversation,
and reports the CPU time per call (``time.process_time``)::

    python -m bench.late_lookup --database sqlite
    python -m bench.late_lookup --database postgresql
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.common import fresh_sqlite_url, recreate_postgres_database
from chatmw import events as ev
from chatmw.store import identity, models
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.writer import Writer, WriterSettings

CONTACTS = 1000
CONVERSATIONS = 3
CALLS = 2000
WARMUP = 200
GAP_MS = 30 * 60_000
T0 = datetime(2024, 3, 1, tzinfo=UTC)


def measure(url: str) -> tuple[float, int]:
    """Return the CPU microseconds per lookup and how many lookups found a conversation."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        Writer(engine, WriterSettings(session_gap_ms=GAP_MS)).write([
            ev.Message(channel="web", occurred_at=T0 + timedelta(hours=3 * number),
                       key=f"k{contact}-{number}", role="user", user_id=f"u{contact}",
                       text="hello")
            for contact in range(CONTACTS) for number in range(CONVERSATIONS)])
        at_ms = int((T0 + timedelta(minutes=10)).timestamp() * 1000)
        with Session(engine) as session:
            contact_ids = list(session.scalars(select(models.Contact.id)
                                               .order_by(models.Contact.id)))
            calls = [contact_ids[index % len(contact_ids)] for index in range(WARMUP + CALLS)]
            for contact_id in calls[:WARMUP]:
                identity._covering_conversation(session, "web", contact_id, at_ms, GAP_MS)
            started = time.process_time()
            found = sum(
                identity._covering_conversation(session, "web", contact_id, at_ms, GAP_MS)
                is not None for contact_id in calls[WARMUP:])
            elapsed = time.process_time() - started
    finally:
        engine.dispose()
    return 1e6 * elapsed / CALLS, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    if args.database == "sqlite":
        url = fresh_sqlite_url("late_lookup")
    else:
        url = recreate_postgres_database("chatmw_bench_late_lookup")
    per_call, found = measure(url)
    print(f"{args.database}: {per_call:.1f} us per lookup, {found} of {CALLS} found")


if __name__ == "__main__":
    main()
