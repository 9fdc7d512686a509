"""The web widget's outbound channel: messages wait in ``web_outbox`` until fetched.

The widget has no push connection, so :class:`WebOutbound` stores each message and the
widget endpoint hands it over with its next poll or reply through
:func:`fetch_web_messages`. Each message is handed over once, even with several app
processes: fetching marks it delivered in the same statement that reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, insert, select, update

from chatmw.outbound import OutboundMessage, SendResult
from chatmw.store.models_surveys import WebOutboxMessage

__all__ = ["WebOutbound", "fetch_web_messages", "widget_payload"]


def _now_ms() -> int:
    return int(time.time() * 1000)


def widget_payload(message: OutboundMessage) -> dict[str, Any]:
    """Return the widget's reply shape: ``{"text", "buttons": [{"title", "payload"}]}``."""
    buttons = [{"title": reply.title, "payload": reply.payload} for reply in message.quick_replies]
    buttons += [{"title": row.title, "payload": row.payload} for row in message.list_rows]
    payload: dict[str, Any] = {"text": message.text or ""}
    if buttons:
        payload["buttons"] = buttons
    if message.meta:
        payload["meta"] = dict(message.meta)
    return payload


class WebOutbound:
    """Queues messages for web widget visitors (``user_id`` is the widget's visitor id)."""

    channel = "web"

    def __init__(self, engine: Engine, clock: Callable[[], int] = _now_ms) -> None:
        self.engine = engine
        self.clock = clock

    async def send(self, message: OutboundMessage) -> SendResult:
        """Store ``message`` for the widget; a database error is reported as retryable."""
        try:
            outbox_id = await asyncio.to_thread(self._store, message)
        except Exception as error:  # noqa: BLE001 - reported to the caller, which retries
            return SendResult(ok=False, error=f"web outbox write failed: {error}", retryable=True)
        return SendResult(ok=True, platform_message_id=f"web-outbox:{outbox_id}")

    def _store(self, message: OutboundMessage) -> int:
        with self.engine.begin() as connection:
            return int(
                connection.execute(
                    insert(WebOutboxMessage)
                    .values(
                        user_id=message.user_id,
                        payload=widget_payload(message),
                        created_at_ms=self.clock(),
                    )
                    .returning(WebOutboxMessage.id)
                ).scalar_one()
            )


def fetch_web_messages(
    engine: Engine, user_id: str, limit: int = 20, now_ms: int | None = None
) -> list[dict[str, Any]]:
    """Hand over the visitor's waiting messages, oldest first, and mark them delivered.

    Each item is the widget reply shape plus ``id`` (``web-outbox:N``, the platform
    message id under which the survey prompt was recorded).
    """
    now_ms = _now_ms() if now_ms is None else now_ms
    waiting = (
        select(WebOutboxMessage.id)
        .where(WebOutboxMessage.user_id == user_id, WebOutboxMessage.delivered_at_ms.is_(None))
        .order_by(WebOutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    statement = (
        update(WebOutboxMessage)
        .where(WebOutboxMessage.id.in_(waiting), WebOutboxMessage.delivered_at_ms.is_(None))
        .values(delivered_at_ms=now_ms)
        .returning(WebOutboxMessage.id, WebOutboxMessage.payload)
    )
    with engine.begin() as connection:
        rows = sorted(connection.execute(statement).all())
    return [{"id": f"web-outbox:{outbox_id}", **payload} for outbox_id, payload in rows]
