"""Imports into PostgreSQL through several writer processes, each batch split by user."""

from __future__ import annotations

import csv
import random
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import _empty_postgres
from sqlalchemy import Engine
from test_importer import run_import
from test_writer_reference import stored

from chatmw import cli_import
from chatmw import events as ev
from chatmw.importers.writers import SplitBatchWriter

T0 = datetime(2025, 2, 3, 8, 0, tzinfo=UTC)


class _Recording:
    """A batch writer that keeps the batches it gets and returns their size or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.prepared: list[list[ev.Message]] = []
        self.submitted: list[list[ev.Message]] = []
        self.closed = False

    def prepare(self, messages: list[ev.Message]) -> None:
        self.prepared.append(messages)

    def submit(self, messages: list[ev.Message]) -> None:
        self.submitted.append(messages)

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        return len(self.submitted[-1])

    def close(self) -> None:
        self.closed = True


def _message(index: int, user: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index),
                      key=f"i{index}", role="user", user_id=user, text="hi")


def _part(user: str, count: int) -> int:
    return zlib.crc32(f"web\x00{user}".encode()) % count


def test_split_writer_routes_users() -> None:
    writers = [_Recording(), _Recording()]
    split = SplitBatchWriter(writers)  # type: ignore[arg-type]
    batch = [_message(index, f"user{index % 7}") for index in range(40)]

    split.prepare(batch)
    split.submit(batch)
    new = split.result()

    assert new == 40
    for index, writer in enumerate(writers):
        assert len(writer.submitted) == 1
        assert all(_part(m.user_id, 2) == index for m in writer.submitted[0])
        # Each writer prepared the very list it was then sent, so its work is reused.
        assert writer.prepared[0] is writer.submitted[0]
    assert sorted(m.key for w in writers for m in w.submitted[0]) == sorted(m.key for m in batch)
    split.close()
    assert all(writer.closed for writer in writers)


def test_split_writer_raises_after_all_parts() -> None:
    # The first part fails, and the second is still collected before the error is raised.
    failing = _Recording(RuntimeError("disk full"))
    other = _Recording()
    users = ["ana", "bob", "cy", "dee", "eve", "fay"]
    batch = [_message(index, users[index % 6]) for index in range(12)]
    split = SplitBatchWriter([failing, other])  # type: ignore[list-item]
    assert {_part(user, 2) for user in users} == {0, 1}

    split.submit(batch)
    with pytest.raises(RuntimeError, match="disk full"):
        split.result()

    assert len(other.submitted) == 1
    # Nothing is left to collect: the next batch starts afresh.
    split.submit(batch[:1])
    assert len(failing.submitted) + len(other.submitted) == 3


def test_split_writer_needs_two_writers() -> None:
    with pytest.raises(ValueError, match="needs 2 writers or more, got 1"):
        SplitBatchWriter([_Recording()])  # type: ignore[list-item]


def _transcript(path: Path) -> Path:
    # 60 conversations of 40 users, in random order, with attributes on the user rows.
    rng = random.Random(5)
    rows = []
    for conversation in range(60):
        user = f"user{conversation % 40}"
        start = T0 + timedelta(minutes=rng.randint(0, 600))
        for turn in range(rng.randint(2, 8)):
            at = (start + timedelta(seconds=30 * turn)).strftime("%Y-%m-%dT%H:%M:%SZ")
            role = "user" if turn % 2 == 0 else "bot"
            text = rng.choice(("hello", "where is my order?", "thanks, great", "this is awful"))
            rows.append([f"c{conversation}", turn, at, role, user if role == "user" else "",
                         "web", text, rng.choice(("pro", "free"))])
    rng.shuffle(rows)
    with path.open("w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["conversation_id", "message_id", "timestamp", "role", "user_id",
                      "channel", "text", "plan"])
        out.writerows(rows)
    return path


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_split_import_stores_same_rows(database_url: str, engine: Engine, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 0)
    path = str(_transcript(tmp_path / "split.csv"))
    results = {}
    for processes in ("1", "3"):
        _empty_postgres(database_url)
        monkeypatch.setenv("CHATMW_WRITER_PROCESSES", processes)
        status, stdout, stderr = run_import(database_url, path, "--batch-size", "25")
        assert status == 0, stderr
        results[processes] = (stdout.split(";")[0], stored(engine))

    assert results["1"][0] == results["3"][0]
    assert "imported, 0 duplicates, 0 skipped" in results["1"][0]
    assert len(results["1"][1]["messages"]) > 200
    assert results["3"][1] == results["1"][1]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_import_rejects_invalid_processes(database_url: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_import, "WRITER_PROCESS_MIN_BYTES", 0)
    monkeypatch.setenv("CHATMW_WRITER_PROCESSES", "lots")
    path = str(_transcript(tmp_path / "split.csv"))

    status, _, stderr = run_import(database_url, path)

    assert status == 2
    # The message is in a box whose lines may wrap it.
    message = " ".join(stderr.replace("│", " ").split())
    assert "CHATMW_WRITER_PROCESSES must be an integer from 1 to 8, got 'lots'" in message
