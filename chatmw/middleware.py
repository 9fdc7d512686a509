"""ASGI middleware that records a wrapped bot's chat exchanges.

``ChatMetricsMiddleware`` sits in front of any ASGI bot (FastAPI, Starlette, plain ASGI).
For each request to a chat endpoint it copies the request body as the bot reads it and the
response body as the bot sends it, and it times the reply. Once the response is complete,
it hands both bodies to the recorder as one :class:`chatmw.exchange.Exchange`, undecoded:
the codec reads them when the batch is written, off the bot's event loop (and, with the
writer process, off its interpreter). It never touches the database and never changes
what the bot receives or returns: the bot gets the very message objects the server sent,
the server gets the very messages the bot sent, and each one is forwarded at once.
"""

from __future__ import annotations

import logging
import time
import itertools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chatmw import events as ev
from chatmw.codecs import Codec
from chatmw.exchange import Exchange, ExchangeDecoder
from chatmw.recorder import Recorder

__all__ = ["ChatMetricsMiddleware", "DEFAULT_MAX_BODY_BYTES"]

logger = logging.getLogger("chatmw")

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The largest body copied: a larger request is not recorded, a larger response is recorded
# without its text. Both are passed to the bot and the server unchanged.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


@dataclass(slots=True)
class _Exchange:
    """The state of one exchange, built per call so that concurrent requests never share it."""

    arrived_at: datetime
    started: float
    max_body_bytes: int
    request_chunks: list[bytes] = field(default_factory=list)
    request_size: int = 0
    request_complete: bool = False
    request_too_large: bool = False
    status: int | None = None
    content_type: bytes = b""
    content_encoding: bytes = b""
    response_chunks: list[bytes] = field(default_factory=list)
    response_size: int = 0
    response_too_large: bool = False
    streaming: bool = False
    finished: float | None = None

    def on_request(self, message: ASGIMessage) -> None:
        if message["type"] != "http.request" or self.request_complete:
            return
        body = message.get("body", b"")
        self.request_complete = not message.get("more_body", False)
        if self.request_too_large:
            return
        self.request_size += len(body)
        if self.request_size > self.max_body_bytes:
            self.request_too_large = True
            self.request_chunks.clear()
            return
        self.request_chunks.append(bytes(body))

    def on_response(self, message: ASGIMessage, timer: Callable[[], float]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._on_start(message)
        elif kind == "http.response.body":
            self._on_body(message, timer)
        elif kind == "http.response.pathsend":
            # A file sent by the server (ASGI path send extension): the body never passes here.
            self.response_too_large = True
            self.finished = timer()

    def _on_start(self, message: ASGIMessage) -> None:
        self.status = message["status"]
        for name, value in message.get("headers", ()):
            lowered = bytes(name).lower()
            if lowered == b"content-type":
                self.content_type = bytes(value).lower()
            elif lowered == b"content-encoding":
                self.content_encoding = bytes(value).lower().strip()
        self.streaming = self.content_type.startswith(b"text/event-stream")

    def _on_body(self, message: ASGIMessage, timer: Callable[[], float]) -> None:
        if self.finished is not None:
            return
        if not message.get("more_body", False):
            self.finished = timer()
        if self.streaming or self.response_too_large:
            return
        body = message.get("body", b"")
        self.response_size += len(body)
        if self.response_size > self.max_body_bytes:
            self.response_too_large = True
            self.response_chunks.clear()
            return
        self.response_chunks.append(bytes(body))


class ChatMetricsMiddleware:
    """Record the chat exchanges of a wrapped ASGI bot.

    ``app`` is the bot; ``recorder`` receives the events; ``codec`` reads the user's message
    from the request body and the bot's replies from the response body. ``paths`` are the
    chat endpoints (exact paths; ``None`` means every path) and ``methods`` the methods
    recorded there. ``exclude_paths`` are path prefixes never recorded. ``channel`` names
    the channel when the codec gives none. ``record_text`` set to false stores messages
    without their text. ``max_body_bytes`` caps each body copy: a larger request is not
    recorded, and a larger response is recorded without its text. ``clock`` returns the
    wall-clock arrival time (aware) and ``timer`` a monotonic time in seconds, from which
    each reply's latency is measured.

    Everything else passes through untouched: non-HTTP scopes (websocket, lifespan),
    excluded and non-chat paths. Errors inside chatmw are logged on the ``chatmw`` logger,
    counted in ``errors`` and swallowed; the bot's own exceptions propagate unchanged.
    Exchanges left unrecorded for an expected reason (a body that is not a chat message,
    a full recorder queue) are counted in ``skipped``; a body the codec cannot read is
    counted there when the batch is written in this process (with the writer process, it
    is counted and logged in that process).
    """

    def __init__(
        self,
        app: ASGIApp,
        recorder: Recorder,
        codec: Codec,
        *,
        paths: Iterable[str] | None = None,
        methods: Iterable[str] = ("POST",),
        exclude_paths: Iterable[str] = (),
        channel: str = "web",
        record_text: bool = True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], datetime] = ev.now_utc,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.codec = codec
        self.paths = None if paths is None else frozenset(_checked_paths(paths, "paths"))
        self.methods = frozenset(method.upper() for method in methods)
        self.exclude_paths = tuple(_checked_paths(exclude_paths, "exclude_paths"))
        if not channel:
            raise ValueError("channel must not be empty")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.channel = channel
        self.record_text = record_text
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.timer = timer
        self.errors: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.decoder = ExchangeDecoder(codec, channel=channel, record_text=record_text,
                                       max_body_bytes=max_body_bytes, skipped=self.skipped)
        # Keys of user messages without a message id: unique per middleware and request.
        self._key_prefix = f"{uuid.uuid4().hex}:"
        self._serial = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._is_chat_request(scope):
            await self.app(scope, receive, send)
            return

        exchange = self._start_exchange()
        if exchange is None:
            await self.app(scope, receive, send)
            return

        # The copies run for every message of every chat request: plain try blocks here,
        # because a context manager per message costs more than the copy itself.
        async def receive_and_copy() -> ASGIMessage:
            message = await receive()
            try:
                exchange.on_request(message)
            except Exception as error:  # noqa: BLE001 - never change the bot's request
                self._failed("request_copy", error)
            return message

        async def send_and_copy(message: ASGIMessage) -> None:
            try:
                exchange.on_response(message, self.timer)
            except Exception as error:  # noqa: BLE001 - never change the bot's response
                self._failed("response_copy", error)
            await send(message)

        try:
            await self.app(scope, receive_and_copy, send_and_copy)
        finally:
            # Runs once the bot has returned or raised, so after its response went out. The
            # bot's exception, if any, propagates unchanged after this block.
            try:
                self._record(exchange)
            except Exception as error:  # noqa: BLE001 - never change the bot's response
                self._failed("record", error)

    def _is_chat_request(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if self.exclude_paths and any(path == prefix or path.startswith(prefix.rstrip("/") + "/")
                                      for prefix in self.exclude_paths):
            return False
        if self.paths is not None and path not in self.paths:
            return False
        return scope.get("method", "").upper() in self.methods

    def _start_exchange(self) -> _Exchange | None:
        try:
            return _Exchange(arrived_at=self.clock(), started=self.timer(),
                             max_body_bytes=self.max_body_bytes)
        except Exception as error:  # noqa: BLE001 - the exchange passes through unrecorded
            self._failed("clock", error)
            return None

    # Recording: runs after the bot has returned or raised. It only hands the copied bodies
    # to the recorder; the decoder reads them when the batch is written.

    def _record(self, exchange: _Exchange) -> None:
        if exchange.status is not None and 400 <= exchange.status < 500:
            return  # The bot rejected the request: it was not a chat message.
        if not exchange.request_complete or exchange.request_too_large:
            reason = "request_too_large" if exchange.request_too_large else "request_incomplete"
            self._count_skip(reason)
            return
        finished = exchange.finished
        if exchange.streaming:
            state = "streamed"
        elif exchange.response_too_large:
            state = "too_large"
        elif finished is None:
            state = "unfinished"
        else:
            state = "complete"
        captured = Exchange(
            channel=self.channel,
            occurred_at=exchange.arrived_at,
            key=f"asgi:{self._key_prefix}{next(self._serial)}",
            decoder=self.decoder,
            request=b"".join(exchange.request_chunks),
            response=b"".join(exchange.response_chunks) if state == "complete" else b"",
            status=exchange.status,
            latency_ms=None if finished is None else (finished - exchange.started) * 1000.0,
            response_state=state,
            content_encoding=exchange.content_encoding,
        )
        if not self.recorder.submit(captured):
            self._count_skip("recorder_rejected")

    # Errors of our own: logged with counts and error types, never with message text.

    def _failed(self, step: str, error: Exception) -> None:
        self.errors[step] += 1
        count = self.errors[step]
        if count == 1 or count % 1000 == 0:
            logger.error("chat middleware step %s failed (%s), so the exchange was not "
                         "recorded; %d failures of this step so far",
                         step, type(error).__name__, count)

    def _count_skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        count = self.skipped[reason]
        if count == 1 or count % 1000 == 0:
            logger.warning("chat middleware skipped an exchange (%s), %d so far", reason, count)


def _checked_paths(paths: Iterable[str], name: str) -> list[str]:
    if isinstance(paths, str):
        raise ValueError(f"{name} must be a list of paths, got the string {paths!r}")
    checked = list(paths)
    for path in checked:
        if not path.startswith("/"):
            raise ValueError(f"{name} entries must start with '/', got {path!r}")
    return checked
