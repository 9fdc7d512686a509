"""Attacks on the recorder's overflow and restarts, and on the middleware's failed copies.

Every test drives real objects: a started ``Recorder`` with the store ``Writer`` on an
SQLite file under ``tmp_path``, a ``FileSpool`` under ``tmp_path`` where a spool is used,
and ASGI calls through ``ChatMetricsMiddleware``. Where a test must hold the writer thread
or the spill thread at a known point, it does so with the recorder's own ``transform``
hook, which each of those threads calls on every event it handles.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from adapters_support import APP_SECRET, VERIFY_TOKEN, signature
from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.webhook import WebhookIntake
from chatmw.codecs import JsonCodec
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Message
from chatmw.store.writer import Writer

CODEC = JsonCodec(user_id_path="user_id", replies_path="replies")
JSON_HEADERS = [(b"content-type", b"application/json")]
WRITER_THREAD = "chatmw-recorder"
SPILL_THREAD = "chatmw-spill"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new migrated SQLite file under ``tmp_path``."""
    engine = make_engine(f"sqlite:///{tmp_path / 'chatmw.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def stored_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(select(Message.key)).scalars())


def stored_texts(engine: Engine) -> list[tuple[str, str | None]]:
    with engine.connect() as connection:
        rows = connection.execute(select(Message.role, Message.text)).all()
    return sorted((role, text) for role, text in rows)


def message(key: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=ev.now_utc(), key=key, role="user",
                      user_id="u1", text=f"text of {key}")


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


class Gates:
    """A transform that blocks the writer thread or the spill thread until it is opened.

    ``hold`` names the threads to block. Each blocked thread sets its ``entered`` event,
    and the transform returns each event unchanged.
    """

    def __init__(self, *hold: str) -> None:
        self.held_threads = set(hold)
        self.entered = {name: threading.Event() for name in (WRITER_THREAD, SPILL_THREAD)}
        self.opened = {name: threading.Event() for name in (WRITER_THREAD, SPILL_THREAD)}

    def __call__(self, event: ev.Event) -> ev.Event:
        name = threading.current_thread().name
        if name in self.held_threads:
            self.entered[name].set()
            assert self.opened[name].wait(30)
        return event

    def open(self, name: str) -> None:
        self.opened[name].set()

    def open_all(self) -> None:
        for event in self.opened.values():
            event.set()


# Overflow and spill thread


def started_with_spool(tmp_path: Path, engine: Engine, gates: Gates) -> tuple[FileSpool, Recorder]:
    """Start a recorder with a queue of one event, a spool and ``gates`` as its transform."""
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine),
                        RecorderSettings(queue_size=1, batch_size=1, batch_interval_s=0.01),
                        spool=spool, transform=gates)
    recorder.start()
    return spool, recorder


def test_overflowed_event_stored_without_another_submit(tmp_path: Path,
                                                        engine: Engine) -> None:
    # o2 finds the queue full and goes to the spill thread, whose spool append (a slow fsync)
    # is blocked here. The writer thread meanwhile writes o0 and o1 and waits for the queue
    # without a timeout, because the spool is still empty. The spill thread must wake it
    # once o2 is in the spool, or o2 waits there until another event arrives.
    gates = Gates(WRITER_THREAD, SPILL_THREAD)
    spool, recorder = started_with_spool(tmp_path, engine, gates)
    try:
        assert recorder.submit(message("o0"))
        assert gates.entered[WRITER_THREAD].wait(10)
        assert recorder.submit(message("o1"))  # queued
        assert recorder.submit(message("o2"))  # overflow: the spill thread takes it
        assert gates.entered[SPILL_THREAD].wait(10)
        gates.open(WRITER_THREAD)
        assert wait_for(lambda: recorder.stats().written == 2)
        time.sleep(0.2)  # the writer thread is back waiting for the queue

        gates.open(SPILL_THREAD)
        flushed = recorder.flush(3)
        keys = stored_keys(engine)
        pending = spool.pending_events()
    finally:
        gates.open_all()
        recorder.stop(10)
        spool.close()

    assert (flushed, keys, pending) == (True, ["o0", "o1", "o2"], 0)


def test_timed_out_stop_spools_overflowed_events(tmp_path: Path, engine: Engine) -> None:
    # The store hangs, so stop times out and spools the queued event t1, as documented.
    # t3 waits in the overflow behind the spill thread's blocked append to the same spool,
    # which works: the stop must spool t3 too, so that the next start stores it.
    gates = Gates(WRITER_THREAD, SPILL_THREAD)
    spool, recorder = started_with_spool(tmp_path, engine, gates)
    old_writer, old_spill = recorder._thread, recorder._spill_thread
    assert old_writer is not None and old_spill is not None
    try:
        assert recorder.submit(message("t0"))
        assert gates.entered[WRITER_THREAD].wait(10)
        assert recorder.submit(message("t1"))  # queued
        assert recorder.submit(message("t2"))  # overflow: the spill thread takes it
        assert gates.entered[SPILL_THREAD].wait(10)
        assert recorder.submit(message("t3"))  # overflow: waits behind t2
        assert recorder.stop(timeout=0.2) is False
        dropped = recorder.stats().dropped

        gates.open_all()
        old_writer.join(10)
        old_spill.join(10)
        recorder.start()
        assert recorder.flush(10)
    finally:
        gates.open_all()
        recorder.stop(10)
        spool.close()

    assert dropped == {}
    assert stored_keys(engine) == ["t0", "t1", "t2", "t3"]


def test_restart_after_stop_overflows_again(tmp_path: Path, engine: Engine) -> None:
    # Once the spill thread is signalled to stop, an event that finds the queue full is
    # dropped. A recorder started again must accept overflowing events again and store them.
    gates = Gates()
    spool, recorder = started_with_spool(tmp_path, engine, gates)
    try:
        assert recorder.stop(10)
        gates.held_threads.add(WRITER_THREAD)
        recorder.start()
        assert recorder.submit(message("r0"))
        assert gates.entered[WRITER_THREAD].wait(10)
        accepted = [recorder.submit(message(f"r{index}")) for index in range(1, 6)]
        gates.open_all()
        assert recorder.flush(10)
        stats = recorder.stats()
    finally:
        gates.open_all()
        recorder.stop(10)
        spool.close()

    assert accepted == [True] * 5
    assert stats.dropped == {}
    assert stats.submitted == 6
    assert stats.spooled == 4
    assert stored_keys(engine) == [f"r{index}" for index in range(6)]


def test_concurrent_stops_leave_no_stop_marker(engine: Engine) -> None:
    # Two threads stop the recorder at once, for example a signal handler and the lifespan's
    # shutdown. If each put a stop marker on the queue, the second would stay queued and end
    # the writer thread of the next start, and the events submitted then would not be written.
    gates = Gates(WRITER_THREAD)
    recorder = Recorder(Writer(engine), RecorderSettings(batch_size=1, batch_interval_s=0.01),
                        transform=gates)
    recorder.start()
    assert recorder.submit(message("c0"))
    assert gates.entered[WRITER_THREAD].wait(10)
    results: list[bool] = []
    stoppers = [threading.Thread(target=lambda: results.append(recorder.stop(10)))
                for _ in range(2)]
    for stopper in stoppers:
        stopper.start()
    time.sleep(0.2)  # both stops wait for the writer thread
    gates.open_all()
    for stopper in stoppers:
        stopper.join(20)
    assert results == [True, True]
    gates.held_threads.clear()

    recorder.start()
    try:
        assert recorder.submit(message("c1"))
        flushed = recorder.flush(3)
    finally:
        recorder.stop(1)

    assert flushed is True
    assert stored_keys(engine) == ["c0", "c1"]


def test_counts_hold_across_restarts_under_load(tmp_path: Path, engine: Engine) -> None:
    # Three threads submit to a small queue with an overflow while the recorder restarts
    # (some stops time out) and a fourth thread reads stats(). Nothing may deadlock, the
    # submitted count never decreases, every call is counted once as submitted or dropped,
    # and every accepted event is stored or counted as dropped.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine),
                        RecorderSettings(queue_size=8, batch_size=4, batch_interval_s=0.005,
                                         overflow_size=40),
                        spool=spool)
    recorder.start()
    stopping = threading.Event()
    accepted: list[list[str]] = [[], [], []]
    rejected = [0, 0, 0]
    falls: list[tuple[int, int]] = []

    def submit_until_stopped(index: int) -> None:
        serial = 0
        while not stopping.is_set():
            key = f"s{index}-{serial}"
            serial += 1
            if recorder.submit(message(key)):
                accepted[index].append(key)
            else:
                rejected[index] += 1
            time.sleep(0.0005)

    def read_stats() -> None:
        previous = 0
        while not stopping.is_set():
            current = recorder.stats().submitted
            if current < previous:
                falls.append((previous, current))
            previous = current

    workers = [threading.Thread(target=submit_until_stopped, args=(index,), daemon=True)
               for index in range(3)]
    workers.append(threading.Thread(target=read_stats, daemon=True))
    logging.getLogger("chatmw").disabled = True
    try:
        for worker in workers:
            worker.start()
        for timeout in (5.0, 0.0, 5.0, 0.01, 5.0):
            time.sleep(0.1)
            recorder.stop(timeout)
            recorder.start()
        stopping.set()
        for worker in workers:
            worker.join(10)
            assert not worker.is_alive()
        assert recorder.flush(10)
        assert recorder.stop(10)
    finally:
        stopping.set()
        logging.getLogger("chatmw").disabled = False
        spool.close()

    stats = recorder.stats()
    keys = sorted(key for keys in accepted for key in keys)
    assert falls == []
    assert stats.submitted == len(keys)
    assert stats.submitted + stats.dropped.get("queue_full", 0) == len(keys) + sum(rejected)
    # A stop that times out spools what is left and counts as shutdown_timeout only what the
    # spool rejects. Only those events may be missing from the store.
    assert set(stats.dropped) <= {"queue_full", "shutdown_timeout"}
    stored = set(stored_keys(engine))
    assert stored <= set(keys)
    assert len(keys) - len(stored) == stats.dropped.get("shutdown_timeout", 0)


def test_webhook_overflow_stored_once(tmp_path: Path, engine: Engine) -> None:
    # Webhooks reach the recorder as undecoded exchanges. With the queue full, the spill
    # thread decodes and spools them, and each webhook acknowledged with 200 is stored once.
    gates = Gates(WRITER_THREAD)
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine),
                        RecorderSettings(queue_size=1, batch_size=1, batch_interval_s=0.01),
                        spool=spool, transform=gates)
    intake = WebhookIntake(MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN),
                           recorder)
    recorder.start()
    statuses = []
    try:
        for number in range(4):
            messaging = {"sender": {"id": "psid-1"}, "recipient": {"id": "page-1"},
                         "timestamp": 1767225600000 + number,
                         "message": {"mid": f"mid.{number}", "text": f"hook {number}"}}
            entry = {"id": "page-1", "time": 1767225600000, "messaging": [messaging]}
            body = json.dumps({"object": "page", "entry": [entry]}).encode()
            statuses.append(intake.receive(body, signature(body)).status)
            if number == 0:
                assert gates.entered[WRITER_THREAD].wait(10)
        gates.open_all()
        assert recorder.flush(10)
        assert recorder.stop(10)
    finally:
        gates.open_all()
        recorder.stop(10)
        spool.close()

    assert statuses == [200] * 4
    assert recorder.stats().spooled == 2
    assert stored_texts(engine) == [("user", f"hook {number}") for number in range(4)]


# The middleware's failed copies


def reply_body(text: str) -> bytes:
    return json.dumps({"replies": [{"text": text}]}).encode()


def request_body(text: str) -> bytes:
    return json.dumps({"user_id": "u1", "message": text}).encode()


class Server:
    """Calls an app as an ASGI server does, and keeps the messages that passed."""

    def __init__(self, request_messages: list[dict[str, Any]]) -> None:
        self.request_messages = request_messages
        self.sent: list[Any] = []

    async def receive(self) -> dict[str, Any]:
        return self.request_messages.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def call(self, app: Any) -> BaseException | None:
        scope = {"type": "http", "method": "POST", "path": "/chat", "headers": []}
        try:
            asyncio.run(app(scope, self.receive, self.send))
        except Exception as error:  # noqa: BLE001 - the test checks it
            return error
        return None


def run_recorded(bot: Any, engine: Engine,
                 request_messages: list[dict[str, Any]]) -> tuple[ChatMetricsMiddleware,
                                                                   Server,
                                                                   BaseException | None]:
    """Run ``bot`` behind the middleware for one request; wait until the recorder is idle."""
    recorder = Recorder(Writer(engine), RecorderSettings(batch_interval_s=0.01))
    recorder.start()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])
    server = Server(request_messages)
    try:
        raised = server.call(app)
        assert recorder.flush(10)
    finally:
        assert recorder.stop(10)
    return app, server, raised


def test_bad_request_chunk_nothing_stored(engine: Engine) -> None:
    # The second of three request chunks is a str. The bot receives the server's own
    # messages and responds. Because the copy failed, nothing of the exchange is stored.
    whole = request_body("hello")
    chunks: list[dict[str, Any]] = [
        {"type": "http.request", "body": whole[:10], "more_body": True},
        {"type": "http.request", "body": whole[10:20].decode(), "more_body": True},
        {"type": "http.request", "body": whole[20:], "more_body": False},
    ]
    sent_to_bot = list(chunks)
    received: list[Any] = []

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        while True:
            request = await receive()
            received.append(request)
            if not request.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": reply_body("hi")})

    app, server, raised = run_recorded(bot, engine, chunks)

    assert raised is None
    assert [id(item) for item in received] == [id(item) for item in sent_to_bot]
    assert received[1]["body"] == whole[10:20].decode()
    assert app.errors == {"request_copy": 1}
    assert stored_texts(engine) == []


def test_int_request_body_then_bot_raises(engine: Engine) -> None:
    # The request body is an int, which has no length. The bot raises after its response:
    # the server receives the bot's own exception and messages, and nothing is stored.
    request = {"type": "http.request", "body": 7, "more_body": False}
    start = {"type": "http.response.start", "status": 200, "headers": JSON_HEADERS}
    body = {"type": "http.response.body", "body": reply_body("hi")}
    failure = RuntimeError("bot failed after replying")

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        assert await receive() is request
        await send(start)
        await send(body)
        raise failure

    app, server, raised = run_recorded(bot, engine, [request])

    assert raised is failure
    assert server.sent[0] is start
    assert server.sent[1] is body
    assert app.errors == {"request_copy": 1}
    assert stored_texts(engine) == []


def test_bad_header_mid_list_nothing_stored(engine: Engine) -> None:
    # A content-encoding header with a str value is between two valid headers, and the body
    # is a str too. The server receives the bot's own messages, and nothing is stored.
    headers = [(b"content-type", b"application/json"), (b"content-encoding", "identity"),
               (b"x-request-id", b"42")]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    body = {"type": "http.response.body", "body": reply_body("hi").decode()}

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(start)
        await send(body)

    request = {"type": "http.request", "body": request_body("hello"), "more_body": False}
    app, server, raised = run_recorded(bot, engine, [request])

    assert raised is None
    assert server.sent == [start, body]
    assert server.sent[0] is start
    assert server.sent[0]["headers"] is headers
    assert headers[1] == (b"content-encoding", "identity")
    assert app.errors == {"response_copy": 2}
    assert stored_texts(engine) == []


def test_buffers_copied_when_sent(engine: Engine) -> None:
    # The request is a bytearray that the server reuses, and the reply a memoryview of a
    # buffer that the bot overwrites after the send. The texts stored are those that passed.
    incoming = bytearray(request_body("hello"))
    request = {"type": "http.request", "body": incoming, "more_body": False}

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        incoming[:] = request_body("other")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(bytearray(b"Content-Type"), memoryview(b"application/json"))]})
        buffer = bytearray(reply_body("first"))
        await send({"type": "http.response.body", "body": memoryview(buffer)})
        buffer[:] = reply_body("again")

    app, server, raised = run_recorded(bot, engine, [request])

    assert raised is None
    assert app.errors == {}
    assert stored_texts(engine) == [("bot", "first"), ("user", "hello")]
