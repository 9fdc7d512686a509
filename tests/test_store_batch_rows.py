"""Batch rows sent to PostgreSQL as one JSON document store what per-column arrays stored."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from chatmw.store import identity
from chatmw.store.engine import make_engine
from chatmw.store.identity import insert_ignore, resolve_named_conversations
from chatmw.store.models import Message

# psycopg adapts no list that mixes ints and floats, so the arrays get floats only.
FLOATS = (0.1, 1e-07, 2.5e300, -0.0, float("nan"), float("inf"), float("-inf"), 7.0, 1e16)
TEXTS = ("plain", "😀 e\u0301 مرحبا", "quote \" backslash \\ newline \n tab \t", "", None)


@pytest.fixture
def pg_engine(postgres_url: str) -> Any:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def _rows(prefix: str, conversation_id: int) -> list[dict[str, Any]]:
    rows = []
    for index, latency in enumerate(FLOATS):
        rows.append({
            "key": f"{prefix}{index}", "conversation_id": conversation_id, "contact_id": None,
            # channel is VARCHAR(32): both paths cast, and the cast truncates.
            "channel": "c" * 40 if index == 0 else "web", "role": "bot", "kind": "message",
            "text": TEXTS[index % len(TEXTS)], "occurred_at_ms": 1_700_000_000_000 + index,
            "platform_message_id": None, "reply_to": None, "latency_ms": latency,
            "response_ms": None, "is_first_response": index % 2 == 0, "intent": None,
            "sentiment": -0.0 if index == 1 else None, "status": None, "status_at_ms": None,
            "meta": {"note": TEXTS[index % len(TEXTS)], "n": index} if index % 3 else None,
        })
    return rows


def _stored(engine: Engine, prefix: str) -> list[tuple[Any, ...]]:
    columns = [column for column in Message.__table__.c if column.name not in ("id", "key")]
    with engine.connect() as connection:
        rows = connection.execute(
            select(*columns).where(Message.key.startswith(prefix)).order_by(Message.key)).all()
    # Floats as repr, so that NaN compares equal and the sign of zero counts.
    return [tuple(repr(value) if isinstance(value, float) else value for value in row)
            for row in rows]


def test_document_matches_arrays(pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with Session(pg_engine) as session, session.begin():
        ids = resolve_named_conversations(session, {("web", "batch-rows"): (0, None)})
        conversation_id = ids[("web", "batch-rows")]
        source, _ = identity._pg_rows(session, "new_rows", identity._column_types(
            session, Message.__table__, list(_rows("doc", 0)[0])), _rows("doc", 0))
        assert "jsonb_array_elements" in source
        insert_ignore(session, Message.__table__, _rows("doc", conversation_id), ["key"])
    monkeypatch.setattr(identity, "_rows_document", lambda *args: None)
    with Session(pg_engine) as session, session.begin():
        insert_ignore(session, Message.__table__, _rows("arr", conversation_id), ["key"])

    document, arrays = _stored(pg_engine, "doc"), _stored(pg_engine, "arr")
    assert len(document) == len(FLOATS)
    assert document == arrays


def test_document_keeps_special_floats(pg_engine: Engine) -> None:
    rows = _rows("flt", 0)
    # An int in a float column is stored as the nearest double, as float() rounds it.
    rows[-1]["latency_ms"] = 2**53 + 1
    expected_values = [*FLOATS[:-1], float(2**53 + 1)]
    with Session(pg_engine) as session, session.begin():
        ids = resolve_named_conversations(session, {("web", "floats"): (0, None)})
        for row in rows:
            row["conversation_id"] = ids[("web", "floats")]
        insert_ignore(session, Message.__table__, rows, ["key"])
    with pg_engine.connect() as connection:
        stored = connection.execute(
            select(Message.latency_ms).where(Message.key.startswith("flt")).order_by(Message.key)
        ).scalars().all()
    for value, expected in zip(stored, expected_values, strict=True):
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == expected
            assert math.copysign(1.0, value) == math.copysign(1.0, expected)


def test_float_in_integer_column_takes_arrays(pg_engine: Engine) -> None:
    rows = [{"channel": "web", "external_id": "float-time", "first_seen_ms": 5.0,
             "last_seen_ms": 6.0}]
    with Session(pg_engine) as session, session.begin():
        assert identity._rows_document(rows, list(rows[0]), {}, {2, 3}, set()) is None
        found = identity.resolve_contacts(session, {("web", "float-time"): 5})
        assert ("web", "float-time") in found
