"""The chat endpoint that the widget talks to, as a FastAPI router.

Paths, under ``{prefix}/chat``:

- ``GET widget.js`` and ``GET widget.css``: the widget, shipped inside this package.
- ``POST messages``: a visitor's message. It is forwarded to the bot and the replies are
  returned as ``{"conversation_id", "message_id", "replies": [{"text", "buttons"}]}``.
- ``POST events``: a funnel event (``impression`` or ``open``); returns 204.
- ``POST poll``: ``{"visitor_id"}``; returns ``{"replies": [...]}``, the messages waiting
  for the visitor in the web outbox (survey prompts sent after a conversation ended).
  It is a POST because reading marks the messages delivered, and because browsers send
  the ``Origin`` header that the endpoint checks only on POST requests.

With an outbox, responses carry ``poll_seconds``: the widget then polls at that interval
while its page is visible, for an hour after the visitor's last message. Without
``poll_seconds`` (no surveys on the channel) the widget does not poll.

With an ``outbox_engine`` (when surveys run on the web channel), ``POST messages`` also
returns the waiting outbox messages after the bot's replies, and a survey button's payload
is recorded without reaching the bot: the survey answer preprocessor reads it.

Both POST paths accept only ``application/json`` from the allowed site origins. Every
message, reply, touch and exposure goes to the recorder, so no request waits on the
database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from chatmw import events as ev
from chatmw.codecs import ChatReply, ChatRequest
from chatmw.surveys.answers import is_survey_payload
from chatmw.surveys.web import fetch_web_messages
from chatmw.widget.bot import BotClient, BotError
from chatmw.widget.protocol import (
    EventRequest,
    MessageRequest,
    WidgetError,
    _load_object,
    _required_id,
    parse_event_request,
    parse_message_request,
    reply_payload,
    touch_events,
)
from chatmw.widget.ratelimit import TokenBuckets
from chatmw.widget.settings import WidgetSettings

__all__ = ["create_widget_router", "WidgetEndpoint", "EventSink"]

logger = logging.getLogger("chatmw")

# Seconds between the widget's polls of the outbox. A survey prompt reaches an open page
# at most this long after the dispatcher sent it; each poll is one UPDATE statement.
POLL_SECONDS = 10

_STATIC_TYPES = {
    "widget.js": "text/javascript; charset=utf-8",
    "widget.css": "text/css; charset=utf-8",
}
_BOT_ERRORS = {
    "timeout": (504, "bot_timeout", "The assistant took too long to answer."),
    "unavailable": (502, "bot_unavailable", "The assistant is not available right now."),
    "bad_response": (
        502,
        "bot_bad_response",
        "The assistant sent an answer that could not be read.",
    ),
}


class EventSink(Protocol):
    """Where events go: the runtime's recorder, whose ``submit`` never blocks."""

    def submit(self, event: ev.Event) -> bool: ...


class WidgetEndpoint:
    """State shared by the widget's routes: settings, rate limits, the bot client, the sink."""

    def __init__(
        self,
        settings: WidgetSettings,
        sink: EventSink,
        bot_transport: httpx.AsyncBaseTransport | None = None,
        outbox_engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.outbox_engine = outbox_engine
        self.bot = BotClient(settings, transport=bot_transport)
        # NOTE: limits are per visitor id, and the client chooses that id. A client that makes
        # up a new id for each request is bounded only by a per-address limit in a proxy.
        self.message_buckets = TokenBuckets(
            settings.rate_per_minute, settings.rate_burst, settings.max_tracked_visitors
        )
        self.event_buckets = TokenBuckets(
            settings.event_rate_per_minute, settings.event_burst, settings.max_tracked_visitors
        )
        self._rejected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._static = {
            name: resources.files("chatmw.widget").joinpath("static", name).read_bytes()
            for name in _STATIC_TYPES
        }

    # Routes

    async def static_file(self, request: Request) -> Response:
        name = request.url.path.rsplit("/", 1)[-1]
        return Response(
            self._static[name],
            media_type=_STATIC_TYPES[name],
            headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    async def preflight(self, request: Request) -> Response:
        try:
            origin = self._check_origin(request)
        except WidgetError as error:
            return self._reject(error, None, request)
        headers = self._cors_headers(origin)
        headers.update(
            {
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            }
        )
        return Response(status_code=204, headers=headers)

    async def post_message(self, request: Request) -> Response:
        origin = None
        try:
            origin = self._check_origin(request)
            body = await self._read_json_body(request)
            message = parse_message_request(body, self.settings.max_message_chars)
            self._limit(self.message_buckets, message.visitor_id)
        except WidgetError as error:
            return self._reject(error, origin, request)

        received = ev.now_utc()
        user_key = f"{self.settings.channel}:{message.conversation_id}:{message.message_id}"
        self.sink.submit(self._user_message(message, user_key, received))
        for touch in touch_events(message, self.settings.channel, received):
            self.sink.submit(touch)

        if self.outbox_engine is not None and is_survey_payload(message.text):
            # A tapped survey button: the writer's survey preprocessor stores the score.
            answered: dict[str, Any] = {
                "conversation_id": message.conversation_id,
                "message_id": message.message_id,
                "replies": await self._outbox(message.visitor_id),
                "poll_seconds": POLL_SECONDS,
            }
            return JSONResponse(answered, headers=self._cors_headers(origin))

        chat_request = ChatRequest(
            user_id=message.visitor_id,
            text=message.text,
            conversation_id=message.conversation_id,
            channel=self.settings.channel,
            message_id=user_key,
        )
        started = time.perf_counter()
        try:
            replies = await self.bot.ask(chat_request)
        except BotError as error:
            logger.warning(
                "widget bot call failed for conversation %s: %s",
                message.conversation_id,
                error.detail,
            )
            status, code, detail = _BOT_ERRORS[error.kind]
            return self._error_response(WidgetError(status, code, detail), origin)
        latency_ms = (time.perf_counter() - started) * 1000.0

        payloads = self._record_replies(message, user_key, replies, latency_ms)
        payloads += await self._outbox(message.visitor_id)
        content: dict[str, Any] = {
            "conversation_id": message.conversation_id,
            "message_id": message.message_id,
            "replies": payloads,
        }
        if self.outbox_engine is not None:
            content["poll_seconds"] = POLL_SECONDS
        return JSONResponse(content, headers=self._cors_headers(origin))

    async def post_event(self, request: Request) -> Response:
        origin = None
        try:
            origin = self._check_origin(request)
            body = await self._read_json_body(request)
            event = parse_event_request(body)
            self._limit(self.event_buckets, event.visitor_id)
        except WidgetError as error:
            return self._reject(error, origin, request)
        self.sink.submit(self._exposure(event))
        return Response(status_code=204, headers=self._cors_headers(origin))

    async def post_poll(self, request: Request) -> Response:
        origin = None
        try:
            origin = self._check_origin(request)
            body = await self._read_json_body(request)
            visitor_id = _required_id(_load_object(body), "visitor_id")
            self._limit(self.event_buckets, visitor_id)
        except WidgetError as error:
            return self._reject(error, origin, request)
        replies = await self._outbox(visitor_id)
        content = {"replies": replies, "poll_seconds": POLL_SECONDS if self.outbox_engine else 0}
        return JSONResponse(content, headers=self._cors_headers(origin))

    async def _outbox(self, visitor_id: str) -> list[dict[str, Any]]:
        if self.outbox_engine is None:
            return []
        try:
            waiting = await run_in_threadpool(fetch_web_messages, self.outbox_engine, visitor_id)
        except Exception as error:  # noqa: BLE001 - the bot's replies go out without them
            logger.warning("widget outbox read failed for a visitor: %s", type(error).__name__)
            return []
        # Only what the widget draws: the meta names stored survey and conversation ids.
        return [
            {"id": item["id"], "text": item.get("text", ""), "buttons": item.get("buttons", [])}
            for item in waiting
        ]

    # Checks

    def _check_origin(self, request: Request) -> str:
        origin = request.headers.get("origin")
        if origin is None:
            raise WidgetError(
                403,
                "origin_missing",
                "the Origin header is missing; the chat works only from allowed sites",
            )
        if origin not in self.settings.allowed_origins:
            raise WidgetError(
                403, "origin_not_allowed", f"origin {origin!r} is not in the allowed site origins"
            )
        return origin

    async def _read_json_body(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise WidgetError(415, "unsupported_media_type", "send the body as application/json")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise WidgetError(413, "body_too_large", f"request body is larger than {limit} bytes")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks.extend(chunk)
            if len(chunks) > limit:
                raise WidgetError(
                    413, "body_too_large", f"request body is larger than {limit} bytes"
                )
        return bytes(chunks)

    def _limit(self, buckets: TokenBuckets, visitor_id: str) -> None:
        wait = buckets.take(visitor_id)
        if wait > 0:
            retry_after = TokenBuckets.retry_after(wait)
            raise WidgetError(
                429,
                "rate_limited",
                f"too many requests from this visitor; retry in {retry_after} s",
                headers={"Retry-After": retry_after},
            )

    # Responses and events

    def _cors_headers(self, origin: str | None) -> dict[str, str]:
        headers = {"Vary": "Origin", "Cache-Control": "no-store"}
        if origin is not None:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = "Retry-After"
        return headers

    def _reject(self, error: WidgetError, origin: str | None, request: Request) -> Response:
        with self._lock:
            self._rejected[error.error] += 1
            count = self._rejected[error.error]
        # The first rejection of each kind is logged, then every thousandth, so a flood of bad
        # requests stays readable in the log.
        if count == 1 or count % 1000 == 0:
            client = request.client.host if request.client else "unknown"
            logger.info(
                "widget rejected %s %s from %s: %s (%d so far)",
                request.method,
                request.url.path,
                client,
                error.error,
                count,
            )
        return self._error_response(error, origin)

    def _error_response(self, error: WidgetError, origin: str | None) -> Response:
        headers = self._cors_headers(origin)
        headers.update(error.headers)
        return JSONResponse(
            {"error": error.error, "detail": error.detail},
            status_code=error.status,
            headers=headers,
        )

    def _user_message(self, message: MessageRequest, key: str, received: datetime) -> ev.Message:
        meta: dict[str, Any] = {}
        page = _page_path(message.page_url)
        if page:
            meta["page"] = page
        if message.display:
            meta["button_title"] = message.display
        return ev.Message(
            channel=self.settings.channel,
            occurred_at=received,
            key=key,
            role="user",
            user_id=message.visitor_id,
            text=message.text,
            conversation_id=message.conversation_id,
            meta=meta,
        )

    def _record_replies(
        self, message: MessageRequest, user_key: str, replies: list[ChatReply], latency_ms: float
    ) -> list[dict[str, Any]]:
        replied_at = ev.now_utc()
        payloads = []
        for index, reply in enumerate(replies):
            payload = reply_payload(reply)
            if payload is None:
                continue
            payloads.append(payload)
            meta = {"buttons": payload["buttons"]} if payload["buttons"] else {}
            # One millisecond apart, so that stored replies keep the bot's order.
            self.sink.submit(
                ev.Message(
                    channel=self.settings.channel,
                    occurred_at=replied_at + timedelta(milliseconds=index),
                    key=f"{user_key}:reply:{index}",
                    role="bot",
                    user_id=message.visitor_id,
                    text=payload["text"],
                    conversation_id=message.conversation_id,
                    latency_ms=latency_ms,
                    intent=reply.intent,
                    reply_to=user_key,
                    meta=meta,
                )
            )
        self._record_conversation_facts(message, replies, replied_at)
        return payloads

    def _record_conversation_facts(
        self, message: MessageRequest, replies: list[ChatReply], replied_at: datetime
    ) -> None:
        facts: dict[str, Any] = {}
        for reply in replies:
            for name in ("resolved", "handed_off", "ended", "step"):
                value = getattr(reply, name)
                if value is not None:
                    facts[name] = value
        if facts:
            self.sink.submit(
                ev.ConversationUpdate(
                    channel=self.settings.channel,
                    occurred_at=replied_at,
                    user_id=message.visitor_id,
                    conversation_id=message.conversation_id,
                    **facts,
                )
            )

    def _exposure(self, event: EventRequest) -> ev.Exposure:
        meta: dict[str, Any] = {}
        page = _page_path(event.page_url)
        if page:
            meta["page"] = page
        if event.conversation_id:
            meta["conversation_id"] = event.conversation_id
        return ev.Exposure(
            channel=self.settings.channel,
            occurred_at=ev.now_utc(),
            key=f"{self.settings.channel}:{event.kind}:{event.visitor_id}:{event.event_id}",
            user_id=event.visitor_id,
            kind=event.kind,
            meta=meta,
        )


def _page_path(url: str | None) -> str | None:
    # Only the path is kept: query strings can carry personal data (emails, tokens).
    if not url:
        return None
    try:
        path = urlsplit(url).path
    except ValueError:  # an invalid IPv6 host such as "http://[::1"
        return None
    return path[:512] or "/"


def create_widget_router(
    settings: WidgetSettings,
    sink: EventSink,
    bot_transport: httpx.AsyncBaseTransport | None = None,
    outbox_engine: Engine | None = None,
) -> APIRouter:
    """Build the router with the widget's files and endpoints under ``{prefix}/chat``.

    ``sink`` receives every event (pass ``runtime.recorder``). ``bot_transport`` replaces
    the HTTP transport to the bot (``httpx.ASGITransport`` runs a bot app in-process).
    ``outbox_engine`` (the runtime's engine) hands over the survey messages waiting in the
    web outbox; pass it when surveys run on the widget's channel.
    The router's ``widget_endpoint`` attribute is the :class:`WidgetEndpoint`; await its
    ``bot.aclose()`` at shutdown.
    """
    endpoint = WidgetEndpoint(settings, sink, bot_transport, outbox_engine)
    base = settings.chat_path
    router = APIRouter()
    for name in _STATIC_TYPES:
        router.add_api_route(
            f"{base}/{name}", endpoint.static_file, methods=["GET"], include_in_schema=False
        )
    router.add_api_route(
        f"{base}/messages",
        endpoint.post_message,
        methods=["POST"],
        summary="Send a visitor's message to the bot and return the replies",
    )
    router.add_api_route(
        f"{base}/events",
        endpoint.post_event,
        methods=["POST"],
        summary="Record a widget impression or open",
        status_code=204,
    )
    router.add_api_route(
        f"{base}/poll",
        endpoint.post_poll,
        methods=["POST"],
        summary="Return the messages waiting for a visitor (survey prompts)",
    )
    for path in ("messages", "events", "poll"):
        router.add_api_route(
            f"{base}/{path}", endpoint.preflight, methods=["OPTIONS"], include_in_schema=False
        )
    router.widget_endpoint = endpoint  # type: ignore[attr-defined]
    return router
