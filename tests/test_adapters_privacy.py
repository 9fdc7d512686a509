"""The proxy with privacy on: pseudonymised ids still link replies, statuses and watermarks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

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
from sqlalchemy import select
from sqlalchemy.orm import Session

from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.proxy import create_proxy_app
from chatmw.config import Settings
from chatmw.recorder import RecorderSettings
from chatmw.runtime import Runtime
from chatmw.security.privacy import PrivacySettings
from chatmw.security.secret import Secret
from chatmw.store import models

PSID = "7100000000000001"


@pytest.fixture
def private_stack(database_url: str) -> Iterator[tuple[str, EchoBot, Runtime]]:
    privacy = PrivacySettings(pseudonym_key=Secret("k" * 32), text_mode="full")
    runtime = Runtime.from_settings(
        Settings(database_url=database_url, recorder=RecorderSettings(batch_interval_s=0.01)),
        privacy=privacy,
    )
    runtime.start(migrate=False)
    graph, bot = GraphStub(), EchoBot()
    with ServerThread(graph.app()) as graph_server, ServerThread(bot.app()) as bot_server:
        settings = MetaSettings(
            app_secret=APP_SECRET,
            verify_token=VERIFY_TOKEN,
            bot_webhook_url=f"{bot_server.url}/bot/webhook",
            graph_base_url=graph_server.url,
        )
        with ServerThread(create_proxy_app(settings, runtime)) as proxy:
            bot.graph_url = proxy.url
            yield proxy.url, bot, runtime
    runtime.stop()


def post(url: str, document: dict) -> int:
    body = json.dumps(document, ensure_ascii=False).encode()
    headers = {"x-hub-signature-256": signature(body)}
    return httpx.post(f"{url}/webhook", content=body, headers=headers, timeout=10).status_code


def test_pseudonymised_ids_keep_links(private_stack: tuple[str, EchoBot, Runtime]) -> None:
    url, bot, runtime = private_stack
    sent_ms = int(time.time() * 1000) - 2000
    message = {
        "object": "page",
        "entry": [
            {
                "id": "1",
                "time": sent_ms,
                "messaging": [
                    {
                        "sender": {"id": PSID},
                        "recipient": {"id": "1"},
                        "timestamp": sent_ms,
                        "message": {"mid": "m_private_1", "text": "hello"},
                    }
                ],
            }
        ],
    }
    assert post(url, message) == 200
    assert wait_until(lambda: len(bot.replies) == 1)
    assert runtime.recorder.flush(10)
    read_ms = int(time.time() * 1000) + 5
    read = {
        "object": "page",
        "entry": [
            {
                "id": "1",
                "time": read_ms,
                "messaging": [
                    {
                        "sender": {"id": PSID},
                        "recipient": {"id": "1"},
                        "timestamp": read_ms,
                        "read": {"watermark": read_ms},
                    }
                ],
            }
        ],
    }
    assert post(url, read) == 200
    assert runtime.recorder.flush(10)

    with Session(runtime.engine) as session:
        contacts = session.scalars(select(models.Contact.external_id)).all()
        rows = session.scalars(select(models.Message).order_by(models.Message.occurred_at_ms)).all()
    assert len(contacts) == 1
    assert contacts[0].startswith("ps_")
    assert PSID not in contacts[0]
    user, reply = rows
    assert reply.contact_id == user.contact_id
    assert reply.conversation_id == user.conversation_id
    assert reply.response_ms == reply.occurred_at_ms - sent_ms
    assert reply.status == "read"
    assert reply.status_at_ms == read_ms
