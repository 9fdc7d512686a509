"""The middleware's copies of bodies and headers that are not plain bytes, and the server's send.

Servers pass ``bytes``, but a bot may send a ``bytearray`` or ``memoryview`` body, or header
names and values of those types, and reuse the buffer afterwards. The copy must hold what
passed at the time, the server must get the bot's own messages (and the bot the server's
exception), and the recorder's counts must add up when events are dropped. No event may
be left in an overflow buffer once the spill thread has stopped.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from chatmw import events as ev
from chatmw.codecs import JsonCodec
from chatmw.exchange import Exchange, expand_all
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings

CODEC = JsonCodec(replies_path="replies")
REQUEST = b'{"user_id": "u1", "message": "hello"}'


class Collecting:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def submit(self, event: ev.Event) -> bool:
        assert isinstance(event, Exchange)
        self.exchanges.append(event)
        return True

    def messages(self) -> list[ev.Message]:
        return [e for e in expand_all(self.exchanges) if isinstance(e, ev.Message)]


def run(app: Any, request_chunks: list[Any], server_send: Any = None) -> list[dict[str, Any]]:
    """Call ``app`` as a server would; return the messages it sent."""
    sent: list[dict[str, Any]] = []
    pending = list(request_chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        # Copies the body as it is now, because the bot may change its buffers later.
        sent.append({**message, "body": bytes(message.get("body", b""))})

    scope = {"type": "http", "method": "POST", "path": "/chat", "headers": []}
    asyncio.run(app(scope, receive, server_send or send))
    return sent


def reply_bot(body_type: type, header_type: type, parts: int = 1) -> Any:
    """A raw ASGI bot that reads the request, then sends its reply as ``body_type`` chunks
    and overwrites each chunk's buffer once it was sent."""

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        request = b""
        more = True
        while more:
            message = await receive()
            request += bytes(message["body"])
            more = message["more_body"]
        text = json.loads(request)["message"]
        payload = json.dumps({"replies": [{"text": f"echo {text}"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (header_type(b"Content-Type"), header_type(b"Application/JSON")),
            (header_type(b"X-Other-Header"), header_type(b"1")),
        ]})
        size = -(-len(payload) // parts)
        for index in range(parts):
            buffer = bytearray(payload[index * size:(index + 1) * size])
            chunk = buffer if body_type is bytearray else body_type(buffer)
            await send({"type": "http.response.body", "body": chunk,
                        "more_body": index < parts - 1})
            buffer[:] = b"x" * len(buffer)  # the bot reuses its buffer

    return bot


@pytest.mark.parametrize("body_type", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("parts", [1, 3])
def test_reused_buffers_are_copied(body_type: type, parts: int) -> None:
    recorder = Collecting()
    app = ChatMetricsMiddleware(reply_bot(body_type, body_type if body_type is not memoryview
                                          else bytes, parts),
                                recorder, CODEC, paths=["/chat"])
    request = bytearray(REQUEST)
    chunks = [request] if body_type is bytearray else [REQUEST]

    sent = run(app, chunks)
    request[:] = b"x" * len(request)  # the server reuses its request buffer

    # The server got the bot's messages as they were when sent.
    assert b"".join(m["body"] for m in sent[1:]) == b'{"replies": [{"text": "echo hello"}]}'
    user, bot = recorder.messages()
    assert (user.text, bot.text) == ("hello", "echo hello")
    assert app.errors == {}
    exchange = recorder.exchanges[0]
    assert exchange.request == REQUEST
    assert exchange.request.__class__ is bytes
    assert exchange.response.__class__ is bytes


@pytest.mark.parametrize("header_type", [bytes, bytearray])
def test_header_names_of_any_case_and_type(header_type: type) -> None:
    recorder = Collecting()
    app = ChatMetricsMiddleware(reply_bot(bytes, header_type), recorder, CODEC, paths=["/chat"])

    sent = run(app, [REQUEST])

    assert sent[0]["headers"][0] == (header_type(b"Content-Type"), header_type(b"Application/JSON"))
    assert recorder.exchanges[0].status == 200
    assert [m.text for m in recorder.messages()] == ["hello", "echo hello"]


def test_header_of_wrong_type_not_recorded() -> None:
    # A header value that is no bytes-like object cannot be copied: the exchange goes
    # unrecorded and counted, and the bot's message still reaches the server unchanged.
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", "text/plain")]})
        await send({"type": "http.response.body", "body": b'{"replies": []}'})

    recorder = Collecting()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])

    sent = run(app, [REQUEST])

    assert sent[0]["headers"] == [(b"content-type", "text/plain")]
    assert app.errors == {"response_copy": 1}
    assert recorder.exchanges == []


def test_server_send_gets_the_bots_messages() -> None:
    # The server's send gets the very message objects the bot sent, once each, and its
    # exception reaches the bot unchanged where the bot awaits its send.
    class Disconnected(Exception):
        pass

    received: list[dict[str, Any]] = []
    bot_sent: list[dict[str, Any]] = []
    raised: list[BaseException] = []

    async def server_send(message: dict[str, Any]) -> None:
        received.append(message)
        if message["type"] == "http.response.body":
            raise Disconnected("client went away")

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        for message in ({"type": "http.response.start", "status": 200, "headers": []},
                        {"type": "http.response.body", "body": b'{"replies": []}'}):
            bot_sent.append(message)
            try:
                await send(message)
            except Disconnected as error:
                raised.append(error)
                raise

    recorder = Collecting()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])

    with pytest.raises(Disconnected, match="client went away"):
        run(app, [REQUEST], server_send)
    assert len(received) == 2
    assert all(got is sent for got, sent in zip(received, bot_sent, strict=True))
    assert len(raised) == 1
    assert app.errors == {}


# The recorder's counts when the queue is full


class ListWriter:
    def __init__(self) -> None:
        self.written: list[ev.Event] = []

    def write(self, batch: list[ev.Event]) -> int:
        self.written.extend(batch)
        return len(batch)


def make_event(index: int) -> ev.Message:
    return ev.Message(channel="web", occurred_at=ev.now_utc(), key=f"m{index}", role="user",
                      user_id="u1", text=f"hello {index}")


def test_dropped_events_not_submitted() -> None:
    writer = ListWriter()
    recorder = Recorder(writer, RecorderSettings(queue_size=5, batch_size=5))
    # Not started: the queue fills and the rest is dropped.
    results = [recorder.submit(make_event(index)) for index in range(8)]

    assert results == [True] * 5 + [False] * 3
    stats = recorder.stats()
    assert stats.submitted == 5
    assert stats.dropped == {"queue_full": 3}
    assert not recorder.flush(0.05)  # five events wait for the writer

    recorder.start()
    assert recorder.flush(10)
    assert [event.key for event in writer.written] == [f"m{index}" for index in range(5)]
    assert recorder.stats().written == 5
    recorder.stop(10)


def test_submit_error_not_submitted() -> None:
    recorder = Recorder(ListWriter(), RecorderSettings(queue_size=5, batch_size=5))

    def broken(item: object) -> int:
        raise RuntimeError("queue is broken")

    recorder._queue.offer = broken  # type: ignore[method-assign]

    assert recorder.submit(make_event(0)) is False
    stats = recorder.stats()
    assert (stats.submitted, stats.dropped) == (0, {"submit_error": 1})
    assert recorder.flush(0.5)  # nothing is outstanding


def test_flush_waits_after_idle() -> None:
    writer = ListWriter()
    recorder = Recorder(writer, RecorderSettings(queue_size=100, batch_size=10,
                                                 batch_interval_s=0.05))
    recorder.start()
    try:
        for round_ in range(3):
            assert recorder.flush(10)  # idle
            for index in range(4):
                recorder.submit(make_event(round_ * 10 + index))
            assert recorder.flush(10)
            assert len(writer.written) == 4 * (round_ + 1)
        assert recorder.stats().submitted == 12
    finally:
        recorder.stop(10)


class BlockingWriter:
    """Blocks in ``write`` until ``release`` is set; keeps the keys written."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.keys: list[str] = []

    def write(self, batch: list[ev.Event]) -> int:
        self.entered.set()
        assert self.release.wait(30)
        self.keys.extend(event.key for event in batch)  # type: ignore[attr-defined]
        return len(batch)


def test_overflow_closed_once_spill_stops(tmp_path: Path) -> None:
    # Between the spill thread's end and the end of stop, an event that finds the queue full
    # must be dropped. Put in the overflow, it would never be spooled, and a flush would wait
    # for it until its timeout.
    writer = BlockingWriter()
    spool = FileSpool(SpoolSettings(directory=tmp_path))
    recorder = Recorder(writer, RecorderSettings(queue_size=2, batch_size=1), spool=spool)
    recorder.start()
    try:
        assert recorder.submit(make_event(0))
        assert writer.entered.wait(10)  # the writer is writing event 0
        assert recorder.submit(make_event(1))
        assert recorder.submit(make_event(2))  # the queue is full now
        spill = recorder._spill_thread
        assert spill is not None
        # The first step of stop: signal the spill thread, which ends with nothing to spill.
        with recorder._overflow_ready:
            recorder._spill_stop.set()
            recorder._overflow_ready.notify_all()
        spill.join(10)
        assert not spill.is_alive()

        assert recorder.submit(make_event(3)) is False
        assert recorder.stats().dropped == {"queue_full": 1}

        writer.release.set()
        assert recorder.flush(10)
        assert writer.keys == ["m0", "m1", "m2"]
        assert recorder.stats().submitted == 3
    finally:
        writer.release.set()
        recorder.stop(10)


@pytest.mark.parametrize("value", [7, 10**9])
def test_int_header_value_fails_copy(value: int) -> None:
    # bytes() of an int builds that many zero bytes: an int header value must fail the copy
    # (the exchange goes unrecorded) instead of being read as a content type.
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", value)]})
        await send({"type": "http.response.body", "body": b'{"replies": []}'})

    recorder = Collecting()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])

    sent = run(app, [REQUEST])

    assert sent[0]["headers"] == [(b"content-type", value)]
    assert app.errors == {"response_copy": 1}
    assert recorder.exchanges == []


def test_wide_item_buffers_measured_in_bytes() -> None:
    # len() of a memoryview of 4-byte items counts items: the body limit counts bytes.
    reply = json.dumps({"replies": [{"text": "x" * 200}]}).encode()
    reply += b" " * (-len(reply) % 4)
    wide = memoryview(reply).cast("B").cast("I")
    assert len(wide) * 4 == len(reply)

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": wide})

    recorder = Collecting()
    over = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"],
                                 max_body_bytes=len(reply) - 1)
    run(over, [REQUEST])
    assert recorder.exchanges[0].response_state == "too_large"

    recorder = Collecting()
    fits = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"],
                                 max_body_bytes=len(reply))
    run(fits, [REQUEST])
    assert recorder.exchanges[0].response_state == "complete"
    assert recorder.exchanges[0].response == reply
    assert recorder.messages()[1].text == "x" * 200

    # A request body of wide items is measured the same way.
    request = REQUEST + b" " * (-len(REQUEST) % 4)
    recorder = Collecting()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"],
                                max_body_bytes=len(request) - 1)
    run(app, [memoryview(request).cast("B").cast("I")])
    assert recorder.exchanges == []
    assert app.skipped == {"request_too_large": 1}


def test_spool_pending_count_not_held_by_append(tmp_path: Path) -> None:
    # The recorder reads the spool's pending events while it has its own lock, which the
    # bot's submit takes. The read must not wait for an append's fsync, during which the
    # append has the spool's lock.
    spool = FileSpool(SpoolSettings(directory=tmp_path))
    assert spool.append([make_event(0), make_event(1)])
    answers: list[int] = []
    with spool._lock:  # an append is writing to disk
        asking = threading.Thread(target=lambda: answers.append(spool.pending_events()),
                                  daemon=True)
        asking.start()
        asking.join(2)
        assert answers == [2]
    assert spool.append([make_event(2)])
    assert spool.pending_events() == 3
    chunk = spool.read_next(10)
    assert chunk is not None
    spool.commit(chunk)
    assert spool.pending_events() == 0
    assert spool.append([make_event(3)])
    spool.close()
    reopened = FileSpool(SpoolSettings(directory=tmp_path))
    assert reopened.pending_events() == 1
    reopened.close()
