"""The survey answer preprocessor reads stored answers only for users who have a survey."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from surveys_support import Harness, survey_config

STORED_ANSWERS = "JOIN messages AS m ON m.key = batch.message_key"


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_lookup_skipped_without_surveys(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    with _statements(engine) as statements:
        harness.user_says("n1", "hello", user="new-user")
    assert not any(STORED_ANSWERS in statement for statement in statements)
    assert any("JOIN surveys AS s" in statement for statement in statements)


def test_lookup_covers_surveyed_users_only(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("a1", "5")
    with _statements(engine) as statements:
        harness.user_says("a1", "5")
        harness.user_says("o1", "hi", user="other-user")
    lookups = [statement for statement in statements if STORED_ANSWERS in statement]
    assert len(lookups) == 1
    survey = harness.surveys()[0]
    assert survey.state == "answered"
    assert survey.score == 5
