"""The writer analyses a young PostgreSQL store's tables each time its messages double."""

from __future__ import annotations

import logging
import pickle
import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from chatmw import events as ev
from chatmw.store.engine import make_engine
from chatmw.store.statistics import ANALYZED_TABLES, GrowthAnalyzer
from chatmw.store.writer import Writer

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _batch(start: int, size: int) -> list[ev.Message]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=i), key=f"m{i}",
                       role="user", user_id=f"u{i % 3}", text="hello")
            for i in range(start, start + size)]


def _reltuples(engine: Engine) -> dict[str, float]:
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:names) "
            "AND relkind = 'r'"), {"names": list(ANALYZED_TABLES)}).all()
    return {name: float(value) for name, value in rows}


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {name: connection.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()
                for name in ANALYZED_TABLES}


def _write(writer: Writer, batch: list[ev.Message]) -> int:
    # Writes ``batch`` and waits for the analysis it started in the background, if any.
    written = writer.write(batch)
    assert writer.statistics.wait(30)
    return written


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_runs_as_messages_double(engine: Engine) -> None:
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=30)
    seen: list[float] = []
    for batch in range(20):
        _write(writer, _batch(4 * batch, 4))
        estimates = _reltuples(engine)
        if estimates["messages"] in seen[-1:]:
            continue
        seen.append(estimates["messages"])
        if estimates["messages"] >= 0:
            # A run analyses the three tables as they are at that batch's end.
            assert estimates == {name: float(count) for name, count in _counts(engine).items()}
    # Never analysed (-1), then at 12 messages (the first batch end at or past 10), 24
    # (twice 12) and 48 (twice 24, past 30, the last).
    assert seen == [-1.0, 12.0, 24.0, 48.0]
    assert writer.statistics.runs == 3
    assert writer.statistics.done


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_skips_store_past_limit(engine: Engine) -> None:
    Writer(engine).write(_batch(0, 40))
    with engine.begin() as connection:
        connection.execute(text("ANALYZE messages"))
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=30)
    _write(writer, _batch(40, 100))
    assert writer.statistics.runs == 0
    assert writer.statistics.done
    assert _reltuples(engine)["messages"] == 40.0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_starts_from_stored_estimate(engine: Engine) -> None:
    # A writer started on a store analysed at 20 messages analyses again at 40.
    Writer(engine).write(_batch(0, 20))
    with engine.begin() as connection:
        connection.execute(text("ANALYZE messages"))
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
    _write(writer, _batch(20, 15))
    assert writer.statistics.runs == 0
    _write(writer, _batch(35, 5))
    assert writer.statistics.runs == 1
    assert _reltuples(engine)["messages"] == 40.0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_lock_timeout_keeps_batch(engine: Engine,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
    _write(writer, _batch(0, 8))
    blocker = engine.connect()
    try:
        blocker.execute(text("LOCK TABLE contacts IN SHARE UPDATE EXCLUSIVE MODE"))
        with caplog.at_level(logging.INFO, logger="chatmw"):
            assert _write(writer, _batch(8, 4)) == 4
    finally:
        blocker.rollback()
        blocker.close()
    assert "analysing the store's tables failed" in caplog.text
    assert "lock timeout" in caplog.text
    assert _counts(engine)["messages"] == 12
    # The locked table keeps its statistics. (The server stores a table's statistics as
    # soon as it analysed it, so the tables analysed before the locked one have theirs.)
    assert _reltuples(engine)["contacts"] == -1.0
    # The next run comes at twice the messages of the skipped one.
    _write(writer, _batch(12, 11))
    assert writer.statistics.runs == 0
    _write(writer, _batch(23, 1))
    assert writer.statistics.runs == 1
    assert _reltuples(engine) == {name: float(count) for name, count in _counts(engine).items()}
    assert _reltuples(engine)["messages"] == 24.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_analyzer_skips_sqlite(engine: Engine) -> None:
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=1, until=1_000)
    _write(writer, _batch(0, 10))
    assert writer.statistics.runs == 0
    assert writer.statistics.messages is None


def test_analyzer_copy_starts_over() -> None:
    analyzer = GrowthAnalyzer(first_at=10, until=50, background=False)
    analyzer.messages, analyzer.next_at, analyzer.runs, analyzer.done = 30.0, 60.0, 2, True
    copy = pickle.loads(pickle.dumps(analyzer))
    assert (copy.first_at, copy.until, copy.background) == (10, 50, False)
    assert copy.wait(0)
    assert (copy.messages, copy.next_at, copy.runs, copy.done) == (None, 10.0, 0, False)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_lost_connection_keeps_batch(database_url: str, engine: Engine,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # The server ends the analyzer's connection as it reads the stored messages' estimate:
    # the batch stays written, the failure is logged, and the next batch estimates again
    # (none, the table was never analysed) and counts from there.
    admin = make_engine(database_url)

    def end_backend(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "reltuples" in statement:
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"),
                              {"pid": cursor.connection.info.backend_pid})

    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
    event.listen(engine, "before_cursor_execute", end_backend)
    try:
        with caplog.at_level(logging.INFO, logger="chatmw"):
            assert _write(writer, _batch(0, 4)) == 4
    finally:
        event.remove(engine, "before_cursor_execute", end_backend)
        admin.dispose()
    assert "analysing the store's tables failed" in caplog.text
    assert "terminating connection" in caplog.text
    assert writer.statistics.messages is None
    assert _counts(engine)["messages"] == 4
    _write(writer, _batch(4, 9))
    assert writer.statistics.runs == 0
    _write(writer, _batch(13, 1))
    assert writer.statistics.runs == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_counts_rows_it_analysed(engine: Engine) -> None:
    # A table never analysed has no estimate, so a writer counts from its own messages.
    # Its first run, at 10 of its own, counts all 210, so the next comes at 420, not at 20.
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO messages (key, conversation_id, channel, role, kind, occurred_at_ms, "
            "is_first_response) SELECT 'old' || g, 1, 'web', 'user', 'message', g, false "
            "FROM generate_series(1, 200) AS g"))
    assert _reltuples(engine)["messages"] == -1.0
    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
    _write(writer, _batch(0, 10))
    assert writer.statistics.runs == 1
    assert _reltuples(engine)["messages"] == 210.0
    assert writer.statistics.next_at == 420.0
    for start in range(10, 200, 10):
        _write(writer, _batch(start, 10))
    assert writer.statistics.runs == 1
    _write(writer, _batch(200, 20))
    assert writer.statistics.runs == 2
    assert _reltuples(engine)["messages"] == 420.0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analyzer_logs_skipped_tables(engine: Engine,
                                      caplog: pytest.LogCaptureFixture) -> None:
    # A role that may write the tables but does not own them: the server skips each table
    # with a warning, which is logged, and no run is counted.
    role = f"chatmw_writer_{secrets.token_hex(4)}"
    database = engine.url.database
    with engine.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        connection.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN '
                                f'SCHEMA public TO "{role}"'))
        connection.execute(text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
        connection.execute(text(f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"'))
    limited = make_engine(engine.url.set(username=role).render_as_string(hide_password=False))
    try:
        writer = Writer(limited)
        writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
        with caplog.at_level(logging.INFO, logger="chatmw"):
            assert _write(writer, _batch(0, 12)) == 12
    finally:
        limited.dispose()
        with engine.begin() as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))
    assert writer.statistics.runs == 0
    assert "analysed messages" not in caplog.text
    assert "skipped some of them" in caplog.text
    assert '"messages"' in caplog.text
    assert _reltuples(engine)["messages"] == -1.0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analysis_runs_beside_the_writer(engine: Engine) -> None:
    # The ANALYZE is held until released: the write that started it returns meanwhile, the
    # next writes are stored and counted, and no second run starts while one is in flight.
    release = threading.Event()
    analyze_threads: list[str] = []

    def hold_analyze(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("ANALYZE"):
            analyze_threads.append(threading.current_thread().name)
            assert release.wait(30)

    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000)
    event.listen(engine, "before_cursor_execute", hold_analyze)
    try:
        assert writer.write(_batch(0, 12)) == 12
        assert not writer.statistics.wait(0.2)
        # 12 + 30 messages pass the next threshold (24) while the first run is held.
        assert writer.write(_batch(12, 30)) == 30
        assert _counts(engine)["messages"] == 42
        assert writer.statistics.runs == 0
        release.set()
        assert writer.statistics.wait(30)
    finally:
        release.set()
        event.remove(engine, "before_cursor_execute", hold_analyze)
    assert analyze_threads == ["chatmw-analyze"]
    assert writer.statistics.runs == 1
    # The run analysed the tables as they were when it read them: all 42 messages.
    assert _reltuples(engine)["messages"] == 42.0
    assert writer.statistics.next_at == 84.0
    _write(writer, _batch(42, 42))
    assert writer.statistics.runs == 2
    assert _reltuples(engine)["messages"] == 84.0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_analysis_in_the_writer_thread(engine: Engine) -> None:
    # Without ``background`` the write returns once the tables are analysed.
    names: list[str] = []

    def note_analyze(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("ANALYZE"):
            names.append(threading.current_thread().name)

    writer = Writer(engine)
    writer.statistics = GrowthAnalyzer(first_at=10, until=1_000, background=False)
    event.listen(engine, "before_cursor_execute", note_analyze)
    try:
        writer.write(_batch(0, 12))
    finally:
        event.remove(engine, "before_cursor_execute", note_analyze)
    assert names == [threading.current_thread().name]
    assert writer.statistics.runs == 1
    assert _reltuples(engine)["messages"] == 12.0
