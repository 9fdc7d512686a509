"""The ``chatmw proxy`` command as a user runs it: a real process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from adapters_support import (
    APP_SECRET,
    VERIFY_TOKEN,
    EchoBot,
    GraphStub,
    ServerThread,
    signature,
    wait_until,
)
from sqlalchemy import create_engine, text

from chatmw.store.engine import make_engine, upgrade


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_proxy_command_records_and_forwards(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'proxy.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    graph, bot = GraphStub(), EchoBot()
    port = free_port()
    with ServerThread(graph.app()) as graph_server, ServerThread(bot.app()) as bot_server:
        bot.graph_url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "CHATMW_META_APP_SECRET": APP_SECRET,
            "CHATMW_META_VERIFY_TOKEN": VERIFY_TOKEN,
            "CHATMW_DATABASE_URL": database_url,
            "CHATMW_GRAPH_BASE_URL": graph_server.url,
            "CHATMW_BOT_WEBHOOK_URL": f"{bot_server.url}/bot/webhook",
            # With a spool, each webhook is acknowledged once its events are on disk.
            "CHATMW_SPOOL_DIR": str(tmp_path / "spool"),
        }
        command = [str(Path(sys.executable).parent / "chatmw"), "-v", "proxy", "--port", str(port)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            challenge = {
                "hub.mode": "subscribe",
                "hub.verify_token": VERIFY_TOKEN,
                "hub.challenge": "77",
            }
            started = wait_until(lambda: _answers(f"{url}/webhook", challenge), timeout=30)
            if not started:
                process.terminate()
                pytest.fail(f"chatmw proxy did not start: {process.communicate(timeout=20)[0]!r}")
            at_ms = int(time.time() * 1000) - 1000
            body = json.dumps(
                {
                    "object": "page",
                    "entry": [
                        {
                            "id": "1",
                            "time": at_ms,
                            "messaging": [
                                {
                                    "sender": {"id": "42"},
                                    "recipient": {"id": "1"},
                                    "timestamp": at_ms,
                                    "message": {"mid": "m_cli_1", "text": "ça va?"},
                                }
                            ],
                        }
                    ],
                },
                ensure_ascii=False,
            ).encode()
            response = httpx.post(
                f"{url}/webhook", content=body, headers={"x-hub-signature-256": signature(body)}
            )
            assert response.status_code == 200
            assert wait_until(lambda: len(bot.replies) == 1, timeout=10)
        finally:
            process.terminate()
            output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    assert (tmp_path / "spool").is_dir()
    assert "no replayable spool" not in output
    leaked = [line for line in output.splitlines() if "access_token" in line]
    assert leaked == []
    assert "recorder stopped" in output
    with create_engine(database_url).connect() as connection:
        rows = connection.execute(
            text("SELECT role, text, response_ms FROM messages ORDER BY occurred_at_ms")
        ).all()
    assert [(role, message) for role, message, _ in rows] == [
        ("user", "ça va?"),
        ("bot", "echo: ça va?"),
    ]
    assert rows[1][2] >= 1000


def _answers(url: str, params: dict[str, str]) -> bool:
    try:
        return httpx.get(url, params=params, timeout=1).text == "77"
    except httpx.HTTPError:
        return False


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["messenger_bot.py", "whatsapp_bot.py"])
def test_example_bot_records_reply(tmp_path: Path, script: str) -> None:
    graph = GraphStub()
    proxy_port, bot_port = free_port(), free_port()
    entry_port = proxy_port if script == "messenger_bot.py" else bot_port
    database_url = f"sqlite:///{tmp_path / 'example.db'}"
    with ServerThread(graph.app()) as graph_server:
        env = {
            **os.environ,
            "CHATMW_META_APP_SECRET": APP_SECRET,
            "CHATMW_META_VERIFY_TOKEN": VERIFY_TOKEN,
            "CHATMW_MESSENGER_PAGE_ACCESS_TOKEN": "page-token",
            "CHATMW_WHATSAPP_ACCESS_TOKEN": "wa-token",
            "CHATMW_WHATSAPP_PHONE_NUMBER_ID": "230000000000001",
            "CHATMW_GRAPH_BASE_URL": graph_server.url,
            "CHATMW_DATABASE_URL": database_url,
            "CHATMW_PSEUDONYMISE": "0",
            "PROXY_PORT": str(proxy_port),
            "BOT_PORT": str(bot_port),
        }
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{entry_port}"
            challenge = {
                "hub.mode": "subscribe",
                "hub.verify_token": VERIFY_TOKEN,
                "hub.challenge": "77",
            }
            if not wait_until(lambda: _answers(f"{url}/webhook", challenge), timeout=30):
                process.terminate()
                pytest.fail(f"{script} did not start: {process.communicate(timeout=20)[0]!r}")
            at_s = int(time.time()) - 2
            body = _example_webhook(script, at_s)
            response = httpx.post(
                f"{url}/webhook", content=body, headers={"x-hub-signature-256": signature(body)}
            )
            assert response.status_code == 200
            assert wait_until(lambda: len(graph.calls) == 1, timeout=10)
        finally:
            process.terminate()
            output = process.communicate(timeout=20)[0].decode()
    assert [line for line in output.splitlines() if "access_token" in line] == []
    with create_engine(database_url).connect() as connection:
        rows = connection.execute(
            text("SELECT role, text, response_ms FROM messages ORDER BY occurred_at_ms")
        ).all()
    assert [(role, message) for role, message, _ in rows] == [
        ("user", "héllo"),
        ("bot", "You said: héllo"),
    ], output
    assert rows[1][2] >= 2000


def _example_webhook(script: str, at_s: int) -> bytes:
    if script == "messenger_bot.py":
        document: dict = {
            "object": "page",
            "entry": [
                {
                    "id": "1",
                    "time": at_s * 1000,
                    "messaging": [
                        {
                            "sender": {"id": "42"},
                            "recipient": {"id": "1"},
                            "timestamp": at_s * 1000,
                            "message": {"mid": "m_example_1", "text": "héllo"},
                        }
                    ],
                }
            ],
        }
    else:
        document = {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "1",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": {"phone_number_id": "230000000000001"},
                                "messages": [
                                    {
                                        "from": "4915100000001",
                                        "id": "wamid.example1",
                                        "timestamp": str(at_s),
                                        "type": "text",
                                        "text": {"body": "héllo"},
                                    }
                                ],
                            },
                        }
                    ],
                }
            ],
        }
    return json.dumps(document, ensure_ascii=False).encode()


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_proxy_keeps_survey_addresses_under_pseudonyms(tmp_path: Path, placement: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'proxy.db'}"
    port = free_port()
    env = {
        **os.environ,
        "CHATMW_META_APP_SECRET": APP_SECRET,
        "CHATMW_META_VERIFY_TOKEN": VERIFY_TOKEN,
        "CHATMW_DATABASE_URL": database_url,
        "CHATMW_GRAPH_BASE_URL": "http://127.0.0.1:9",
        "CHATMW_PSEUDONYMISE": "1",
        "CHATMW_PSEUDONYM_KEY": "k" * 32,
        "CHATMW_SURVEY_CHANNELS": "messenger",
        "CHATMW_WRITER": placement,
    }
    command = [str(Path(sys.executable).parent / "chatmw"), "proxy", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        challenge = {
            "hub.mode": "subscribe",
            "hub.verify_token": VERIFY_TOKEN,
            "hub.challenge": "77",
        }
        if not wait_until(lambda: _answers(f"{url}/webhook", challenge), timeout=30):
            process.terminate()
            pytest.fail(f"chatmw proxy did not start: {process.communicate(timeout=20)[0]!r}")
        at_ms = int(time.time() * 1000) - 1000
        body = json.dumps({"object": "page", "entry": [{"id": "1", "time": at_ms, "messaging": [{
            "sender": {"id": "4242"}, "recipient": {"id": "1"}, "timestamp": at_ms,
            "message": {"mid": "m_survey_1", "text": "hello"}}]}]}).encode()
        response = httpx.post(f"{url}/webhook", content=body,
                              headers={"x-hub-signature-256": signature(body)})
        assert response.status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    with create_engine(database_url).connect() as connection:
        contacts = connection.execute(text("SELECT external_id FROM contacts")).scalars().all()
        addresses = connection.execute(
            text("SELECT channel, user_id, platform_id FROM survey_addresses")).all()
    assert len(contacts) == 1
    assert contacts[0] != "4242"
    assert addresses == [("messenger", contacts[0], "4242")]
