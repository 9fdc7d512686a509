"""The Meta proxy end to end: Meta -> proxy -> bot, and bot -> proxy -> stub Graph API.

Every server is real and listens on 127.0.0.1: the stub Graph API, a small bot with its
own signature check, and the proxy itself. The store runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest
from adapters_support import (
    APP_SECRET,
    VERIFY_TOKEN,
    EchoBot,
    GraphStub,
    ServerThread,
    fixture_bytes,
    signature,
    wait_until,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.proxy import create_proxy_app
from chatmw.config import Settings
from chatmw.recorder import RecorderSettings
from chatmw.runtime import Runtime
from chatmw.store import models

PAGE = "104857600000001"
PSID = "7100000000000001"
WA = "4915100000001"
MAX_BODY = 64 * 1024


@dataclass
class Stack:
    proxy: ServerThread
    bot: EchoBot
    graph: GraphStub
    runtime: Runtime
    app: object

    @property
    def url(self) -> str:
        return self.proxy.url

    def flush(self) -> None:
        assert self.runtime.recorder.flush(10)

    def session(self) -> Session:
        return Session(self.runtime.engine)

    @property
    def stats(self) -> dict[str, int]:
        return self.app.state.proxy.stats.snapshot()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[GraphStub, EchoBot, str, str]]:
    """The stub Graph API and the bot, shared by the module's tests and reset for each."""
    graph, bot = GraphStub(), EchoBot()
    with ServerThread(graph.app()) as graph_server, ServerThread(bot.app()) as bot_server:
        yield graph, bot, graph_server.url, bot_server.url


@pytest.fixture
def stack(database_url: str, upstreams: tuple[GraphStub, EchoBot, str, str]) -> Iterator[Stack]:
    graph, bot, graph_url, bot_url = upstreams
    graph.reset()
    bot.reset()
    runtime = Runtime.from_settings(
        Settings(database_url=database_url, recorder=RecorderSettings(batch_interval_s=0.01))
    )
    runtime.start(migrate=False)
    settings = MetaSettings(
        app_secret=APP_SECRET,
        verify_token=VERIFY_TOKEN,
        bot_webhook_url=f"{bot_url}/bot/webhook",
        graph_base_url=graph_url,
        max_body_bytes=MAX_BODY,
        forward_backoff_s=0.02,
        forward_timeout_s=15,
    )
    app = create_proxy_app(settings, runtime)
    # Stopping the proxy waits for its forwards, so no bot call leaks into the next test.
    with ServerThread(app) as proxy_server:
        bot.graph_url = proxy_server.url
        yield Stack(proxy_server, bot, graph, runtime, app)
        bot.gate = None
    runtime.stop()


def now_ms() -> int:
    return int(time.time() * 1000)


def messenger_text(mid: str, text: str, at_ms: int, user: str = PSID) -> bytes:
    document = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": at_ms,
                "messaging": [
                    {
                        "sender": {"id": user},
                        "recipient": {"id": PAGE},
                        "timestamp": at_ms,
                        "message": {"mid": mid, "text": text},
                    }
                ],
            }
        ],
    }
    return json.dumps(document, ensure_ascii=False).encode()


def messenger_read(watermark_ms: int, at_ms: int) -> bytes:
    document = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": at_ms,
                "messaging": [
                    {
                        "sender": {"id": PSID},
                        "recipient": {"id": PAGE},
                        "timestamp": at_ms,
                        "read": {"watermark": watermark_ms},
                    }
                ],
            }
        ],
    }
    return json.dumps(document).encode()


def whatsapp_value(value: dict) -> bytes:
    document = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "440000000000001",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "4930000000",
                                "phone_number_id": "230000000000001",
                            },
                            **value,
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(document, ensure_ascii=False).encode()


def whatsapp_status(wamid: str, status: str, at_s: int) -> bytes:
    return whatsapp_value(
        {"statuses": [{"id": wamid, "status": status, "timestamp": str(at_s), "recipient_id": WA}]}
    )


def post(url: str, body: bytes, sign: bool = True, **headers: str) -> httpx.Response:
    sent = {"content-type": "application/json", "user-agent": "facebookexternalua", **headers}
    if sign:
        sent["x-hub-signature-256"] = signature(body)
    return httpx.post(f"{url}/webhook", content=body, headers=sent, timeout=10)


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_verification_answers_challenge(stack: Stack) -> None:
    good = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "8412"}
    response = httpx.get(f"{stack.url}/webhook", params=good)
    assert response.status_code == 200
    assert response.text == "8412"
    assert response.headers["content-type"].startswith("text/plain")
    wrong = httpx.get(f"{stack.url}/webhook", params={**good, "hub.verify_token": "guess"})
    assert wrong.status_code == 403
    assert httpx.get(f"{stack.url}/webhook").status_code == 403


def test_bad_signatures_rejected_and_not_stored(stack: Stack) -> None:
    body = messenger_text("m_sig_1", "hello", now_ms())
    assert post(stack.url, body, sign=False).status_code == 403
    forged = {"x-hub-signature-256": signature(body, "another-secret")}
    assert post(stack.url, body, sign=False, **forged).status_code == 403
    stack.flush()
    with stack.session() as session:
        assert count(session, models.Message) == 0
        assert count(session, models.RawPayload) == 0
    assert stack.stats["rejected_signature"] == 2
    assert stack.bot.received == []


def test_oversized_body_rejected_with_413(stack: Stack) -> None:
    body = messenger_text("m_big_1", "x" * (MAX_BODY + 10), now_ms())

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = httpx.post(
        f"{stack.url}/webhook",
        content=chunks(),
        headers={"x-hub-signature-256": signature(body)},
        timeout=10,
    )
    assert response.status_code == 413
    stack.flush()
    with stack.session() as session:
        assert count(session, models.Message) == 0
    assert stack.stats["too_large"] == 1


def test_unparseable_body_kept_and_counted(stack: Stack) -> None:
    body = b'{"object": "page", "entry": [ broken'
    response = post(stack.url, body)
    assert response.status_code == 200
    stack.flush()
    with stack.session() as session:
        raw = session.scalars(select(models.RawPayload)).all()
    assert len(raw) == 1
    assert raw[0].body == body
    assert raw[0].source == "meta_webhook"
    assert stack.stats["unparseable"] == 1


def test_messenger_bot_behind_proxy_records_reply_time(stack: Stack) -> None:
    sent_ms = now_ms() - 3000
    body = messenger_text("m_user_1", "Café? 😀", sent_ms)
    started = time.monotonic()
    response = post(stack.url, body)
    assert response.status_code == 200
    assert wait_until(lambda: len(stack.bot.replies) == 1)
    elapsed_ms = (time.monotonic() - started) * 1000

    # The bot received Meta's exact bytes and signature, and the Graph API response to its send.
    assert stack.bot.received == [body]
    assert stack.bot.headers_seen[0]["x-hub-signature-256"] == signature(body)
    assert stack.bot.headers_seen[0]["user-agent"] == "facebookexternalua"
    assert stack.bot.headers_seen[0]["content-type"] == "application/json"
    assert stack.bot.rejected == 0
    reply = stack.bot.replies[0]
    assert reply["status"] == 200
    assert reply["json"] == {"recipient_id": PSID, "message_id": "m_stub1"}
    assert reply["headers"]["x-fb-trace-id"] == "trace-1"
    call = stack.graph.calls[0]
    assert call["path"] == "/v21.0/me/messages"
    assert call["query"] == "access_token=page-token"
    assert json.loads(call["body"])["message"] == {"text": "echo: Café? 😀"}

    stack.flush()
    with stack.session() as session:
        rows = session.scalars(select(models.Message).order_by(models.Message.occurred_at_ms)).all()
    assert [(row.role, row.text) for row in rows] == [
        ("user", "Café? 😀"),
        ("bot", "echo: Café? 😀"),
    ]
    user, bot = rows
    assert user.occurred_at_ms == sent_ms
    assert bot.platform_message_id == "m_stub1"
    assert bot.conversation_id == user.conversation_id
    assert bot.response_ms == bot.occurred_at_ms - sent_ms
    assert 3000 <= bot.response_ms <= 3000 + elapsed_ms + 50
    assert bot.is_first_response is True


def test_messenger_read_watermark_marks_earlier_sends(stack: Stack) -> None:
    first_ms = now_ms() - 10_000
    assert post(stack.url, messenger_text("m_user_a", "one", first_ms)).status_code == 200
    assert wait_until(lambda: len(stack.bot.replies) == 1)
    watermark = now_ms()
    time.sleep(0.01)
    assert post(stack.url, messenger_text("m_user_b", "two", now_ms())).status_code == 200
    assert wait_until(lambda: len(stack.bot.replies) == 2)
    stack.flush()
    read_at = now_ms() + 5
    assert post(stack.url, messenger_read(watermark, read_at)).status_code == 200
    stack.flush()
    with stack.session() as session:
        bots = session.scalars(
            select(models.Message)
            .where(models.Message.role == "bot")
            .order_by(models.Message.occurred_at_ms)
        ).all()
        statuses = session.execute(
            select(
                models.MessageStatus.platform_message_id,
                models.MessageStatus.status,
                models.MessageStatus.occurred_at_ms,
            )
        ).all()
    assert [(row.platform_message_id, row.status) for row in bots] == [
        ("m_stub1", "read"),
        ("m_stub2", None),
    ]
    assert bots[0].status_at_ms == read_at
    assert statuses == [("m_stub1", "read", read_at)]


def test_whatsapp_statuses_never_go_backwards(stack: Stack) -> None:
    sent_s = int(time.time()) - 5
    inbound = whatsapp_value(
        {
            "contacts": [{"profile": {"name": "Kim"}, "wa_id": WA}],
            "messages": [
                {
                    "from": WA,
                    "id": "wamid.in1",
                    "timestamp": str(sent_s),
                    "type": "text",
                    "text": {"body": "Größe M?"},
                }
            ],
        }
    )
    assert post(stack.url, inbound).status_code == 200
    assert wait_until(lambda: len(stack.bot.replies) == 1)
    assert stack.bot.replies[0]["json"]["messages"][0]["id"] == "wamid.stub1"
    stack.flush()

    base = int(time.time())
    for status, offset in (("sent", 1), ("delivered", 2), ("read", 3)):
        assert (
            post(stack.url, whatsapp_status("wamid.stub1", status, base + offset)).status_code
            == 200
        )
    stack.flush()
    assert post(stack.url, whatsapp_status("wamid.stub1", "sent", base + 9)).status_code == 200
    stack.flush()

    with stack.session() as session:
        bot = session.scalars(select(models.Message).where(models.Message.role == "bot")).one()
        statuses = dict(
            session.execute(
                select(models.MessageStatus.status, models.MessageStatus.occurred_at_ms)
            ).all()
        )
        user = session.scalars(select(models.Message).where(models.Message.role == "user")).one()
    assert bot.status == "read"
    assert bot.status_at_ms == (base + 3) * 1000
    assert statuses == {
        "sent": (base + 1) * 1000,
        "delivered": (base + 2) * 1000,
        "read": (base + 3) * 1000,
    }
    assert user.platform_message_id == "wamid.in1"
    assert bot.response_ms == bot.occurred_at_ms - sent_s * 1000
    assert bot.response_ms >= 5000


def test_duplicate_webhooks_concurrently_stored_once(stack: Stack) -> None:
    body = messenger_text("m_dup_1", "only once", now_ms())

    async def deliver_all() -> list[int]:
        headers = {"x-hub-signature-256": signature(body), "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=10) as client:
            answers = await asyncio.gather(
                *[
                    client.post(f"{stack.url}/webhook", content=body, headers=headers)
                    for _ in range(6)
                ]
            )
        return [answer.status_code for answer in answers]

    assert asyncio.run(deliver_all()) == [200] * 6
    assert post(stack.url, body).status_code == 200
    assert wait_until(lambda: len(stack.bot.replies) == 7)
    stack.flush()
    with stack.session() as session:
        users = session.scalars(select(models.Message).where(models.Message.role == "user")).all()
        assert count(session, models.Conversation) == 1
    assert [row.text for row in users] == ["only once"]


def test_acknowledgement_does_not_wait_for_bot(stack: Stack) -> None:
    stack.bot.gate = threading.Event()
    body = messenger_text("m_slow_1", "are you there?", now_ms())
    started = time.monotonic()
    response = post(stack.url, body)
    answered_in = time.monotonic() - started
    assert response.status_code == 200
    # The bot is still held at its gate, so the acknowledgement cannot have waited for it.
    assert stack.bot.received == []
    assert answered_in < 5.0
    stack.bot.gate.set()
    assert wait_until(lambda: stack.bot.received == [body])


def test_touches_carry_source_campaign_and_ad(stack: Stack) -> None:
    assert post(stack.url, fixture_bytes("messenger_mixed.json")).status_code == 200
    stack.flush()
    with stack.session() as session:
        touches = session.execute(
            select(
                models.Touch.source,
                models.Touch.campaign,
                models.Touch.ad_id,
                models.Touch.conversation_id,
            ).order_by(models.Touch.occurred_at_ms)
        ).all()
        contacts = {row.external_id: row for row in session.scalars(select(models.Contact))}
        echo_roles = dict(
            session.execute(
                select(models.Message.key, models.Message.role).where(
                    models.Message.key.like("messenger:m_echo%")
                )
            ).all()
        )
        raw = session.scalars(select(models.RawPayload.source)).all()
    assert [(t.source, t.campaign, t.ad_id) for t in touches] == [
        ("SHORTLINK", "spring-sale", None),
        ("ADS", "retarget-7", "6001234567890"),
        ("CUSTOMER_CHAT_PLUGIN", None, None),
    ]
    assert touches[0].conversation_id is not None
    assert contacts[PSID].first_touch_id is not None
    assert contacts["7100000000000002"].first_touch_id is not None
    assert contacts["7100000000000002"].last_touch_id != contacts["7100000000000002"].first_touch_id
    assert echo_roles == {
        "messenger:m_echo_bot_0001": "bot",
        "messenger:m_echo_agent_0001": "agent",
    }
    assert raw == ["messenger_unknown"]
    assert stack.stats["unknown_events"] == 1


def test_graph_passthrough_returns_meta_answer_unchanged(stack: Stack) -> None:
    failing = {"recipient": {"id": "fail"}, "message": {"text": "x"}}
    response = httpx.post(f"{stack.url}/v21.0/me/messages", json=failing)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 100
    assert response.headers["x-fb-trace-id"] == "trace-1"
    profile = httpx.get(f"{stack.url}/v21.0/{PSID}", params={"fields": "first_name"})
    assert profile.status_code == 200
    assert profile.json() == {"id": PSID, "name": "Test Page"}
    assert stack.graph.calls[-1]["query"] == "fields=first_name"
    read_receipt = {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.x"}
    assert httpx.post(f"{stack.url}/v21.0/230000000000001/messages", json=read_receipt).json() == {
        "success": True
    }
    stack.flush()
    with stack.session() as session:
        assert count(session, models.Message) == 0
    assert stack.stats["sends_failed"] == 1


def test_proxy_without_bot_url_records_only() -> None:
    settings = MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN)
    app = create_proxy_app(settings, sink=SimpleNamespace(submit=lambda event: True))
    assert app.state.proxy.forwarder is None
    with pytest.raises(ValueError, match="runtime or a sink"):
        create_proxy_app(settings)


def test_attribution_metric_groups_adapter_touches(stack: Stack) -> None:
    from chatmw.metrics.attribution import attribution
    from chatmw.metrics.filters import MetricFilter

    assert post(stack.url, fixture_bytes("messenger_mixed.json")).status_code == 200
    assert post(stack.url, fixture_bytes("whatsapp_messages.json")).status_code == 200
    # The bot replies to the one WhatsApp text, and that reply must be stored first.
    assert wait_until(lambda: len(stack.bot.replies) == 1)
    stack.flush()
    result = attribution(stack.runtime.engine, MetricFilter())
    first = result["first_touch"]
    ads = {item["value"]: item["conversations"] for item in first["ad"]}
    campaigns = {item["value"]: item["conversations"] for item in first["campaign"]}
    sources = {item["value"]: item["conversations"] for item in first["source"]}
    assert ads["6001234567890"] == 1
    assert ads["120200000000001"] == 1
    assert campaigns["spring-sale"] == 1
    assert campaigns["retarget-7"] == 1
    # The bot replies to the fixture's January message now, more than 30 minutes later, so
    # its reply opens a conversation of its own, without a touch.
    assert sources == {"SHORTLINK": 1, "ADS": 1, "ad": 1, "(none)": 1}


def test_echo_of_recorded_prompt_not_stored_twice(stack: Stack) -> None:
    at_ms = now_ms()
    prompt = ev.Message(
        channel="messenger",
        occurred_at=ev.from_ms(at_ms),
        key="survey:1:prompt",
        role="bot",
        user_id=PSID,
        text="How did we do?",
        kind="survey_prompt",
        platform_message_id="m_survey_1",
    )
    assert stack.runtime.recorder.submit(prompt)
    stack.flush()
    echo = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": at_ms + 50,
                "messaging": [
                    {
                        "sender": {"id": PAGE},
                        "recipient": {"id": PSID},
                        "timestamp": at_ms + 40,
                        "message": {
                            "mid": "m_survey_1",
                            "is_echo": True,
                            "app_id": 99,
                            "text": "How did we do?",
                        },
                    },
                    {
                        "sender": {"id": PAGE},
                        "recipient": {"id": PSID},
                        "timestamp": at_ms + 45,
                        "message": {"mid": "m_agent_9", "is_echo": True, "text": "Thanks!"},
                    },
                ],
            }
        ],
    }
    assert post(stack.url, json.dumps(echo).encode()).status_code == 200
    stack.flush()
    with stack.session() as session:
        rows = session.execute(
            select(models.Message.key, models.Message.kind, models.Message.role).order_by(
                models.Message.occurred_at_ms
            )
        ).all()
    assert [tuple(row) for row in rows] == [
        ("survey:1:prompt", "survey_prompt", "bot"),
        ("messenger:m_agent_9", "message", "agent"),
    ]
