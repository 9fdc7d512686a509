"""Attacks on the bot's request path: when the middleware's ``send`` copies, the recorder's counts.

Each test drives real objects: ASGI calls through ``ChatMetricsMiddleware``, a started
``Recorder`` with the store ``Writer`` on an SQLite file under ``tmp_path`` (in this process
or in a writer process), and a ``FileSpool`` where a spool is used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
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
from chatmw.health import render_metrics
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Message
from chatmw.store.writer import Writer
from chatmw.writer_process import start_process_writer

CODEC = JsonCodec(user_id_path="user_id", replies_path="replies")
JSON_HEADERS = [(b"content-type", b"application/json")]


def reply_body(text: str) -> bytes:
    return json.dumps({"replies": [{"text": text}]}).encode()


def request_body(user: str, text: str) -> bytes:
    return json.dumps({"user_id": user, "message": text}).encode()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """The URL of a new migrated SQLite file and an engine on it."""
    url = f"sqlite:///{tmp_path / 'chatmw.db'}"
    engine = make_engine(url)
    upgrade(engine)
    yield url, engine
    engine.dispose()


def stored_messages(engine: Engine) -> list[tuple[str, str | None, str]]:
    """Return (role, text, key) of every stored message, ordered by role and key."""
    with engine.connect() as connection:
        rows = connection.execute(select(Message.role, Message.text, Message.key)).all()
    return sorted((role, text, key) for role, text, key in rows)


async def call_app(app: Any, body: bytes, server_send: Any) -> None:
    """Call ``app`` with one chat request whose body arrives in one message."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/chat", "headers": []}
    await app(scope, receive, server_send)


def run_with_store(bot: Any, engine: Engine) -> tuple[list[bytes], BaseException | None]:
    """Run ``bot`` behind the middleware for one request and wait until it is stored.

    Returns the response bodies the server sent and the exception the bot raised.
    """
    recorder = Recorder(Writer(engine), RecorderSettings(batch_interval_s=0.01))
    recorder.start()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])
    delivered: list[bytes] = []

    async def server_send(message: dict[str, Any]) -> None:
        # As servers do (uvicorn, hypercorn): the message is read when the send is awaited.
        if message["type"] == "http.response.body":
            delivered.append(bytes(message.get("body", b"")))

    raised: BaseException | None = None
    try:
        asyncio.run(call_app(app, request_body("u1", "hello"), server_send))
    except Exception as error:  # noqa: BLE001 - the test checks it
        raised = error
    assert recorder.flush(10)
    assert recorder.stop(10)
    assert app.errors == {}
    return delivered, raised


# The plain send: what the middleware copies, and what the server sends.


def test_reply_changed_before_await_recorded_as_sent(sqlite_store: tuple[str, Engine]) -> None:
    # ASGI servers read a message when its send is awaited. This bot overwrites its buffer
    # between calling send and awaiting it, so the client receives the final text. A copy
    # taken at the call would store the draft instead.
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        buffer = bytearray(reply_body("draft"))
        sending = send({"type": "http.response.body", "body": buffer})
        buffer[:] = reply_body("final")
        await sending

    _, engine = sqlite_store
    delivered, raised = run_with_store(bot, engine)

    assert raised is None
    assert delivered == [reply_body("final")]
    texts = [(role, text) for role, text, _ in stored_messages(engine)]
    assert texts == [("bot", "final"), ("user", "hello")]


def test_send_cancelled_unstarted_not_recorded(sqlite_store: tuple[str, Engine]) -> None:
    # asyncio.wait_for with timeout 0 cancels the send before it starts, so the server sends
    # no body and the client gets no reply. The exchange must be stored as unanswered (the
    # user's message only), not with the reply that never went out.
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        body = {"type": "http.response.body", "body": reply_body("too late")}
        await asyncio.wait_for(send(body), timeout=0)

    _, engine = sqlite_store
    delivered, raised = run_with_store(bot, engine)

    assert isinstance(raised, TimeoutError)
    assert delivered == []
    texts = [(role, text) for role, text, _ in stored_messages(engine)]
    assert texts == [("user", "hello")]


def test_header_error_log_matches_outcome(sqlite_store: tuple[str, Engine],
                                          caplog: pytest.LogCaptureFixture) -> None:
    # A str header value cannot be copied. The middleware logs that the exchange was not
    # recorded, so nothing of it may be stored.
    async def bot(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", "application/json")]})
        await send({"type": "http.response.body", "body": reply_body("hi")})

    _, engine = sqlite_store
    recorder = Recorder(Writer(engine), RecorderSettings(batch_interval_s=0.01))
    recorder.start()
    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])

    async def server_send(message: dict[str, Any]) -> None:
        return None

    with caplog.at_level(logging.ERROR, logger="chatmw"):
        asyncio.run(call_app(app, request_body("u1", "hello"), server_send))
    assert recorder.flush(10)
    assert recorder.stop(10)

    assert app.errors == {"response_copy": 1}
    assert "so the exchange was not recorded" in caplog.text
    assert stored_messages(engine) == []


# The recorder's counters while several threads submit to a full queue.


def submitted_total(recorder: Recorder) -> int:
    """Return chatmw_events_submitted_total as the metrics endpoint renders it."""
    found = re.search(r"^chatmw_events_submitted_total (\d+)$", render_metrics(recorder),
                      re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_submitted_counter_never_decreases() -> None:
    # chatmw_events_submitted_total is a Prometheus counter of the events the recorder
    # accepted. Prometheus reads a decrease as a restart of the process, so an event that
    # the full queue drops must never be counted as submitted, even briefly. Three threads
    # submit to the full queue of a recorder that was not started, while this thread reads
    # the counter. A submit that counted an event before trying the queue and took the
    # count back on a drop showed a decrease within milliseconds (CPython 3.11).
    recorder = Recorder(Writer(make_engine("sqlite://")), RecorderSettings(queue_size=3))
    event = ev.Message(channel="web", occurred_at=ev.now_utc(), key="k1", role="user",
                       user_id="u1", text="hello")
    stopping = threading.Event()
    calls = [0, 0, 0]

    def submit_until_stopped(index: int) -> None:
        while not stopping.is_set():
            recorder.submit(event)
            calls[index] += 1

    switch_interval = sys.getswitchinterval()
    # Frequent thread switches, so that one lands inside submit as on a busy host.
    sys.setswitchinterval(1e-6)
    # The recorder logs every thousandth queue_full drop, which would flood the output.
    logging.getLogger("chatmw").disabled = True
    threads = [threading.Thread(target=submit_until_stopped, args=(index,))
               for index in range(3)]
    falls: list[tuple[int, int]] = []
    try:
        for thread in threads:
            thread.start()
        previous = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not falls:
            current = submitted_total(recorder)
            if current < previous:
                falls.append((previous, current))
            previous = current
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(switch_interval)
        logging.getLogger("chatmw").disabled = False

    assert falls == []
    stats = recorder.stats()
    assert stats.submitted == 3
    assert stats.submitted + stats.dropped["queue_full"] == sum(calls)


@pytest.mark.parametrize("spooled", [False, True], ids=["no_spool", "spool"])
def test_threads_fill_queue_each_stored_once(tmp_path: Path, sqlite_store: tuple[str, Engine],
                                             spooled: bool) -> None:
    # Four threads submit unique messages to a small queue that fills and drains, and call
    # flush now and then. Every accepted message is stored exactly once, every call is
    # counted once as submitted or dropped, and a flush never returns before the messages
    # its thread submitted are stored.
    _, engine = sqlite_store
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool")) if spooled else None
    settings = RecorderSettings(queue_size=40, batch_size=16, batch_interval_s=0.01,
                                overflow_size=30)
    recorder = Recorder(Writer(engine), settings, spool=spool)
    recorder.start()
    accepted: list[list[str]] = [[] for _ in range(4)]
    flush_failures: list[str] = []
    early_flushes: list[str] = []

    def submit_messages(index: int) -> None:
        for number in range(250):
            key = f"t{index}-{number}"
            message = ev.Message(channel="web", occurred_at=ev.now_utc(), key=key,
                                 role="user", user_id=f"u{index}", text="hello")
            if recorder.submit(message):
                accepted[index].append(key)
            if number % 60 == 59:
                if not recorder.flush(30):
                    flush_failures.append(key)
                    continue
                stored = {stored_key for _, _, stored_key in stored_messages(engine)}
                early_flushes.extend(sorted(set(accepted[index]) - stored))

    logging.getLogger("chatmw").disabled = True
    try:
        threads = [threading.Thread(target=submit_messages, args=(index,))
                   for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert recorder.flush(30)
        assert recorder.stop(30)
    finally:
        logging.getLogger("chatmw").disabled = False

    assert flush_failures == []
    assert early_flushes == []
    stats = recorder.stats()
    accepted_keys = sorted(key for keys in accepted for key in keys)
    stored_keys = [key for _, _, key in stored_messages(engine)]
    assert sorted(stored_keys) == accepted_keys  # none lost, none stored twice
    assert stats.submitted == len(accepted_keys)
    assert stats.submitted + sum(stats.dropped.values()) == 1000
    assert stats.written == len(accepted_keys)


def test_concurrent_requests_through_writer_process(
        sqlite_store: tuple[str, Engine]) -> None:
    # Forty concurrent chat requests on one middleware, with request and response bodies of
    # every type and in several chunks, and a signed webhook, all go to a writer process as
    # pickled exchanges. Each message is stored once, with the text its own request sent.
    url, engine = sqlite_store
    process_writer = start_process_writer(Writer(make_engine(url)), url)
    assert process_writer is not None
    recorder = Recorder(process_writer, RecorderSettings(batch_size=8, batch_interval_s=0.01))
    recorder.start()
    body_types: list[Any] = [bytes, bytearray, memoryview]

    async def bot(scope: Any, receive: Any, send: Any) -> None:
        received = b""
        more = True
        while more:
            message = await receive()
            received += bytes(message.get("body", b""))
            more = message.get("more_body", False)
        await asyncio.sleep(0)
        document = json.loads(received)
        number = int(document["message"].split()[-1])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [[body_types[number % 3](b"Content-Type"),
                                 b"application/json"]]})
        payload = reply_body(f"echo {number}")
        for start in range(0, len(payload), 7):
            buffer = bytearray(payload[start:start + 7])
            await send({"type": "http.response.body",
                        "body": body_types[number % 3](buffer),
                        "more_body": start + 7 < len(payload)})
            buffer[:] = b"#" * len(buffer)  # the bot reuses its buffer once sent
            await asyncio.sleep(0)

    app = ChatMetricsMiddleware(bot, recorder, CODEC, paths=["/chat"])

    async def one_request(number: int) -> list[dict[str, Any]]:
        body = request_body(f"u{number}", f"hello {number}")
        chunks = [body[:5], b"", body[5:]]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def server_send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/chat", "headers": []}
        await app(scope, receive, server_send)
        return sent

    async def all_requests() -> None:
        await asyncio.gather(*(one_request(number) for number in range(40)))

    messaging = {
        "sender": {"id": "42"},
        "recipient": {"id": "1"},
        "timestamp": 1767225600000,
        "message": {"mid": "m_attack_1", "text": "from messenger"},
    }
    entry = {"id": "1", "time": 1767225600000, "messaging": [messaging]}
    webhook = json.dumps({"object": "page", "entry": [entry]}).encode()
    intake = WebhookIntake(MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN),
                           recorder)
    try:
        asyncio.run(all_requests())
        assert intake.receive(webhook, signature(webhook)).status == 200
        assert recorder.flush(30)
    finally:
        assert recorder.stop(30)

    assert app.errors == {}
    assert app.skipped == {}
    stored = [(role, text) for role, text, _ in stored_messages(engine)]
    expected = sorted([("bot", f"echo {number}") for number in range(40)]
                      + [("user", f"hello {number}") for number in range(40)]
                      + [("user", "from messenger")])
    assert stored == expected
    stats = recorder.stats()
    assert stats.submitted == 41
    assert stats.dropped == {}
    assert intake.stats["events"] == 1
