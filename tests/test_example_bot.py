"""The example FAQ bot, bare and wrapped, served by a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from chatmw._demo.faq_bot import answer, create_app
from chatmw.cli import app as cli_app
from chatmw.store import models
from chatmw.store.engine import make_engine

ROOT = Path(__file__).resolve().parents[1]
BOT_DELAY_S = 0.03
CONVERSATION_LENGTH = 5  # messages sent by examples/send_conversation.py


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def stored(database_url: str) -> tuple[list[models.Message], list[models.Conversation]]:
    engine = make_engine(database_url)
    with Session(engine) as session:
        messages = list(session.scalars(
            select(models.Message).order_by(models.Message.occurred_at_ms, models.Message.id)))
        conversations = list(session.scalars(
            select(models.Conversation).order_by(models.Conversation.started_at_ms)))
        session.expunge_all()
    engine.dispose()
    return messages, conversations


def wait_for_messages(database_url: str, expected: int, timeout_s: float = 10.0) -> None:
    """Wait for ``expected`` stored messages: the middleware records after it replies."""
    engine = make_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as connection:
                statement = select(func.count()).select_from(models.Message)
                count = connection.execute(statement).scalar_one()
            if count >= expected or time.monotonic() > deadline:
                assert count == expected
                return
            time.sleep(0.05)
    finally:
        engine.dispose()


# The bot

@pytest.mark.parametrize(("message", "intent"), [
    ("Hello there", "greeting"),
    ("What are your opening hours?", "opening_hours"),
    ("How much does the Pro plan cost?", "pricing"),
    ("I want my money back", "refund"),
    ("I forgot my password", "password_reset"),
    ("Can I talk to a human?", "human"),
    ("Thank you!", "thanks"),
    ("bye", "goodbye"),
    ("🦜🦜🦜", "fallback"),
    ("this has nothing to do with anything", "fallback"),
])
def test_bot_answers_by_keyword(message: str, intent: str) -> None:
    assert answer(message).intent == intent


def test_bot_reports_conversation_flags() -> None:
    assert answer("thanks").resolved is True
    assert answer("agent please").handed_off is True
    assert answer("goodbye").ended is True
    assert answer("hi").resolved is None


REQUESTS: list[tuple[str, str, bytes]] = [
    ("POST", "/chat", json.dumps({"user_id": "u-1", "message": "opening hours?"}).encode()),
    ("POST", "/chat", json.dumps({"user_id": "u-1", "message": "Grüße 👋 refund?"},
                                 ensure_ascii=False).encode()),
    ("POST", "/chat", b'{"user_id": "u-1", "message": '),
    ("POST", "/chat", b'{"message": "no user"}'),
    ("POST", "/chat", b"\xff\xfe"),
    ("GET", "/health", b""),
    ("GET", "/missing", b""),
]


def test_wrapped_bot_identical_in_process(tmp_path: Path) -> None:
    bare = create_app(wrapped=False, delay_s=(0, 0))
    wrapped = create_app(wrapped=True, database_url=f"sqlite:///{tmp_path / 'c.db'}",
                         delay_s=(0, 0))

    async def run(app: FastAPI) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bot") as client:
            results = []
            for method, path, body in REQUESTS:
                response = await client.request(method, path, content=body,
                                                headers={"content-type": "application/json"})
                results.append((response.status_code, response.headers.raw, response.content))
            return results

    expected = asyncio.run(run(bare))
    actual = asyncio.run(run(wrapped))

    assert [status for status, _, _ in expected] == [200, 200, 422, 422, 422, 200, 404]
    for want, got in zip(expected, actual, strict=True):
        assert got == want


def test_wrapped_bot_identical_over_http(database_url: str) -> None:
    bare = create_app(wrapped=False, delay_s=(0, 0))
    wrapped = create_app(wrapped=True, database_url=database_url, delay_s=(0, 0))

    def run(base_url: str) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
        results = []
        with httpx.Client(base_url=base_url) as client:
            for method, path, body in REQUESTS:
                response = client.request(method, path, content=body,
                                          headers={"content-type": "application/json"})
                # The server's clock stamps each response: the date header is the only difference.
                headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"date"]
                results.append((response.status_code, headers, response.content))
        return results

    with serve(bare) as bare_url, serve(wrapped) as wrapped_url:
        expected = run(bare_url)
        actual = run(wrapped_url)

    for want, got in zip(expected, actual, strict=True):
        assert got == want


# End to end

@pytest.mark.parametrize("placement", ["thread", "process"])
def test_conversation_recorded_end_to_end(database_url: str, placement: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMW_WRITER", placement)
    app = create_app(wrapped=True, database_url=database_url, delay_s=(BOT_DELAY_S, BOT_DELAY_S))

    with serve(app) as base_url:
        writer_kind = type(app.state.chatmw.recorder.writer).__name__
        assert writer_kind == ("ProcessWriter" if placement == "process" else "Writer")
        completed = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "send_conversation.py"),
             "--url", base_url, "--user", "e2e-visitor"],
            capture_output=True, text=True, timeout=60, check=False)
        assert completed.returncode == 0, completed.stderr
        wait_for_messages(database_url, 2 * CONVERSATION_LENGTH)
        with httpx.Client(base_url=base_url) as client:
            summary = client.get("/metrics/summary").json()
            response_time = client.get("/metrics/response-time").json()

    assert completed.stdout.count("user> ") == CONVERSATION_LENGTH
    assert completed.stdout.count("bot > ") == CONVERSATION_LENGTH
    assert "Glad I could help!" in completed.stdout
    assert "GET /metrics/summary" in completed.stdout

    messages, conversations = stored(database_url)
    users = [m for m in messages if m.role == "user"]
    bots = [m for m in messages if m.role == "bot"]
    assert len(users) == CONVERSATION_LENGTH
    assert len(bots) == CONVERSATION_LENGTH
    assert [m.text for m in users][0] == "Hello!"
    assert [m.intent for m in bots] == ["greeting", "opening_hours", "pricing", "refund", "thanks"]
    for bot in bots:
        assert bot.latency_ms is not None
        assert bot.latency_ms >= BOT_DELAY_S * 1000
        assert bot.response_ms is not None
        assert bot.response_ms >= BOT_DELAY_S * 1000 - 1  # stored times are whole milliseconds
        assert abs(bot.response_ms - bot.latency_ms) <= 1.0

    assert len(conversations) == 1  # no conversation id given: one session
    conversation = conversations[0]
    assert conversation.message_count == 2 * CONVERSATION_LENGTH
    assert conversation.resolved is True
    assert conversation.intent == "thanks"

    # The API's figures, checked against the stored response times.
    reply_ms = sorted(bot.response_ms for bot in bots)
    assert summary["totals"]["messages"] == 2 * CONVERSATION_LENGTH
    assert summary["totals"]["conversations"] == 1
    assert summary["reply_time"]["count"] == CONVERSATION_LENGTH
    assert summary["reply_time"]["mean"] == round(math.fsum(reply_ms) / len(reply_ms) / 1000, 3)
    assert summary["reply_time"]["max"] == round(reply_ms[-1] / 1000, 3)
    assert summary["reply_time"]["p50"] >= BOT_DELAY_S
    assert summary["first_response"]["count"] == 1
    assert summary["first_response"]["max"] == round(bots[0].response_ms / 1000, 3)
    assert response_time["reply_time"]["bot"]["count"] == CONVERSATION_LENGTH
    assert response_time["reply_time"]["agent"]["count"] == 0


def test_conversation_id_from_request_kept(database_url: str) -> None:
    app = create_app(wrapped=True, database_url=database_url, delay_s=(0, 0))

    with serve(app) as base_url, httpx.Client(base_url=base_url) as client:
        for text in ("hi", "Can I talk to a human?"):
            response = client.post("/chat", json={"user_id": "u-7", "message": text,
                                                  "conversation_id": "ticket-42"})
            assert response.status_code == 200
        wait_for_messages(database_url, 4)

    _, conversations = stored(database_url)
    assert [c.external_id for c in conversations] == ["ticket-42"]
    assert conversations[0].handed_off is True


# The demo command

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_demo_command_serves_wrapped_bot(database_url: str) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from chatmw.cli import main; main()", "demo",
               "--db", database_url, "--port", str(port)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=base_url) as client:
            while True:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "chatmw demo did not start within 20 s"
                time.sleep(0.1)
            reply = client.post("/chat", json={"user_id": "demo-user", "message": "hours?"})
            wait_for_messages(database_url, 2)
            summary = client.get("/metrics/summary")
            docs = client.get("/docs")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)

    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output
    assert reply.json()["replies"][0]["intent"] == "opening_hours"
    assert summary.status_code == 200
    assert summary.json()["totals"]["messages"] == 2
    assert docs.status_code == 200
    assert f"POST {base_url}/chat" in output
    assert f"{base_url}/metrics/summary" in output
    assert f"{base_url}/docs" in output


def test_demo_command_rejects_bad_database() -> None:
    result = CliRunner().invoke(cli_app, ["demo", "--db", "nosuchdriver://nowhere/db"])

    assert result.exit_code == 2
    assert "Invalid value for --db" in result.output
    assert "invalid database URL 'nosuchdriver://nowhere/db'" in result.output
