"""In-process recording of Meta webhooks for a Python bot's own ASGI app.

``MetaWebhookMiddleware`` wraps the bot's app. For a ``POST`` to the webhook path it reads
the body (up to ``max_body_bytes``), checks its signature, records its events, and then
hands the bot the very same request: the same ``http.request`` messages, in order. The
bot's response is never changed, so the bot keeps its own signature check and its own
acknowledgement. Record the bot's sends with :mod:`chatmw.adapters.httpx_hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.concurrency import run_in_threadpool

from chatmw.adapters import messenger
from chatmw.adapters._meta import BodyTooLarge, MetaSettings, WebhookStats, read_body
from chatmw.adapters.webhook import EventSink, WebhookIntake, header_value

__all__ = ["MetaWebhookMiddleware"]

logger = logging.getLogger("chatmw")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MetaWebhookMiddleware:
    """Records Messenger and WhatsApp webhooks on their way into a Python bot.

    ``sink`` is usually ``runtime.recorder``; pass ``runtime`` instead to also register the
    Messenger watermark handler on its writer. A body with a wrong signature or over the
    size limit is passed to the bot unrecorded; the bot decides how to respond.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: MetaSettings,
        sink: EventSink | None = None,
        runtime: Any = None,
        path: str | None = None,
        stats: WebhookStats | None = None,
    ) -> None:
        if runtime is not None:
            sink = runtime.recorder
        if sink is None:
            raise ValueError("MetaWebhookMiddleware needs a sink or a runtime to record events")
        messenger.register_sink_handlers(sink)
        self.app = app
        self.settings = settings
        self.path = path or settings.webhook_path
        self.stats = stats or WebhookStats()
        self.intake = WebhookIntake(settings, sink, self.stats)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        try:
            body, received = await read_body(receive, self.settings.max_body_bytes)
        except BodyTooLarge as error:
            self.stats.add("too_large")
            logger.warning("webhook not recorded: body larger than %d bytes", error.limit)
            received = error.received
        except ConnectionError:
            received = [{"type": "http.disconnect"}]
        else:
            await self._record(body, scope)
        await self.app(scope, _replay(received, receive), send)

    async def _record(self, body: bytes, scope: Scope) -> None:
        try:
            signature = header_value(scope.get("headers", []), b"x-hub-signature-256")
            if self.settings.durable_acknowledgement:
                # A durable submit waits for an fsync of the spool: keep it off the event loop.
                outcome = await run_in_threadpool(self.intake.receive, body, signature)
            else:
                outcome = self.intake.receive(body, signature)
        except Exception:  # noqa: BLE001 - recording must never reach the bot
            logger.exception("recording a webhook failed; the bot still receives it")
            return
        if outcome.status == 503:
            logger.warning("webhook passed to the bot but not recorded: recorder busy")


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        # Hand back what was already read, then continue with the server's own receive
        # (the rest of an oversized body, then the disconnect).
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
