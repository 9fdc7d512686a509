"""Rows staged by binary COPY read back as the JSON document path reads them."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from chatmw.store import models
from chatmw.store.identity import _column_types, _pg_rows
from chatmw.store.pg_copy import copy_rows

COLUMNS = ["key", "conversation_id", "occurred_at_ms", "latency_ms", "sentiment",
           "is_first_response", "intent", "text", "meta"]
ROWS = [
    {"key": "plain", "conversation_id": 1, "occurred_at_ms": 1_700_000_000_000,
     "latency_ms": 12.5, "sentiment": -0.0, "is_first_response": True, "intent": "refund",
     "text": "héllo \\ \"quoted\"\ttab", "meta": {"a": [1, 2.5, None], "é": "ü"}},
    {"key": "nulls", "conversation_id": None, "occurred_at_ms": 0, "latency_ms": None,
     "sentiment": None, "is_first_response": None, "intent": None, "text": None, "meta": None},
    # VARCHAR(128) truncates the longer intent in both paths, and an integer in a float
    # column is stored as that number.
    {"key": "edges", "conversation_id": 2**31 - 1, "occurred_at_ms": -5, "latency_ms": 7,
     "sentiment": float("nan"), "is_first_response": False, "intent": "x" * 200,
     "text": "", "meta": {}},
    {"key": "infinite", "conversation_id": 3, "occurred_at_ms": 2**62, "latency_ms": math.inf,
     "sentiment": 1e-300, "is_first_response": False, "intent": "i", "text": "t",
     "meta": [1, "two"]},
]


def _selected(session: Session, source: str, parameters: dict[str, object]) -> list[tuple]:
    names = ", ".join(f"new_rows.{name}" for name in COLUMNS)
    return [tuple(row) for row in session.connection().execute(
        text(f"SELECT {names}, CAST(new_rows.meta AS TEXT) FROM {source}"), parameters)]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_copy_rows_read_as_document(engine: Engine) -> None:
    types = _column_types(None, models.Message.__table__, COLUMNS)  # type: ignore[arg-type]
    with Session(engine) as session, session.begin():
        copied = copy_rows(session, "new_rows", types, ROWS)
        assert copied is not None
        by_copy = _selected(session, copied, {})
        document, parameters = _pg_rows(session, "new_rows", types, ROWS)
        by_document = _selected(session, document, parameters)
    assert len(by_copy) == len(ROWS)
    # NaN is not equal to itself, so rows are compared by their text.
    assert [repr(row) for row in by_copy] == [repr(row) for row in by_document]
    assert [row[0] for row in by_copy] == [row["key"] for row in ROWS]
    assert by_copy[2][6] == "x" * 128


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_copy_rows_batches_in_one_transaction(engine: Engine) -> None:
    types = _column_types(None, models.Message.__table__, COLUMNS)  # type: ignore[arg-type]
    with Session(engine) as session, session.begin():
        first = copy_rows(session, "new_rows", types, ROWS[:2])
        second = copy_rows(session, "new_rows", types, ROWS[2:])
        assert first is not None
        assert second is not None
        assert [row[0] for row in _selected(session, first, {})] == ["plain", "nulls"]
        assert [row[0] for row in _selected(session, second, {})] == ["edges", "infinite"]
    # Committed: the staging table is empty for the next transaction.
    with Session(engine) as session, session.begin():
        again = copy_rows(session, "new_rows", types, ROWS[:1])
        assert again is not None
        assert [row[0] for row in _selected(session, again, {})] == ["plain"]


@pytest.mark.parametrize("value", [True, 1.5, 2**63, "7"])
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_copy_rows_declines_misfit_integer(engine: Engine, value: object) -> None:
    # A bool, float, string or out-of-range integer in an integer column goes the
    # document way, which casts or rejects it as before.
    types = _column_types(None, models.Message.__table__, COLUMNS)  # type: ignore[arg-type]
    rows = [dict(ROWS[0], occurred_at_ms=value)]
    with Session(engine) as session, session.begin():
        assert copy_rows(session, "new_rows", types, rows) is None
