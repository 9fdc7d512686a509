"""The ASGI middleware: pass-through first, then what it records."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import pickle
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from chatmw import events as ev
from chatmw.codecs import JsonCodec, RasaCodec
from chatmw.exchange import (
    EXCHANGE_PARTS,
    Exchange,
    ExchangeDecoder,
    captured_exchange,
    expand_all,
)
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.store import models
from chatmw.store.writer import Writer, WriterSettings

CODEC = JsonCodec(
    conversation_id_path="conversation_id",
    message_id_path="message_id",
    replies_path="replies",
    reply_intent_path="intent",
    reply_resolved_path="resolved",
    reply_handed_off_path="handed_off",
    reply_ended_path="ended",
    reply_step_path="step",
)
BOT_DELAY_S = 0.03
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class BotFailure(Exception):
    """The bot's own error, which must reach the server unchanged."""


class CollectingRecorder:
    """A recorder that keeps submitted events in a list, chat exchanges decoded as a writer does."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self.exchanges: list[Exchange] = []

    def submit(self, event: ev.Event) -> bool:
        if isinstance(event, Exchange):
            self.exchanges.append(event)
        self.events.extend(expand_all([event]))
        return True

    def messages(self) -> list[ev.Message]:
        return [event for event in self.events if isinstance(event, ev.Message)]


class FailingRecorder:
    def submit(self, event: ev.Event) -> bool:
        raise RuntimeError("recorder is broken")


class FailingCodec:
    def decode_request(self, body: bytes) -> Any:
        raise RuntimeError("codec is broken")

    def decode_response(self, body: bytes, request: Any) -> Any:
        raise RuntimeError("codec is broken")

    def encode_request(self, request: Any) -> bytes:
        raise RuntimeError("codec is broken")


# A Starlette bot with one route per kind of response.

def make_bot(delay_s: float = 0.0) -> tuple[Starlette, dict[str, Any]]:
    seen: dict[str, Any] = {"bodies": [], "background": 0, "startup": 0, "shutdown": 0}

    async def chat(request: Request) -> Response:
        body = await request.body()
        seen["bodies"].append(body)
        if delay_s:
            await asyncio.sleep(delay_s)
        document = json.loads(body)
        reply = {"text": f"You said {document['message']}", "intent": "echo"}
        if document["message"] == "thanks":
            reply.update(resolved=True, ended=True, step="done")
        return JSONResponse({"replies": [reply]})

    async def raw(request: Request) -> Response:
        body = await request.body()
        seen["bodies"].append(body)
        return Response(body, media_type="application/octet-stream")

    async def reject(request: Request) -> Response:
        await request.body()
        return JSONResponse({"detail": "invalid message"}, status_code=422)

    async def stream(request: Request) -> Response:
        await request.body()

        async def events() -> Any:
            for index in range(5):
                yield f"data: token {index}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def background(request: Request) -> Response:
        await request.body()

        def note() -> None:
            seen["background"] += 1

        return JSONResponse({"replies": [{"text": "later"}]}, background=BackgroundTask(note))

    async def fail(request: Request) -> Response:
        await request.body()
        raise BotFailure("the bot failed")

    async def gzipped(request: Request) -> Response:
        await request.body()
        body = gzip.compress(json.dumps({"replies": [{"text": "packed"}]}).encode())
        return Response(body, media_type="application/json", headers={"content-encoding": "gzip"})

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(text[::-1])
        await websocket.close()

    async def lifespan(app: Starlette) -> Any:
        seen["startup"] += 1
        yield
        seen["shutdown"] += 1

    routes = [
        Route("/chat", chat, methods=["POST"]),
        Route("/raw", raw, methods=["POST"]),
        Route("/reject", reject, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/background", background, methods=["POST"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/gzip", gzipped, methods=["POST"]),
        Route("/internal/chat", chat, methods=["POST"]),
        WebSocketRoute("/ws", socket),
    ]
    return Starlette(routes=routes, lifespan=asynccontextmanager(lifespan)), seen


def wrap(app: Any, recorder: Any = None, codec: Any = CODEC,
         **options: Any) -> ChatMetricsMiddleware:
    options.setdefault("paths", ["/chat", "/raw", "/reject", "/stream", "/background", "/fail",
                                 "/gzip", "/internal/chat"])
    return ChatMetricsMiddleware(app, recorder or CollectingRecorder(), codec, **options)


# A raw ASGI harness: the exact message objects in and out, with no HTTP client between.

def http_scope(path: str, method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }


def request_messages(*chunks: bytes) -> list[dict[str, Any]]:
    return [{"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
            for index, chunk in enumerate(chunks)]


async def run_http(app: Any, path: str, *chunks: bytes,
                   on_send: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    incoming = iter(request_messages(*chunks))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        try:
            return next(incoming)
        except StopIteration:
            await asyncio.sleep(3600)  # A real server waits for the disconnect.
            raise

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if on_send is not None:
            on_send(message)

    await app(http_scope(path), receive, send)
    return sent


def exchange(app: Any, path: str, *chunks: bytes) -> list[dict[str, Any]]:
    return asyncio.run(run_http(app, path, *chunks))


def chat_body(message: str, **fields: Any) -> bytes:
    return json.dumps({"user_id": "u-1", "message": message, **fields}).encode()


# Pass-through

@pytest.mark.parametrize("path", ["/chat", "/reject", "/stream", "/background", "/gzip"])
def test_response_identical_with_and_without(path: str) -> None:
    bare, _ = make_bot()
    wrapped_bot, seen = make_bot()
    middleware = wrap(wrapped_bot)

    expected = exchange(bare, path, chat_body("hello"))
    actual = exchange(middleware, path, chat_body("hello"))

    assert actual == expected
    assert [type(message["type"]) for message in actual] == [str] * len(expected)
    assert middleware.errors == {}
    if path == "/background":
        assert seen["background"] == 1


def test_response_messages_are_same_objects() -> None:
    sent_by_bot: list[dict[str, Any]] = []

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        for message in ({"type": "http.response.start", "status": 200, "headers": []},
                        {"type": "http.response.body", "body": b'{"replies": []}'}):
            sent_by_bot.append(message)
            await send(message)

    sent = exchange(wrap(bot), "/chat", chat_body("hi"))

    assert len(sent) == 2
    assert all(out is made for out, made in zip(sent, sent_by_bot, strict=True))


@pytest.mark.parametrize("chunks", [
    ("Grüße 👋🏽 — ça va ?".encode(),),
    (b'{"user_id": "u-1", "message": ',),
    (b"\xff\xfe not utf-8",),
    (b"",),
    (b'{"user_id": "u-1", ', "\"message\": \"emoji 🎉\"}".encode()),
], ids=["emoji", "invalid-json", "invalid-utf8", "empty", "two-chunks"])
def test_bot_receives_exact_request_messages(chunks: tuple[bytes, ...]) -> None:
    received: list[dict[str, Any]] = []

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    originals = request_messages(*chunks)
    middleware = wrap(bot)

    async def run() -> None:
        incoming = iter(originals)

        async def receive() -> dict[str, Any]:
            return next(incoming)

        async def send(message: dict[str, Any]) -> None:
            pass

        await middleware(http_scope("/chat"), receive, send)

    asyncio.run(run())

    assert len(received) == len(originals)
    assert all(got is original for got, original in zip(received, originals, strict=True))
    assert b"".join(m["body"] for m in received) == b"".join(chunks)
    assert middleware.errors == {}


def test_starlette_bot_reads_exact_bytes() -> None:
    bot, seen = make_bot()
    body = "🙂 not json at all \x00".encode()

    sent = exchange(wrap(bot), "/raw", body)

    assert seen["bodies"] == [body]
    assert sent[-1]["body"] == body


def test_streaming_chunks_forwarded_immediately() -> None:
    forwarded = 0
    produced: list[int] = []

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index in range(4):
            produced.append(index)
            await send({"type": "http.response.body", "body": f"data: {index}\n\n".encode(),
                        "more_body": True})
            # The server must already hold chunk ``index`` before the bot goes on.
            assert forwarded == index + 1
        await send({"type": "http.response.body", "body": b""})

    def count(message: dict[str, Any]) -> None:
        nonlocal forwarded
        if message["type"] == "http.response.body" and message.get("more_body"):
            forwarded += 1

    recorder = CollectingRecorder()
    asyncio.run(run_http(wrap(bot, recorder), "/chat", chat_body("stream please"), on_send=count))

    assert produced == [0, 1, 2, 3]
    assert forwarded == 4
    bot_messages = [m for m in recorder.messages() if m.role == "bot"]
    assert len(bot_messages) == 1
    assert bot_messages[0].text is None
    assert bot_messages[0].meta == {"body": "streamed"}


async def run_scope(app: Any, scope: dict[str, Any],
                    incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = iter(incoming)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def websocket_scope() -> dict[str, Any]:
    return {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": "/ws",
            "raw_path": b"/ws", "query_string": b"", "root_path": "", "headers": [],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "subprotocols": []}


def websocket_messages() -> list[dict[str, Any]]:
    return [{"type": "websocket.connect"},
            {"type": "websocket.receive", "text": "hello"},
            {"type": "websocket.disconnect", "code": 1000}]


def test_websocket_passes_through() -> None:
    bare, _ = make_bot()
    wrapped_bot, _ = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(wrapped_bot, recorder, paths=None, methods=["POST", "GET"])

    expected = asyncio.run(run_scope(bare, websocket_scope(), websocket_messages()))
    actual = asyncio.run(run_scope(middleware, websocket_scope(), websocket_messages()))

    assert {"type": "websocket.send", "text": "olleh"} in actual
    assert actual == expected
    assert recorder.events == []


def test_lifespan_passes_through() -> None:
    bot, seen = make_bot()
    middleware = wrap(bot, paths=None)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    sent = asyncio.run(run_scope(middleware, scope, [{"type": "lifespan.startup"},
                                                     {"type": "lifespan.shutdown"}]))

    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert seen["startup"] == 1
    assert seen["shutdown"] == 1


def test_excluded_and_other_paths_not_recorded() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder, paths=None, exclude_paths=["/internal"])

    exchange(middleware, "/internal/chat", chat_body("secret"))
    assert recorder.events == []

    only_chat = wrap(bot, recorder, paths=["/chat"])
    exchange(only_chat, "/raw", chat_body("not a chat path"))
    assert recorder.events == []

    exchange(middleware, "/chat", chat_body("recorded"))
    assert [m.role for m in recorder.messages()] == ["user", "bot"]


def test_get_requests_not_recorded() -> None:
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder, paths=["/chat"])

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            pass

        await middleware(http_scope("/chat", method="GET"), receive, send)

    asyncio.run(run())
    assert recorder.events == []


# Errors

def test_bot_exception_propagates_unchanged() -> None:
    raised: list[BaseException] = []

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        error = BotFailure("the bot failed")
        raised.append(error)
        raise error

    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder)

    with pytest.raises(BotFailure) as caught:
        exchange(middleware, "/chat", chat_body("hello"))

    assert caught.value is raised[0]
    assert middleware.errors == {}
    # The user wrote and the bot failed: the message is kept as unanswered.
    assert [m.role for m in recorder.messages()] == ["user"]


def test_starlette_bot_exception_propagates() -> None:
    bot, _ = make_bot()
    with pytest.raises(BotFailure, match="the bot failed"):
        exchange(wrap(bot), "/fail", chat_body("hello"))


@pytest.mark.parametrize("broken", ["codec", "recorder"])
def test_own_failure_keeps_response(broken: str, caplog: pytest.LogCaptureFixture) -> None:
    bare, _ = make_bot()
    wrapped_bot, _ = make_bot()
    if broken == "codec":
        middleware = wrap(wrapped_bot, CollectingRecorder(), codec=FailingCodec())
    else:
        middleware = wrap(wrapped_bot, FailingRecorder())

    expected = exchange(bare, "/chat", chat_body("private words"))
    with caplog.at_level(logging.ERROR, logger="chatmw"):
        actual = exchange(middleware, "/chat", chat_body("private words"))

    assert actual == expected
    if broken == "codec":
        # The codec runs where the batch is decoded: the exchange is counted and left out.
        assert middleware.skipped == {"decode_error": 1}
        assert middleware.errors == {}
    else:
        assert middleware.errors == {"record": 1}
    assert "RuntimeError" in caplog.text
    assert "private words" not in caplog.text


def test_failing_clock_passes_through() -> None:
    def broken_clock() -> datetime:
        raise RuntimeError("clock is broken")

    bare, _ = make_bot()
    wrapped_bot, _ = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(wrapped_bot, recorder, clock=broken_clock)

    expected = exchange(bare, "/chat", chat_body("hi"))
    assert exchange(middleware, "/chat", chat_body("hi")) == expected
    assert recorder.events == []
    assert middleware.errors == {"clock": 1}


def test_invalid_request_body_skipped() -> None:
    bot, seen = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder)

    exchange(middleware, "/raw", b"{not json")

    assert seen["bodies"] == [b"{not json"]
    assert recorder.events == []
    assert middleware.skipped == {"request_not_decoded": 1}
    assert middleware.errors == {}


def test_large_request_passes_unrecorded() -> None:
    bot, seen = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder, max_body_bytes=64)
    body = chat_body("x" * 200)

    sent = exchange(middleware, "/raw", body[:50], body[50:])

    assert seen["bodies"] == [body]
    assert sent[-1]["body"] == body
    assert recorder.events == []
    assert middleware.skipped == {"request_too_large": 1}


def test_client_error_not_recorded() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()

    sent = exchange(wrap(bot, recorder), "/reject", chat_body("hello"))

    assert sent[0]["status"] == 422
    assert recorder.events == []


def test_constructor_rejects_bad_options() -> None:
    bot, _ = make_bot()
    with pytest.raises(ValueError, match="must start with '/'"):
        ChatMetricsMiddleware(bot, CollectingRecorder(), CODEC, paths=["chat"])
    with pytest.raises(ValueError, match="list of paths"):
        ChatMetricsMiddleware(bot, CollectingRecorder(), CODEC, paths="/chat")
    with pytest.raises(ValueError, match="max_body_bytes"):
        ChatMetricsMiddleware(bot, CollectingRecorder(), CODEC, max_body_bytes=0)


# Events

class StepTimer:
    """A monotonic timer that advances by fixed steps, so latencies are exact."""

    def __init__(self, step_s: float) -> None:
        self.now = 100.0
        self.step_s = step_s

    def __call__(self) -> float:
        value = self.now
        self.now += self.step_s
        return value


def test_exchange_events_built() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()
    # One timer reading at arrival and one when the final body is sent: 0.25 s apart.
    middleware = wrap(bot, recorder, clock=lambda: T0, timer=StepTimer(0.25), channel="site")

    exchange(middleware, "/chat", chat_body("thanks", conversation_id="c-9"))

    user, bot_message, update = recorder.events
    assert isinstance(user, ev.Message)
    assert isinstance(bot_message, ev.Message)
    assert isinstance(update, ev.ConversationUpdate)
    assert (user.role, user.text, user.user_id, user.channel) == ("user", "thanks", "u-1", "site")
    assert user.occurred_at == T0
    assert user.conversation_id == "c-9"
    assert user.key.startswith("asgi:")
    assert bot_message.role == "bot"
    assert bot_message.text == "You said thanks"
    assert bot_message.intent == "echo"
    assert bot_message.latency_ms == 250.0
    assert bot_message.occurred_at == T0 + timedelta(milliseconds=250)
    assert bot_message.conversation_id == "c-9"
    assert bot_message.reply_to == user.key
    assert bot_message.key == f"{user.key}:reply:0"
    assert update.conversation_id == "c-9"
    assert update.resolved is True
    assert update.ended is True
    assert update.step == "done"
    assert update.intent == "echo"
    assert update.ended_reason == "bot"
    assert update.occurred_at == bot_message.occurred_at


def test_keys_unique_per_request() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder)

    exchange(middleware, "/chat", chat_body("same"))
    exchange(middleware, "/chat", chat_body("same"))

    keys = [message.key for message in recorder.messages()]
    assert len(set(keys)) == 4


def test_codec_message_id_is_key() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()

    exchange(wrap(bot, recorder), "/chat", chat_body("hi", message_id="m-77"))

    user, reply = recorder.messages()
    assert user.key == "web:m-77"
    assert user.platform_message_id == "m-77"
    assert reply.key == "web:m-77:reply:0"


def test_record_text_off_keeps_no_text() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()

    exchange(wrap(bot, recorder, record_text=False), "/chat", chat_body("my card number"))

    assert [m.text for m in recorder.messages()] == [None, None]
    assert recorder.messages()[1].latency_ms is not None


def test_gzip_response_decoded() -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()

    exchange(wrap(bot, recorder), "/gzip", chat_body("compress"))

    assert [m.text for m in recorder.messages()] == ["compress", "packed"]


def test_large_response_recorded_without_text() -> None:
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b" " * 100, "more_body": True})
        await send({"type": "http.response.body", "body": b'{"replies": []}'})

    recorder = CollectingRecorder()
    exchange(wrap(bot, recorder, max_body_bytes=250), "/chat", chat_body("hi"))

    user, reply = recorder.messages()
    assert reply.text is None
    assert reply.meta == {"body": "too_large"}


def test_server_error_records_unanswered_user() -> None:
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"busy"})

    recorder = CollectingRecorder()
    exchange(wrap(bot, recorder), "/chat", chat_body("anyone?"))

    assert [(m.role, m.text) for m in recorder.messages()] == [("user", "anyone?")]


def test_concurrent_requests_kept_apart() -> None:
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        document = json.loads((await receive())["body"])
        # Later users get faster replies, so the responses finish in reverse order.
        await asyncio.sleep(0.05 - 0.01 * int(document["user_id"]))
        reply = {"replies": [{"text": f"to {document['user_id']}"}]}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})

    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder)

    async def run_all() -> None:
        await asyncio.gather(*(
            run_http(middleware, "/chat", json.dumps({"user_id": str(n), "message": f"from {n}"})
                     .encode())
            for n in range(4)))

    asyncio.run(run_all())

    users = {m.key: m for m in recorder.messages() if m.role == "user"}
    replies = [m for m in recorder.messages() if m.role == "bot"]
    assert len(users) == 4
    assert len(replies) == 4
    for reply in replies:
        user = users[reply.reply_to or ""]
        assert reply.user_id == user.user_id
        assert reply.text == f"to {user.user_id}"
        assert reply.latency_ms is not None
        assert reply.latency_ms >= (0.05 - 0.01 * int(user.user_id)) * 1000


def test_rasa_bot_recorded() -> None:
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        document = json.loads((await receive())["body"])
        reply = [{"recipient_id": document["sender"], "text": "Hey!"},
                 {"recipient_id": document["sender"], "image": "https://example.invalid/a.png"}]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})

    recorder = CollectingRecorder()
    middleware = wrap(bot, recorder, codec=RasaCodec(), paths=["/webhooks/rest/webhook"])
    body = json.dumps({"sender": "s-1", "message": "hi",
                       "metadata": {"conversation_id": "rasa-c1"}}).encode()

    exchange(middleware, "/webhooks/rest/webhook", body)

    user, text_reply, image_reply = recorder.messages()
    assert (user.user_id, user.text, user.conversation_id) == ("s-1", "hi", "rasa-c1")
    assert text_reply.text == "Hey!"
    assert image_reply.text is None
    assert image_reply.latency_ms == text_reply.latency_ms


# Through the recorder into the store

@pytest.fixture
def store_recorder(engine: Engine) -> Iterator[Recorder]:
    writer = Writer(engine, WriterSettings(session_gap_ms=30 * 60_000))
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.01))
    recorder.start()
    yield recorder
    recorder.stop()


def stored_messages(engine: Engine) -> list[models.Message]:
    with Session(engine) as session:
        rows = session.scalars(select(models.Message).order_by(models.Message.occurred_at_ms,
                                                                models.Message.id)).all()
        session.expunge_all()
    return list(rows)


def stored_conversations(engine: Engine) -> list[models.Conversation]:
    with Session(engine) as session:
        rows = session.scalars(select(models.Conversation)
                               .order_by(models.Conversation.started_at_ms)).all()
        session.expunge_all()
    return list(rows)


def test_captured_exchange_matches_dataclass() -> None:
    decoder = ExchangeDecoder(CODEC)
    parts = {
        "key": "asgi:prefix:7",
        "decoder": decoder,
        "request": b'{"message": "hi"}',
        "response": b'{"replies": []}',
        "status": 201,
        "latency_ms": 12.5,
        "response_state": "too_large",
        "content_encoding": b"gzip",
    }
    # Every part of Exchange must be an argument of the fast constructor, in order.
    assert tuple(parts) == EXCHANGE_PARTS

    fast = captured_exchange("web", T0, **parts)
    checked = Exchange(channel="web", occurred_at=T0, parts=tuple(parts.values()))

    assert type(fast) is Exchange
    assert fast == checked
    assert (fast.channel, fast.occurred_at) == ("web", T0)
    for name, value in parts.items():
        assert getattr(fast, name) is value, name
    assert expand_all([fast]) == expand_all([checked])
    # Pickled as every event is, to the writer process.
    copy = pickle.loads(pickle.dumps(fast))
    assert (copy.channel, copy.occurred_at, copy.key, copy.request, copy.content_encoding) == (
        "web", T0, "asgi:prefix:7", b'{"message": "hi"}', b"gzip")


def test_exchange_parts_checked() -> None:
    with pytest.raises(ValueError, match="an exchange has 8 parts .*got 2"):
        Exchange(channel="web", occurred_at=T0, parts=("k", None))


def test_exchange_stored_with_latency(engine: Engine, store_recorder: Recorder) -> None:
    bot, _ = make_bot(delay_s=BOT_DELAY_S)
    middleware = wrap(bot, store_recorder)

    exchange(middleware, "/chat", chat_body("hello"))
    assert store_recorder.flush(10)

    user, reply = stored_messages(engine)
    assert (user.role, user.text) == ("user", "hello")
    assert (reply.role, reply.text, reply.intent) == ("bot", "You said hello", "echo")
    assert reply.latency_ms is not None
    assert reply.latency_ms >= BOT_DELAY_S * 1000
    assert reply.latency_ms < 5000
    assert reply.response_ms is not None
    assert abs(reply.response_ms - reply.latency_ms) <= 1.0
    assert user.latency_ms is None
    assert middleware.errors == {}


def test_codec_conversation_id_wins(engine: Engine, store_recorder: Recorder) -> None:
    bot, _ = make_bot()
    timer = StepTimer(0.1)
    arrivals = iter([T0, T0 + timedelta(hours=3)])
    middleware = wrap(bot, store_recorder, clock=lambda: next(arrivals), timer=timer)

    exchange(middleware, "/chat", chat_body("first", conversation_id="order-1"))
    exchange(middleware, "/chat", chat_body("three hours later", conversation_id="order-1"))
    assert store_recorder.flush(10)

    conversations = stored_conversations(engine)
    assert [c.external_id for c in conversations] == ["order-1"]
    assert conversations[0].message_count == 4
    assert conversations[0].first_response_ms == 100.0


def test_sessions_without_conversation_id(engine: Engine, store_recorder: Recorder) -> None:
    bot, _ = make_bot()
    arrivals = iter([T0, T0 + timedelta(minutes=10), T0 + timedelta(minutes=50)])
    middleware = wrap(bot, store_recorder, clock=lambda: next(arrivals), timer=StepTimer(0.5))

    for text in ("one", "two", "after a long silence"):
        exchange(middleware, "/chat", chat_body(text))
    assert store_recorder.flush(10)

    conversations = stored_conversations(engine)
    assert [c.message_count for c in conversations] == [4, 2]
    assert [c.first_response_ms for c in conversations] == [500.0, 500.0]


def test_conversation_update_stored(engine: Engine, store_recorder: Recorder) -> None:
    bot, _ = make_bot()
    middleware = wrap(bot, store_recorder, clock=lambda: T0, timer=StepTimer(0.2))

    exchange(middleware, "/chat", chat_body("thanks"))
    assert store_recorder.flush(10)

    (conversation,) = stored_conversations(engine)
    assert conversation.resolved is True
    assert conversation.last_step == "done"
    assert conversation.intent == "echo"
    assert conversation.ended_at_ms == ev.to_ms(T0 + timedelta(milliseconds=200))
    assert conversation.ended_reason == "bot"


def test_retried_write_stored_once(engine: Engine) -> None:
    bot, _ = make_bot()
    recorder = CollectingRecorder()
    exchange(wrap(bot, recorder), "/chat", chat_body("hello"))
    writer = Writer(engine)

    writer.write(recorder.events)
    writer.write(recorder.events)

    assert len(stored_messages(engine)) == 2
