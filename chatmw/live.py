"""Live figures as a server-sent events stream (``text/event-stream``).

``GET {prefix}/live`` sends a ``snapshot`` event at once and then every ``interval``
seconds: conversations active in the last ``active_minutes``, message rates and the median
response time of the last five minutes. Each event's ``data`` is one line of JSON. The
stream ends when the client disconnects, or after ``count`` events when that is given.
See https://html.spec.whatwg.org/multipage/server-sent-events.html for the format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import Engine, and_, func, select
from starlette.concurrency import run_in_threadpool

from chatmw.events import from_ms
from chatmw.metrics.stats import percentile_cont
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message

__all__ = ["create_live_router", "live_snapshot", "LiveStreams", "MIN_INTERVAL_S", "MAX_INTERVAL_S"]

logger = logging.getLogger("chatmw")

# Bounds of the ``interval`` between events, in seconds, and of ``active_minutes``.
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 60.0
MAX_ACTIVE_MINUTES = 24 * 60
# The window of the message rate and of the recent response time.
RECENT_MINUTES = 5


def live_snapshot(
    engine: Engine, now_ms: int, active_minutes: float, channels: Sequence[str] = ()
) -> dict[str, Any]:
    """Compute the live figures at ``now_ms``.

    A conversation is active when it has not ended and its last dialogue message is at most
    ``active_minutes`` old. Messages and answers are counted by their own time in the last
    :data:`RECENT_MINUTES` minutes (up to ``now_ms``, inclusive). Survey prompts and
    answers and reactions count for neither.
    """
    active_since = now_ms - int(active_minutes * 60_000)
    recent_since = now_ms - RECENT_MINUTES * 60_000
    minute_since = now_ms - 60_000
    dialogue = Message.kind.not_in(UNTIMED_KINDS)
    # Survey prompts come after a conversation ends, so activity is judged on dialogue
    # messages, not on the conversation's last_message_at_ms.
    active = (
        select(func.count(func.distinct(Message.conversation_id)))
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.occurred_at_ms >= active_since,
            Message.occurred_at_ms <= now_ms,
            dialogue,
            Conversation.ended_at_ms.is_(None),
        )
    )
    recent = and_(Message.occurred_at_ms > recent_since, Message.occurred_at_ms <= now_ms, dialogue)
    messages = select(Message.occurred_at_ms, Message.response_ms).where(recent)
    if channels:
        active = active.where(Message.channel.in_(channels))
        messages = messages.where(Message.channel.in_(channels))
    with engine.connect() as connection:
        active_count = int(connection.execute(active).scalar_one())
        rows = connection.execute(messages).all()

    responses = sorted(float(response) for _, response in rows if response is not None)
    p50 = percentile_cont(responses, 0.5)
    return {
        "at": from_ms(now_ms).isoformat(),
        "active_conversations": active_count,
        "active_minutes": active_minutes,
        "messages_last_minute": sum(1 for at, _ in rows if at > minute_since),
        "messages_per_minute": round(len(rows) / RECENT_MINUTES, 2),
        "response_time_p50": None if p50 is None else round(p50 / 1000, 3),
        "responses": len(responses),
        "recent_minutes": RECENT_MINUTES,
    }


@dataclass
class LiveStreams:
    """The streams a live router has open, for shutdown checks and tests."""

    open: int = 0
    started: int = 0
    rejected: int = 0


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _invalid(param: str, message: str) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": ["query", param], "msg": message, "type": "value_error"}]},
    )


async def _watch_disconnect(request: Request, disconnected: asyncio.Event) -> None:
    # Starlette's StreamingResponse (1.x) listens for the disconnect itself only under ASGI
    # spec versions before 2.4; from 2.4 on it notices only when a write fails, up to one
    # ``interval`` later. This task ends the wait as soon as the client goes, either way.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def _stream(
    request: Request,
    engine: Engine,
    streams: LiveStreams,
    interval: float,
    active_minutes: float,
    channels: tuple[str, ...],
    count: int | None,
) -> AsyncIterator[bytes]:
    streams.open += 1
    streams.started += 1
    sent = 0
    disconnected = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, disconnected))
    logger.debug("live: stream opened (%d open)", streams.open)
    try:
        # The retry field sets how long the browser's EventSource waits before it reconnects.
        yield f"retry: {int(interval * 1000)}\n\n".encode()
        while count is None or sent < count:
            now_ms = int(time.time() * 1000)
            snapshot = await run_in_threadpool(
                live_snapshot, engine, now_ms, active_minutes, channels
            )
            yield _event("snapshot", snapshot)
            sent += 1
            if count is not None and sent >= count:
                break
            try:
                await asyncio.wait_for(disconnected.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
    finally:
        watcher.cancel()
        streams.open -= 1
        logger.debug("live: stream closed after %d events (%d open)", sent, streams.open)


def create_live_router(
    engine: Engine,
    prefix: str = "/metrics",
    dependencies: Sequence[Any] = (),
    default_interval: float = 5.0,
    default_active_minutes: float = 5.0,
    max_streams: int = 100,
) -> APIRouter:
    """Build the router of ``GET {prefix}/live``; ``router.live_streams`` counts open streams.

    Each open stream queries the store every ``interval`` seconds, so a request beyond
    ``max_streams`` open streams gets HTTP 503 with ``Retry-After``.
    """
    if max_streams < 1:
        raise ValueError(f"max_streams must be at least 1, got {max_streams}")
    if not MIN_INTERVAL_S <= default_interval <= MAX_INTERVAL_S:
        raise ValueError(
            f"default_interval must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S} "
            f"seconds, got {default_interval}"
        )
    if not 0 < default_active_minutes <= MAX_ACTIVE_MINUTES:
        raise ValueError(
            f"default_active_minutes must be above 0 and at most {MAX_ACTIVE_MINUTES}, "
            f"got {default_active_minutes}"
        )
    router = APIRouter(
        prefix=prefix,
        tags=["metrics"],
        dependencies=[Depends(dep) if callable(dep) else dep for dep in dependencies],
    )
    streams = LiveStreams()
    router.live_streams = streams  # type: ignore[attr-defined]

    @router.get(
        "/live",
        summary="Live figures as server-sent events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}},
            422: {"description": "An invalid parameter, named in `detail[0].loc`."},
            503: {"description": "Too many open streams; retry after `Retry-After` seconds."},
        },
    )
    async def live(
        request: Request,
        interval: float = Query(
            default_interval,
            description=f"Seconds between events ({MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}).",
        ),
        active_minutes: float = Query(
            default_active_minutes,
            description="A conversation is active when its "
            f"last message is at most this many minutes old (up to {MAX_ACTIVE_MINUTES}).",
        ),
        channel: str | None = Query(None, description="Only these channels (comma-separated)."),
        count: int | None = Query(
            None, description="Close the stream after this many events (1 to 100000)."
        ),
    ) -> Any:
        if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
            return _invalid(
                "interval", f"must be between {MIN_INTERVAL_S:g} and {MAX_INTERVAL_S:g} seconds"
            )
        if not 0 < active_minutes <= MAX_ACTIVE_MINUTES:
            return _invalid("active_minutes", f"must be above 0 and at most {MAX_ACTIVE_MINUTES}")
        if count is not None and not 1 <= count <= 100_000:
            return _invalid("count", "must be between 1 and 100000")
        channels = tuple(part.strip() for part in (channel or "").split(",") if part.strip())
        # NOTE: streams count as open once their first event is produced, so requests that
        # arrive together may exceed max_streams by a few.
        if streams.open >= max_streams:
            streams.rejected += 1
            logger.warning(
                "live: rejected a stream, %d already open (%d rejected so far)",
                streams.open,
                streams.rejected,
            )
            return JSONResponse(
                status_code=503,
                content={"detail": f"too many live streams open (max {max_streams}); retry later"},
                headers={"Retry-After": str(int(interval))},
            )
        return StreamingResponse(
            _stream(request, engine, streams, interval, active_minutes, channels, count),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
