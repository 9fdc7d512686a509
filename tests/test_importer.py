"""Transcript import (``chatmw import``) on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from chatmw import cli_import
from chatmw import events as ev
from chatmw.cli import app
from chatmw.config import Settings
from chatmw.importers import ImportAborted, Skipped, TextFile, open_source, transcript
from chatmw.importers import run_import as run_import_api
from chatmw.importers.source import Row, read_csv
from chatmw.importers.transcript import message_key
from chatmw.importers.twcs import _resolve_roots, parse_created_at
from chatmw.importers.writers import (
    ProcessBatchWriter,
    build_import_writer,
    pseudonymise_messages,
)
from chatmw.runtime import Runtime
from chatmw.security.privacy import Privacy, PrivacySettings
from chatmw.security.redaction import redact_text
from chatmw.security.secret import Secret
from chatmw.sentiment import sentiment_enricher
from chatmw.store import models
from chatmw.store.engine import make_engine
from chatmw.store.writer import Writer

FIXTURES = Path(__file__).parent / "fixtures" / "import"


def run_import(database_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["import", *args, "--db", database_url])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ms(moment: str) -> int:
    return int(datetime.fromisoformat(moment).timestamp() * 1000)


def snapshot(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of the tables an import writes, sorted, for before/after comparisons."""
    tables = ("contacts", "conversations", "conversation_attributes", "messages")
    with engine.connect() as connection:
        return {name: sorted(map(tuple, connection.execute(text(f"SELECT * FROM {name}"))))
                for name in tables}


def conversations(engine: Engine) -> dict[str, dict]:
    """Conversations by external id, with their messages, contact and attributes."""
    result: dict[str, dict] = {}
    with engine.connect() as connection:
        for row in connection.execute(select(models.Conversation.__table__)).mappings():
            result[row["external_id"]] = {**row, "messages": [], "attributes": {}}
        by_id = {item["id"]: item for item in result.values()}
        contacts = dict(connection.execute(
            select(models.Contact.id, models.Contact.external_id)).all())
        for row in connection.execute(select(models.ConversationAttribute.__table__)).mappings():
            by_id[row["conversation_id"]]["attributes"][row["name"]] = row["value"]
        messages = connection.execute(
            select(models.Message.__table__).order_by(models.Message.occurred_at_ms)).mappings()
        for row in messages:
            entry = {**row, "contact": contacts.get(row["contact_id"])}
            by_id[row["conversation_id"]]["messages"].append(entry)
        for item in result.values():
            item["contact"] = contacts.get(item["contact_id"])
    return result


def count(engine: Engine, model: type) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(model)).scalar_one()


# CSV


def test_csv_stores_conversations_and_attributes(database_url: str, engine: Engine) -> None:
    status, stdout, stderr = run_import(database_url, str(FIXTURES / "transcript.csv"))

    assert status == 0, stderr
    assert "8 rows read: 8 imported, 0 duplicates, 0 skipped; 3 conversations" in stdout
    stored = conversations(engine)
    assert sorted(stored) == ["c-100", "c-200", "c-300"]
    acme = stored["c-100"]
    assert acme["channel"] == "web"
    assert acme["attributes"] == {"company": "Acme", "plan": "pro"}
    assert [m["role"] for m in acme["messages"]] == ["user", "user", "agent", "user"]
    assert [m["key"] for m in acme["messages"]][0] == "import:web:c-100:m1"
    assert acme["contact"] == "alice"
    assert {m["contact"] for m in acme["messages"]} == {"alice"}
    assert acme["first_response_ms"] == 120_000.0
    assert acme["first_response_role"] == "agent"
    assert acme["started_at_ms"] == ms("2024-03-01T09:00:00+00:00")
    # The last row's 10:03:00.500+01:00 is 09:03:00.500 UTC.
    assert acme["last_message_at_ms"] == ms("2024-03-01T09:03:00.500+00:00")


def test_csv_bot_greeting_uses_conversation_user(database_url: str, engine: Engine) -> None:
    run_import(database_url, str(FIXTURES / "transcript.csv"))

    globex = conversations(engine)["c-200"]
    assert [m["role"] for m in globex["messages"]] == ["bot", "user", "bot"]
    assert [m["contact"] for m in globex["messages"]] == ["bob", "bob", "bob"]
    assert globex["contact"] == "bob"
    assert globex["attributes"] == {"company": "Globex"}
    assert globex["first_response_ms"] == 1250.0
    assert count(engine, models.Contact) == 3


def test_csv_default_channel_and_derived_key(database_url: str, engine: Engine) -> None:
    run_import(database_url, str(FIXTURES / "transcript.csv"), "--channel", "legacy")

    unanswered = conversations(engine)["c-300"]
    (message,) = unanswered["messages"]
    assert unanswered["channel"] == "legacy"
    assert message["key"] == message_key("legacy", "c-300", None, ms("2024-03-01T11:00:00+00:00"),
                                         "user", "No answer here")
    assert message["key"].startswith("import:legacy:c-300:")
    assert unanswered["first_response_ms"] is None


def test_multiline_emoji_text_survives_exactly(database_url: str, engine: Engine) -> None:
    run_import(database_url, str(FIXTURES / "transcript.csv"))

    raw = (FIXTURES / "transcript.csv").read_bytes()
    with engine.connect() as connection:
        stored = dict(connection.execute(select(models.Message.key, models.Message.text)).all())
    second = stored["import:web:c-100:m2"]
    assert second.encode("utf-8") == "Second line follows\r\nnext line 👩‍👩‍👧 and café".encode()
    assert second.encode("utf-8") in raw
    assert stored["import:web:c-200:m2"] == "Line one\nline two\n\nline four 🎉"
    assert stored["import:web:c-100:m3"] == 'Sorry about that, "checking" now'
    assert not any(value.startswith("\ufeff") for value in stored.values())


def test_reimport_changes_nothing(database_url: str, engine: Engine) -> None:
    path = str(FIXTURES / "transcript.csv")
    run_import(database_url, path)
    before = snapshot(engine)

    status, stdout, _ = run_import(database_url, path)

    assert status == 0
    assert "8 rows read: 0 imported, 8 duplicates, 0 skipped" in stdout
    after = snapshot(engine)
    assert {name: len(rows) for name, rows in after.items()} == {
        name: len(rows) for name, rows in before.items()}
    assert after == before


def test_jsonl_stores_messages(database_url: str, engine: Engine) -> None:
    status, stdout, stderr = run_import(database_url, str(FIXTURES / "transcript.jsonl"))

    assert status == 0, stderr
    assert "4 rows read: 4 imported" in stdout
    stored = conversations(engine)
    first = stored["j-1"]
    assert first["channel"] == "import"
    assert first["attributes"] == {"company": "Initech", "vip": "true"}
    assert [m["key"] for m in first["messages"]] == ["import:import:j-1:1", "import:import:j-1:2"]
    assert [m["role"] for m in first["messages"]] == ["user", "bot"]
    assert [m["contact"] for m in first["messages"]] == ["dora", "dora"]
    assert first["messages"][0]["text"] == "Bonjour 👋\nJ'ai une question"
    assert first["first_response_ms"] == 45_000.0
    second = stored["j-2"]
    assert second["channel"] == "whatsapp"
    assert [m["contact"] for m in second["messages"]] == ["erik", "erik"]
    assert second["first_response_ms"] == 300_000.0


def test_jsonl_reimport_changes_nothing(database_url: str, engine: Engine) -> None:
    path = str(FIXTURES / "transcript.jsonl")
    run_import(database_url, path, "--format", "jsonl")
    before = snapshot(engine)

    status, stdout, _ = run_import(database_url, path)

    assert status == 0
    assert "0 imported, 4 duplicates" in stdout
    assert snapshot(engine) == before


def test_csv_and_jsonl_rows_agree(database_url: str, engine: Engine, tmp_path: Path) -> None:
    header, records = read_csv_fixture("transcript.csv")
    jsonl = tmp_path / "same.ndjson"
    jsonl.write_text("".join(json.dumps(dict(zip(header, row, strict=True))) + "\n"
                             for row in records), encoding="utf-8")
    run_import(database_url, str(FIXTURES / "transcript.csv"))
    before = snapshot(engine)

    status, stdout, _ = run_import(database_url, str(jsonl))

    assert status == 0
    assert "0 imported, 8 duplicates" in stdout
    assert snapshot(engine) == before


def read_csv_fixture(name: str) -> tuple[list[str], list[list[str]]]:
    with open(FIXTURES / name, newline="", encoding="utf-8-sig") as stream:
        rows = list(csv.reader(stream))
    return rows[0], rows[1:]


# Invalid rows and files


def test_bad_csv_rows_reported_and_skipped(database_url: str, engine: Engine) -> None:
    status, stdout, stderr = run_import(database_url, str(FIXTURES / "bad_rows.csv"))

    assert status == 3
    assert "8 rows read: 3 imported, 0 duplicates, 5 skipped" in stdout
    lines = stderr.splitlines()
    assert "line 4: skipped: invalid timestamp 'yesterday'" in lines[0]
    assert lines[1] == "line 5: skipped: unknown role 'robot': expected user, bot or agent"
    assert lines[2] == "line 6: skipped: empty conversation_id"
    assert lines[3].startswith("line 7: skipped: timestamp '2024-03-01T09:03:00' has no UTC offset")
    assert lines[4] == "line 10: skipped: the row has 4 fields but the header has 6"
    assert len(lines) == 5
    with engine.connect() as connection:
        keys = connection.execute(select(models.Message.key)).scalars().all()
    assert sorted(keys) == ["import:import:b-1:1", "import:import:b-1:6", "import:import:b-1:8"]


def test_bad_jsonl_rows_reported_and_skipped(database_url: str, engine: Engine) -> None:
    status, stdout, stderr = run_import(database_url, str(FIXTURES / "bad_rows.jsonl"))

    assert status == 3
    assert "6 rows read: 2 imported, 0 duplicates, 4 skipped" in stdout
    lines = stderr.splitlines()
    assert lines[0].startswith("line 2: skipped: invalid JSON: ")
    assert lines[1] == "line 4: skipped: expected a JSON object, got list"
    assert lines[2] == "line 5: skipped: missing column text"
    assert lines[3] == "line 6: skipped: column meta must be a string or a number, got dict"
    assert count(engine, models.Message) == 2


def test_errors_file_lists_every_skipped_row(database_url: str, tmp_path: Path) -> None:
    report = tmp_path / "errors.csv"

    status, _, stderr = run_import(database_url, str(FIXTURES / "bad_rows.csv"),
                                   "--errors", str(report), "--show-errors", "2")

    assert status == 3
    with open(report, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["line", "reason"]
    assert [row[0] for row in rows[1:]] == ["4", "5", "6", "7", "10"]
    assert len(stderr.splitlines()) == 3
    assert "3 more skipped rows not shown" in stderr


def test_naive_timestamps_named_zone(database_url: str, engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "naive.csv"
    path.write_text("conversation_id,timestamp,role,user_id,text\n"
                    "n-1,2024-07-01 09:00:00,user,u1,hello\n"
                    "n-1,2024-07-01T09:00:07Z,bot,,hi\n", encoding="utf-8")

    status, _, stderr = run_import(database_url, str(path), "--naive-timezone", "Europe/Paris")

    assert status == 0, stderr
    with engine.connect() as connection:
        times = connection.execute(
            select(models.Message.occurred_at_ms).order_by(models.Message.occurred_at_ms)
        ).scalars().all()
    paris_summer = timezone(timedelta(hours=2))
    assert times[0] == int(datetime(2024, 7, 1, 9, tzinfo=paris_summer).timestamp() * 1000)
    assert times[1] == ms("2024-07-01T09:00:07+00:00")


def test_missing_header_column_rejected(database_url: str, engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "no_role.csv"
    path.write_text("conversation_id,timestamp,text\nc,2024-01-01T00:00:00Z,hi\n", encoding="utf-8")

    status, _, stderr = run_import(database_url, str(path))

    assert status == 2
    assert "missing required column role in the header" in stderr
    assert count(engine, models.Message) == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["missing.csv"], "does not exist"),
    (["{tmp}/transcript.txt"], "cannot tell the format of transcript.txt"),
    (["{tmp}/transcript.txt", "--format", "xml"], "unknown format 'xml'"),
    (["{tmp}/transcript.txt", "--format", "csv", "--naive-timezone", "Mars/Olympus"],
     "unknown time zone"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "transcript.txt").write_text("conversation_id\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'usage.db'}"

    status, _, stderr = run_import(url, *[arg.format(tmp=tmp_path) for arg in args])

    assert status == 2
    assert expected in " ".join(stderr.split())


def test_invalid_utf8_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("conversation_id,timestamp,role,text\nc,2024-01-01T00:00:00Z,user,caf\xe9\n"
                     .encode("latin-1"))

    status, _, stderr = run_import(f"sqlite:///{tmp_path / 'enc.db'}", str(path))

    assert status == 1
    assert "is not valid UTF-8" in stderr


def test_unreachable_database_exits_1(tmp_path: Path) -> None:
    status, _, stderr = run_import("postgresql://postgres@127.0.0.1:1/none",
                                   str(FIXTURES / "transcript.csv"))

    assert status == 1
    assert "migrating the database postgresql+psycopg://postgres@127.0.0.1:1/none failed" in stderr


def test_failed_batch_aborts_with_lines(database_url: str, engine: Engine) -> None:
    writer = Writer(engine)
    write_messages = writer.handlers[ev.Message]
    calls = []

    def fail_second_batch(session: Session, messages: list[ev.Message]) -> None:
        calls.append(len(messages))
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, Exception("disk full"))
        write_messages(session, messages)

    writer.handlers[ev.Message] = fail_second_batch
    source = open_source(TextFile(FIXTURES / "transcript.csv"), "csv")

    with pytest.raises(ImportAborted) as raised:
        run_import_api(source, writer, batch_size=3)

    assert (raised.value.first_line, raised.value.last_line) == (6, 8)
    assert "lines 6-8 failed" in str(raised.value)
    assert count(engine, models.Message) == 3


def test_repeated_key_in_file_counted_as_duplicate(database_url: str, engine: Engine,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "repeat.csv"
    path.write_text("conversation_id,message_id,timestamp,role,user_id,text\n"
                    "r,1,2024-01-01T00:00:00Z,user,u,hi\n"
                    "r,1,2024-01-01T00:00:00Z,user,u,hi\n"
                    "r,2,2024-01-01T00:00:03Z,bot,,hello\n", encoding="utf-8")

    status, stdout, _ = run_import(database_url, str(path), "--batch-size", "2")

    assert status == 0
    assert "3 rows read: 2 imported, 1 duplicates, 0 skipped" in stdout
    assert count(engine, models.Message) == 2


def test_batches_split_conversation_consistently(database_url: str, engine: Engine) -> None:
    run_import(database_url, str(FIXTURES / "transcript.csv"), "--batch-size", "1")
    one_by_one = {key: (value["message_count"], value["first_response_ms"], value["contact"],
                        value["attributes"]) for key, value in conversations(engine).items()}

    expected = {"c-100": (4, 120_000.0, "alice", {"company": "Acme", "plan": "pro"}),
                "c-200": (3, 1250.0, "bob", {"company": "Globex"}),
                "c-300": (1, None, "carol", {"company": "Acme"})}
    assert one_by_one == expected


def test_progress_bar_option_runs(database_url: str, engine: Engine) -> None:
    status, _, _ = run_import(database_url, str(FIXTURES / "transcript.csv"), "--progress")

    assert status == 0
    assert count(engine, models.Message) == 8


# Twitter customer support (twcs)


def test_twcs_threads_resolve_to_roots(database_url: str, engine: Engine) -> None:
    status, stdout, stderr = run_import(database_url, str(FIXTURES / "twcs_sample.csv"),
                                        "--format", "twcs")

    assert status == 3
    assert "15 rows read: 14 imported, 0 duplicates, 1 skipped; 6 conversations" in stdout
    assert stderr.startswith("line 17: skipped: invalid created_at 'yesterday'")
    stored = conversations(engine)
    assert sorted(stored) == ["10", "20", "30", "40", "50", "60"]
    thread = stored["10"]
    assert thread["channel"] == "twitter"
    assert [m["platform_message_id"] for m in thread["messages"]] == ["10", "11", "12", "13", "14"]
    assert [m["role"] for m in thread["messages"]] == ["user", "agent", "user", "user", "agent"]
    assert [m["contact"] for m in thread["messages"]] == ["5001", "5001", "5001", "5002", "5001"]
    assert [m["reply_to"] for m in thread["messages"]] == [None, "10", "11", "11", "12"]
    assert thread["messages"][2]["text"] == "@AcmeHelp It blinks red\nand then 🔴 stops"
    assert thread["messages"][0]["key"] == "import:twitter:tweet:10"
    assert thread["attributes"] == {"company": "AcmeHelp"}
    assert thread["first_response_ms"] == 300_000.0


def test_twcs_companies_and_contacts(database_url: str, engine: Engine) -> None:
    run_import(database_url, str(FIXTURES / "twcs_sample.csv"), "--format", "twcs")

    stored = conversations(engine)
    companies = {key: value["attributes"].get("company") for key, value in stored.items()}
    assert companies == {"10": "AcmeHelp", "20": "GlobexCare", "30": "GlobexCare",
                         "40": "AcmeHelp", "50": "AcmeHelp", "60": "AcmeHelp"}
    assert stored["20"]["first_response_ms"] is None
    assert stored["30"]["first_response_ms"] == 90_000.0
    # The root of thread 40 is not in the file; the thread is still one conversation.
    assert [m["platform_message_id"] for m in stored["40"]["messages"]] == ["41", "42"]
    # A company tweet opened thread 50, so its contact is the customer who replied.
    assert [m["contact"] for m in stored["50"]["messages"]] == ["8001", "8001"]
    assert stored["50"]["contact"] == "8001"
    # Tweet 61 names no parent, but tweet 60 lists it in response_tweet_id.
    assert [m["platform_message_id"] for m in stored["60"]["messages"]] == ["60", "61"]
    assert stored["60"]["first_response_ms"] == 120_000.0


def test_twcs_reimport_changes_nothing(database_url: str, engine: Engine) -> None:
    path = str(FIXTURES / "twcs_sample.csv")
    run_import(database_url, path, "--format", "twcs")
    before = snapshot(engine)

    status, stdout, _ = run_import(database_url, path, "--format", "twcs")

    assert status == 3
    assert "0 imported, 14 duplicates, 1 skipped" in stdout
    assert snapshot(engine) == before


def test_twcs_missing_column_rejected(tmp_path: Path) -> None:
    path = tmp_path / "twcs.csv"
    path.write_text("tweet_id,author_id,inbound,created_at,text\n", encoding="utf-8")

    status, _, stderr = run_import(f"sqlite:///{tmp_path / 'x.db'}", str(path), "--format", "twcs")

    assert status == 2
    assert "missing required column response_tweet_id, in_response_to_tweet_id" in stderr


# Units


def test_created_at_parses_offsets() -> None:
    assert parse_created_at("Wed Oct 11 06:55:44 +0000 2017") == datetime(2017, 10, 11, 6, 55, 44,
                                                                          tzinfo=UTC)
    parsed = parse_created_at("Wed Oct 11 06:55:44 -0130 2017")
    assert parsed.utcoffset() == -timedelta(hours=1, minutes=30)
    assert parsed.astimezone(UTC).hour == 8


def test_roots_follow_parents_and_break_cycles() -> None:
    parent = {2: 1, 3: 2, 4: 99, 7: 8, 8: 7}

    roots = _resolve_roots({1, 2, 3, 4, 5, 7, 8}, parent)

    assert roots[3] == 1
    assert roots[2] == 1
    assert roots[4] == 99
    assert roots[5] == 5
    assert roots[7] == roots[8] == 7


def test_message_key_long_ids_hashed() -> None:
    key = message_key("web", "c" * 300, "m1", 0, "user", "hi")

    assert len(key) <= 255
    assert key.startswith("import:web:sha256:")
    assert key == message_key("web", "c" * 300, "m1", 0, "user", "hi")
    assert key != message_key("web", "c" * 300, "m2", 0, "user", "hi")


def test_derived_key_depends_on_text() -> None:
    first = message_key("web", "c", None, 1000, "user", "hello")

    assert first == message_key("web", "c", None, 1000, "user", "hello")
    assert first != message_key("web", "c", None, 1000, "user", "hello!")
    assert first != message_key("web", "c", None, 1000, "bot", "hello")


def test_csv_line_numbers_follow_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_bytes(b'\xef\xbb\xbfa,b\r\n1,"x\r\ny\r\nz"\r\n\r\n2,w\r\n')

    with TextFile(path).open() as stream:
        header, records = read_csv(stream)
        lines = [(record.line, record.values) for record in records]

    assert header == ["a", "b"]
    assert lines == [(2, {"a": "1", "b": "x\r\ny\r\nz"}), (6, {"a": "2", "b": "w"})]


def test_text_file_reports_progress_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_bytes(b"a,b\n" + b"1,2\n" * 200_000)
    seen: list[int] = []
    file = TextFile(path, on_progress=seen.append)

    with file.open() as stream:
        for _ in stream:
            pass

    assert len(seen) > 2
    assert seen[-1] == path.stat().st_size
    assert seen == sorted(seen)



# Writing in a child process


def failing_writer(database_url: str) -> Writer:
    """A writer whose second message batch fails, built in the child process."""
    writer = Writer(make_engine(database_url))
    write_messages = writer.handlers[ev.Message]
    calls = []

    def fail_second_batch(session: Session, messages: list[ev.Message]) -> None:
        calls.append(len(messages))
        if len(calls) == 2:
            raise OperationalError("INSERT", {}, Exception("disk full"))
        write_messages(session, messages)

    writer.handlers[ev.Message] = fail_second_batch
    return writer


def test_child_writer_stores_what_thread_stores(database_url: str, engine: Engine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 0)
    path = str(FIXTURES / "transcript.csv")

    status, stdout, stderr = run_import(database_url, path, "--batch-size", "3")

    assert status == 0, stderr
    assert "8 rows read: 8 imported, 0 duplicates, 0 skipped; 3 conversations" in stdout
    stored = conversations(engine)
    assert {key: (value["message_count"], value["first_response_ms"], value["contact"],
                  value["attributes"]) for key, value in stored.items()} == {
        "c-100": (4, 120_000.0, "alice", {"company": "Acme", "plan": "pro"}),
        "c-200": (3, 1250.0, "bob", {"company": "Globex"}),
        "c-300": (1, None, "carol", {"company": "Acme"})}
    before = snapshot(engine)
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 1 << 40)

    status, stdout, _ = run_import(database_url, path)

    assert "8 rows read: 0 imported, 8 duplicates, 0 skipped" in stdout
    assert snapshot(engine) == before


def test_child_writer_reports_skipped_rows(database_url: str, engine: Engine,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 0)

    status, stdout, stderr = run_import(database_url, str(FIXTURES / "bad_rows.csv"))

    assert status == 3
    assert "8 rows read: 3 imported, 0 duplicates, 5 skipped" in stdout
    assert [line.split(":")[0] for line in stderr.splitlines()] == [
        "line 4", "line 5", "line 6", "line 7", "line 10"]
    assert count(engine, models.Message) == 3


def test_child_writer_failed_batch_aborts_with_lines(database_url: str, engine: Engine) -> None:
    source = open_source(TextFile(FIXTURES / "transcript.csv"), "csv")
    writer = ProcessBatchWriter(functools.partial(failing_writer, database_url))

    try:
        with pytest.raises(ImportAborted) as raised:
            run_import_api(source, writer, batch_size=3)
    finally:
        writer.close()

    assert (raised.value.first_line, raised.value.last_line) == (6, 8)
    assert "lines 6-8 failed" in str(raised.value)
    assert "disk full" in str(raised.value)
    assert count(engine, models.Message) == 3


# Rows that wait for their conversation's user


@pytest.mark.parametrize("max_waiting", [2, transcript.MAX_WAITING_ROWS])
def test_rows_before_late_user_get_that_user(tmp_path: Path, max_waiting: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # With at most two waiting rows, the fourth row starts the second pass.
    monkeypatch.setattr(transcript, "MAX_WAITING_ROWS", max_waiting)
    path = tmp_path / "late.csv"
    path.write_text("conversation_id,message_id,timestamp,role,user_id,text\n"
                    "w,1,2024-01-01T00:00:00Z,bot,,hello\n"
                    "v,1,2024-01-01T00:00:01Z,user,vic,hi\n"
                    "w,2,2024-01-01T00:00:02Z,bot,,anyone?\n"
                    "w,3,later,bot,,still there?\n"
                    "w,4,2024-01-01T00:00:04Z,user,wes,here\n"
                    "x,1,2024-01-01T00:00:05Z,bot,,nobody answers\n", encoding="utf-8")
    source = open_source(TextFile(path), "csv")
    source.scan()

    items = list(source.rows())

    assert [item.line for item in items] == [2, 3, 4, 5, 6, 7]
    assert isinstance(items[3], Skipped)
    assert items[3].reason.startswith("invalid timestamp 'later'")
    users = [item.message.user_id for item in items if isinstance(item, Row)]
    assert users == ["wes", "vic", "wes", "wes", "x"]


# Privacy


def pseudonym(key: str, kind: str, value: str) -> str:
    return "ps_" + hmac.new(key.encode(), f"{kind}\x00{value}".encode(),
                            hashlib.sha256).hexdigest()[:32]


def stored_key(engine: Engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text(
            "SELECT value FROM chatmw_secrets WHERE name = 'pseudonym_key'")).scalar_one()


@pytest.mark.parametrize("child", [False, True])
def test_import_pseudonymises_and_redacts_by_default(database_url: str, engine: Engine,
                                                     tmp_path: Path, child: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHATMW_PSEUDONYMISE", "CHATMW_TEXT_MODE", "CHATMW_PSEUDONYM_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 0 if child else 1 << 40)
    path = tmp_path / "private.csv"
    path.write_text("conversation_id,timestamp,role,user_id,channel,text\n"
                    "p-1,2024-01-01T00:00:00Z,user,alice,web,mail me at alice@example.com\n"
                    "p-1,2024-01-01T00:00:04Z,bot,,web,done\n", encoding="utf-8")

    status, _, stderr = run_import(database_url, str(path))

    assert status == 0, stderr
    key = stored_key(engine)
    with engine.connect() as connection:
        contacts = connection.execute(select(models.Contact.external_id)).scalars().all()
        conversation_ids = connection.execute(
            select(models.Conversation.external_id)).scalars().all()
        texts = connection.execute(
            select(models.Message.text).order_by(models.Message.occurred_at_ms)).scalars().all()
    assert contacts == [pseudonym(key, "user", "alice")]
    assert conversation_ids == [pseudonym(key, "conversation", "p-1")]
    assert texts == ["mail me at [email]", "done"]


def test_imported_and_live_user_share_one_pseudonym(database_url: str, engine: Engine,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHATMW_PSEUDONYMISE", "CHATMW_TEXT_MODE", "CHATMW_PSEUDONYM_KEY"):
        monkeypatch.delenv(name, raising=False)
    for number in (1, 2):
        path = tmp_path / f"part{number}.csv"
        path.write_text("conversation_id,timestamp,role,user_id,channel,text\n"
                        f"q-{number},2024-01-0{number}T00:00:00Z,user,alice,web,hello\n",
                        encoding="utf-8")
        status, _, stderr = run_import(database_url, str(path))
        assert status == 0, stderr

    runtime = Runtime.from_settings(Settings(database_url=database_url))
    runtime.start(migrate=False)
    runtime.recorder.submit(ev.Message(channel="web", occurred_at=ev.now_utc(), key="live-1",
                                       role="user", user_id="alice", text="back again"))
    assert runtime.stop()

    with engine.connect() as connection:
        contacts = connection.execute(select(models.Contact.external_id)).scalars().all()
        owners = connection.execute(
            select(models.Message.key, models.Contact.external_id)
            .join(models.Contact, models.Contact.id == models.Message.contact_id)).all()
    assert contacts == [pseudonym(stored_key(engine), "user", "alice")]
    assert "live-1" in {key for key, _ in owners}
    assert {external_id for _, external_id in owners} == set(contacts)
    assert len(owners) == 3


def test_child_and_parent_enrich_alike(database_url: str, engine: Engine) -> None:
    privacy = PrivacySettings(pseudonymise=False, text_mode="redacted")
    writer = ProcessBatchWriter(functools.partial(build_import_writer,
                                                  Settings(database_url=database_url), privacy))
    texts = ["I love it, thanks!", "this is awful", "call me on +44 20 7946 0958", "ok"]
    batches = [[ev.Message(channel="web", occurred_at=datetime(2024, 1, 1, tzinfo=UTC),
                           key=f"e-{batch}-{index}", role="user", user_id="eve", text=text)
                for index, text in enumerate(texts)] for batch in (1, 2)]

    try:
        # The first batch is enriched here (no write is in progress), the second in the child.
        writer.prepare(batches[0])
        writer.submit(batches[0])
        assert writer.result() == 4
        writer.submit(batches[1])
        assert writer.result() == 4
    finally:
        writer.close()

    with engine.connect() as connection:
        stored = {key: (sentiment, stored_text) for key, sentiment, stored_text
                  in connection.execute(select(models.Message.key, models.Message.sentiment,
                                               models.Message.text))}
    for index, written in enumerate(texts):
        expected = (sentiment_enricher(batches[0][index])["sentiment"], redact_text(written))
        assert stored[f"e-1-{index}"] == expected
        assert stored[f"e-2-{index}"] == expected
    assert stored["e-1-2"][1] == "call me on [phone]"


@pytest.mark.parametrize("conversations_too", [True, False])
def test_import_pseudonyms_equal_runtime_transform(conversations_too: bool) -> None:
    settings = PrivacySettings(pseudonym_key=Secret("k" * 32),
                               pseudonymise_conversations=conversations_too)
    privacy = Privacy.load(settings, engine=None)  # type: ignore[arg-type]
    transform = pseudonymise_messages(privacy)
    assert transform is not None
    moment = datetime(2024, 1, 1, tzinfo=UTC)
    messages = [
        ev.Message(channel="web", occurred_at=moment, key="a", role="user", user_id="alice",
                   conversation_id="c-1", attributes={"plan": "pro"}),
        ev.Message(channel="web", occurred_at=moment, key="b", role="bot", user_id="",
                   conversation_id=None, text="café"),
        ev.Message(channel="web", occurred_at=moment, key="c", role="user",
                   user_id="zoë\x00" + "x" * 300, conversation_id="c-1"),
        ev.Message(channel="web", occurred_at=moment, key="d", role="user", user_id="alice",
                   conversation_id="c-2"),
    ]

    assert [transform(message) for message in messages] == [
        privacy.transform(message) for message in messages]
    assert transform(messages[0]).user_id != messages[0].user_id
    assert pseudonymise_messages(Privacy.load(PrivacySettings(pseudonymise=False),
                                              engine=None)) is None  # type: ignore[arg-type]
