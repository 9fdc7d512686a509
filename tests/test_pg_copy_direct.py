"""Message rows copied straight into the table store what the staged insert stores."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from chatmw.store import identity, models
from chatmw.store.derive import MESSAGE_COLUMNS
from chatmw.store.identity import insert_ignore_expected
from chatmw.store.pg_copy import copy_into

TABLE = models.Message.__table__
STORED = ("conversation_id", "contact_id", "channel", "role", "kind", "text",
          "occurred_at_ms", "platform_message_id", "reply_to", "latency_ms", "response_ms",
          "is_first_response", "intent", "sentiment", "status", "status_at_ms")


def _row(key: str, **values: Any) -> list[Any]:
    row = dict.fromkeys(MESSAGE_COLUMNS)
    row.update(key=key, conversation_id=1, contact_id=2, channel="web", role="user",
               kind="message", text="hi", occurred_at_ms=1_700_000_000_000,
               is_first_response=False)
    row.update(values)
    return [row[name] for name in MESSAGE_COLUMNS]


def _rows(prefix: str) -> list[list[Any]]:
    return [
        _row(f"{prefix}-plain", text="héllo \\ \"quoted\"\ttab\nline", intent="refund",
             sentiment=-0.0, latency_ms=12.5, meta={"a": [1, 2.5, None], "é": "ü"}),
        _row(f"{prefix}-nulls", contact_id=None, text=None, meta=None),
        _row(f"{prefix}-edges", conversation_id=2**31 - 1, occurred_at_ms=-5, latency_ms=7,
             sentiment=float("nan"), response_ms=math.inf, is_first_response=True,
             platform_message_id="m" * 255, reply_to="r", status="read",
             status_at_ms=2**62, meta={}),
        _row(f"{prefix}-empty", text="", intent="i" * 128, kind="survey_answer"),
    ]


def _columns(rows: list[list[Any]]) -> list[list[Any]]:
    return [list(values) for values in zip(*rows, strict=True)]


def _stored(engine: Engine, prefix: str) -> list[str]:
    # Each stored row as text, in id order (NaN is not equal to itself).
    names = ", ".join(STORED)
    with engine.connect() as connection:
        rows = connection.execute(text(
            f"SELECT key, {names}, CAST(meta AS TEXT) FROM messages WHERE key LIKE :prefix "
            "ORDER BY id"), {"prefix": f"{prefix}-%"}).all()
    return [repr((row[0].split("-", 1)[1], *row[1:])) for row in rows]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_direct_copy_matches_staged_insert(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    direct = _rows("direct")
    with Session(engine) as session, session.begin():
        assert copy_into(session, TABLE, MESSAGE_COLUMNS, _columns(direct))
    staged = _rows("staged")
    monkeypatch.setattr(identity, "copy_into", lambda *args: False)
    with Session(engine) as session, session.begin():
        assert insert_ignore_expected(session, TABLE, staged, ["key"],
                                      [row[0] for row in staged], MESSAGE_COLUMNS)
    by_copy = _stored(engine, "direct")
    assert len(by_copy) == len(direct)
    assert by_copy == _stored(engine, "staged")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_direct_copy_takes_first_duplicate(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[list[Any]]] = []

    def spy(session: Session, table: Any, names: Any, columns: Any) -> bool:
        calls.append(columns)
        return copy_into(session, table, names, columns)

    monkeypatch.setattr(identity, "copy_into", spy)
    rows = [_row("k-a", text="first a"), _row("k-b"), _row("k-a", text="second a"),
            _row("k-c")]
    with Session(engine) as session, session.begin():
        assert insert_ignore_expected(session, TABLE, rows, ["key"], ["k-a", "k-b", "k-c"],
                                      MESSAGE_COLUMNS)
    assert len(calls) == 1
    with engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT key, text FROM messages WHERE key LIKE 'k-%' ORDER BY id")).all()
    assert [tuple(row) for row in stored] == [("k-a", "first a"), ("k-b", "hi"), ("k-c", "hi")]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_direct_copy_race_falls_back(engine: Engine) -> None:
    # The caller expects three new keys, but another writer stored one of them after the
    # caller read the stored keys. The copy fails and the transaction goes on. The staged
    # insert skips that key, and the result is false because the plan did not hold.
    rows = [_row("race-a"), _row("race-b", text="mine"), _row("race-c")]
    with Session(engine) as session, session.begin():
        session.connection().execute(text("SELECT 1"))
        with engine.begin() as other:
            other.execute(text(
                "INSERT INTO messages (key, conversation_id, channel, role, kind, "
                "occurred_at_ms, is_first_response, text) VALUES ('race-b', 9, 'web', 'user', "
                "'message', 5, false, 'theirs')"))
        planned = insert_ignore_expected(session, TABLE, rows, ["key"],
                                      ["race-a", "race-b", "race-c"], MESSAGE_COLUMNS)
        assert planned is False
        session.connection().execute(text("SELECT 1"))
    with engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT key, text FROM messages WHERE key LIKE 'race-%' ORDER BY key")).all()
    assert [tuple(row) for row in stored] == [("race-a", "hi"), ("race-b", "theirs"),
                                              ("race-c", "hi")]


@pytest.mark.parametrize(("column", "value"), [
    ("intent", "x" * 129),            # VARCHAR(128): an insert truncates it
    ("platform_message_id", "p" * 256),
    ("conversation_id", 2**31),       # beyond the int4 column
    ("occurred_at_ms", 1.5),          # a float in an integer column
])
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_direct_copy_declines_misfit_values(engine: Engine, column: str,
                                                          value: Any) -> None:
    rows = [_row("misfit-a"), _row("misfit-b", **{column: value})]
    with Session(engine) as session, session.begin():
        assert copy_into(session, TABLE, MESSAGE_COLUMNS, _columns(rows)) is False
        stored = session.connection().execute(text(
            "SELECT count(*) FROM messages WHERE key LIKE 'misfit-%'")).scalar_one()
    assert stored == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_insert_truncates_overlong_intent(engine: Engine) -> None:
    rows = [_row("long-a", intent="y" * 300)]
    with Session(engine) as session, session.begin():
        assert insert_ignore_expected(session, TABLE, rows, ["key"], ["long-a"],
                                      MESSAGE_COLUMNS)
    with engine.connect() as connection:
        intent = connection.execute(text(
            "SELECT intent FROM messages WHERE key = 'long-a'")).scalar_one()
    assert intent == "y" * 128
