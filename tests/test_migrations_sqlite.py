"""The SQLite copy of the messages table (migration 0018_ingest) keeps its statistics."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from chatmw.store.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_WAL_CHECKPOINT_PAGES,
    make_engine,
    upgrade,
)


def _statistics(engine, table: str) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [
            (row[0], row[1])
            for row in connection.execute(
                text("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = :table ORDER BY idx"),
                {"table": table},
            )
        ]


def _store_at_0017(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'chatmw.db'}")
    upgrade(engine, "0017_cohort_rollups")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO contacts (id, channel, external_id, first_seen_ms, last_seen_ms)"
                " VALUES (1, 'web', 'u1', 0, 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO conversations (id, channel, external_id, contact_id, started_at_ms,"
                " last_message_at_ms, message_count, user_message_count, handed_off)"
                " VALUES (1, 'web', 'c1', 1, 0, 0, 0, 0, false)"
            )
        )
        for number in range(50):
            connection.execute(
                text(
                    "INSERT INTO messages (key, conversation_id, contact_id, channel, role,"
                    " kind, occurred_at_ms, is_first_response)"
                    " VALUES (:key, 1, 1, 'web', 'user', 'message', :at, false)"
                ),
                {"key": f"k{number}", "at": number * 1000},
            )
    return engine


def test_analysed_messages_keep_statistics(tmp_path: Path) -> None:
    engine = _store_at_0017(tmp_path)
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    before = _statistics(engine, "messages")
    assert any(index == "ix_messages_occurred" for index, _ in before)
    upgrade(engine)
    with engine.connect() as connection:
        # The table was copied without its foreign keys.
        assert connection.exec_driver_sql("PRAGMA foreign_key_list(messages)").all() == []
    after = _statistics(engine, "messages")
    assert {index for index, _ in after} == {index for index, _ in before}
    engine.dispose()


def test_unanalysed_messages_stay_unanalysed(tmp_path: Path) -> None:
    engine = _store_at_0017(tmp_path)
    upgrade(engine)
    with engine.connect() as connection:
        has_table = connection.execute(
            text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
        ).first()
    # The migrations analyse only rollup tables on their own, never messages.
    assert has_table is None or _statistics(engine, "messages") == []
    engine.dispose()


def test_file_connection_pragmas(tmp_path: Path) -> None:
    # Each connection to a file store gets WAL, a normal sync, the checkpoint limit, the busy
    # timeout and foreign keys.
    engine = make_engine(f"sqlite:///{tmp_path / 'pragmas.db'}")
    with engine.connect() as connection:
        def pragma(name: str) -> object:
            return connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("wal_autocheckpoint") == SQLITE_WAL_CHECKPOINT_PAGES
        assert pragma("busy_timeout") == SQLITE_BUSY_TIMEOUT_MS
        assert pragma("foreign_keys") == 1
    engine.dispose()
