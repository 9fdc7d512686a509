"""Export of survey records with their answers, as CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from chatmw.events import from_ms
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.scope import conversation_scope
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_surveys import Survey

__all__ = ["EXPORT_COLUMNS", "EXPORT_FORMATS", "export_rows", "iter_export"]

EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_COLUMNS = (
    "survey_id",
    "survey",
    "kind",
    "channel",
    "trigger",
    "state",
    "reason",
    "locale",
    "conversation_id",
    "user_id",
    "conversation_started_at",
    "due_at",
    "sent_at",
    "answered_at",
    "score",
    "comment",
    "commented_at",
    "reasks",
    "used_template",
)
_TIMES = {
    "conversation_started_at": "started",
    "due_at": "due",
    "sent_at": "sent",
    "answered_at": "answered",
    "commented_at": "commented",
}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else from_ms(ms).isoformat().replace("+00:00", "Z")


def export_rows(engine: Engine, flt: MetricFilter, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Yield one record per survey of the conversations ``flt`` selects, oldest first."""
    scope = conversation_scope(flt).subquery()
    statement = (
        select(Survey, Conversation.external_id, Conversation.started_at_ms, Contact.external_id)
        .join(scope, scope.c.conversation_id == Survey.conversation_id)
        .join(Conversation, Conversation.id == Survey.conversation_id)
        .outerjoin(Contact, Contact.id == Survey.contact_id)
        .order_by(Conversation.started_at_ms, Survey.id)
        .execution_options(yield_per=batch)
    )
    with Session(engine) as session:
        for survey, conversation_id, started, user_id in session.execute(statement):
            times = {
                "started": started,
                "due": survey.due_at_ms,
                "sent": survey.sent_at_ms,
                "answered": survey.answered_at_ms,
                "commented": survey.commented_at_ms,
            }
            yield {
                "survey_id": survey.id,
                "survey": survey.name,
                "kind": survey.kind,
                "channel": survey.channel,
                "trigger": survey.trigger,
                "state": survey.state,
                "reason": survey.reason,
                "locale": survey.locale,
                "conversation_id": conversation_id,
                "user_id": user_id,
                **{column: _iso(times[key]) for column, key in _TIMES.items()},
                "score": survey.score,
                "comment": survey.comment,
                "reasks": survey.reasks,
                "used_template": bool(survey.used_template),
            }


def iter_export(engine: Engine, flt: MetricFilter, fmt: str) -> Iterator[str]:
    """Yield the export as text chunks: CSV with a header row, or one JSON object a line."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "jsonl":
        for row in export_rows(engine, flt):
            yield json.dumps(row, ensure_ascii=False) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in export_rows(engine, flt):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
        if buffer.tell() > 64_000:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
