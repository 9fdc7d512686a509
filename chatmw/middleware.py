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

import functools
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from chatmw.codecs import Codec
from chatmw.exchange import ExchangeDecoder, captured_exchange
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
# The default clock: chatmw.events.now_utc without its Python frame, because it runs for
# every chat request on the bot's event loop.
_utc_now = functools.partial(datetime.now, UTC)


class _Capture:
    """The copies of one exchange, built per call so that concurrent requests never share them.

    ``receive`` and ``send`` stand in for the server's callables: each copies what passes and
    forwards the very same message at once. The copy steps are inlined rather than split
    into helpers, because they run for every message of every chat request on the bot's
    event loop, where each Python call counts.
    """

    __slots__ = ("middleware", "downstream_receive", "downstream_send", "arrived_at", "started",
                 "max_body_bytes", "request_chunks", "request_size", "request_complete",
                 "request_too_large", "status", "content_type", "content_encoding",
                 "response_chunks", "response_size", "response_too_large", "streaming",
                 "finished", "copy_failed")

    def __init__(self, middleware: ChatMetricsMiddleware, receive: Receive, send: Send,
                 arrived_at: datetime, started: float) -> None:
        self.middleware = middleware
        self.downstream_receive = receive
        self.downstream_send = send
        self.arrived_at = arrived_at
        self.started = started
        self.max_body_bytes = middleware.max_body_bytes
        self.request_chunks: list[bytes] = []
        self.request_size = 0
        self.request_complete = False
        self.request_too_large = False
        self.status: int | None = None
        self.content_type = b""
        self.content_encoding = b""
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self.response_too_large = False
        self.streaming = False
        self.finished: float | None = None
        # Set when a copy step failed: the exchange is then not recorded, as the log states.
        self.copy_failed = False

    async def receive(self) -> ASGIMessage:
        message = await self.downstream_receive()
        if self.request_complete:
            return message
        try:
            if message["type"] == "http.request":
                body = message.get("body", b"")
                self.request_complete = not message.get("more_body", False)
                if not self.request_too_large:
                    if body.__class__ is not bytes:
                        # A bytes body is kept as is, since it cannot change. Another type is
                        # copied through a memoryview, which rejects a str or an int.
                        body = bytes(memoryview(body))
                    self.request_size += len(body)
                    if self.request_size > self.max_body_bytes:
                        self.request_too_large = True
                        self.request_chunks.clear()
                    else:
                        self.request_chunks.append(body)
        except Exception as error:  # noqa: BLE001 - never change the bot's request
            self.copy_failed = True
            self.middleware._failed("request_copy", error)
        return message

    async def send(self, message: ASGIMessage) -> None:
        # A coroutine, so the copy is taken when the bot awaits the send, as the server reads
        # the message then: a body changed or a send cancelled before it runs is not recorded.
        try:
            kind = message["type"]
            if kind == "http.response.body":
                if self.finished is None:
                    if not message.get("more_body", False):
                        self.finished = self.middleware.timer()
                    if not (self.streaming or self.response_too_large):
                        body = message.get("body", b"")
                        if body.__class__ is not bytes:
                            body = bytes(memoryview(body))  # as in receive
                        self.response_size += len(body)
                        if self.response_size > self.max_body_bytes:
                            self.response_too_large = True
                            self.response_chunks.clear()
                        else:
                            self.response_chunks.append(body)
            elif kind == "http.response.start":
                self.status = message["status"]
                for name, value in message.get("headers", ()):
                    # Only content-type (12 bytes) and content-encoding (16) are read: the
                    # length test skips lowering every other header.
                    if len(name) not in (12, 16):
                        continue
                    lowered = (name if name.__class__ is bytes
                               else bytes(memoryview(name))).lower()
                    if lowered == b"content-type":
                        self.content_type = (value if value.__class__ is bytes
                                             else bytes(memoryview(value))).lower()
                    elif lowered == b"content-encoding":
                        self.content_encoding = (value if value.__class__ is bytes
                                                 else bytes(memoryview(value))).lower().strip()
                self.streaming = self.content_type.startswith(b"text/event-stream")
            elif kind == "http.response.pathsend":
                # A file sent by the server (ASGI path send extension): the body never
                # passes here.
                self.response_too_large = True
                self.finished = self.middleware.timer()
        except Exception as error:  # noqa: BLE001 - never change the bot's response
            self.copy_failed = True
            self.middleware._failed("response_copy", error)
        await self.downstream_send(message)


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
        clock: Callable[[], datetime] = _utc_now,
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

        try:
            capture = _Capture(self, receive, send, self.clock(), self.timer())
        except Exception as error:  # noqa: BLE001 - the exchange passes through unrecorded
            self._failed("clock", error)
            await self.app(scope, receive, send)
            return

        try:
            await self.app(scope, capture.receive, capture.send)
        finally:
            # Runs once the bot has returned or raised, so after its response went out. The
            # bot's exception, if any, propagates unchanged after this block.
            try:
                self._record(capture)
            except Exception as error:  # noqa: BLE001 - never change the bot's response
                self._failed("record", error)

    def _is_chat_request(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if self.paths is not None and path not in self.paths:
            return False
        if self.exclude_paths and any(path == prefix or path.startswith(prefix.rstrip("/") + "/")
                                      for prefix in self.exclude_paths):
            return False
        method = scope.get("method", "")
        return method in self.methods or method.upper() in self.methods

    # Recording: runs after the bot has returned or raised. It only hands the copied bodies
    # to the recorder; the decoder reads them when the batch is written.

    def _record(self, exchange: _Capture) -> None:
        if exchange.copy_failed:
            return  # Counted in errors and logged when the copy failed.
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
        captured = captured_exchange(
            self.channel,
            exchange.arrived_at,
            f"asgi:{self._key_prefix}{next(self._serial)}",
            self.decoder,
            b"".join(exchange.request_chunks),
            b"".join(exchange.response_chunks) if state == "complete" else b"",
            exchange.status,
            None if finished is None else (finished - exchange.started) * 1000.0,
            state,
            exchange.content_encoding,
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
