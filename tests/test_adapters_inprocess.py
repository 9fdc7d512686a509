"""Python bots in process: the webhook middleware, the httpx transports and the senders."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from adapters_support import APP_SECRET, VERIFY_TOKEN, GraphStub, ServerThread, signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.httpx_hooks import AsyncRecordingTransport, RecordingTransport
from chatmw.adapters.messenger import MessengerSender
from chatmw.adapters.middleware import MetaWebhookMiddleware
from chatmw.adapters.whatsapp import WhatsAppSender
from chatmw.outbound import ListRow, OutboundMessage, QuickReply, Template


class ListSink:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def submit(self, event: ev.Event) -> bool:
        self.events.append(event)
        return True


@pytest.fixture(scope="module")
def graph() -> Iterator[tuple[GraphStub, str]]:
    stub = GraphStub()
    with ServerThread(stub.app()) as server:
        yield stub, server.url


def meta_settings(graph_url: str, **overrides: object) -> MetaSettings:
    values: dict[str, object] = {
        "app_secret": APP_SECRET,
        "verify_token": VERIFY_TOKEN,
        "graph_base_url": graph_url,
        "page_access_token": "page-token",
        "whatsapp_access_token": "wa-token",
        "whatsapp_phone_number_id": "230000000000001",
        "graph_timeout_s": 5,
    }
    values.update(overrides)
    return MetaSettings(**values)  # type: ignore[arg-type]


# The webhook middleware


def bot_app(seen: list[bytes]) -> Starlette:
    async def webhook(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("x-hub-signature-256") != signature(body):
            return JSONResponse({"error": "bad signature"}, status_code=403)
        seen.append(body)
        return JSONResponse({"bot": "handled", "bytes": len(body)}, headers={"x-bot": "1"})

    return Starlette(routes=[Route("/webhook", webhook, methods=["POST"])])


def wrapped(sink: ListSink, seen: list[bytes], max_body: int = 4096) -> MetaWebhookMiddleware:
    settings = MetaSettings(
        app_secret=APP_SECRET, verify_token=VERIFY_TOKEN, max_body_bytes=max_body
    )
    return MetaWebhookMiddleware(bot_app(seen), settings, sink=sink)


def whatsapp_body(text: str) -> bytes:
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
                                    "id": "wamid.mw1",
                                    "timestamp": "1767225600",
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(document, ensure_ascii=False).encode()


async def call(app: MetaWebhookMiddleware, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bot"
    ) as client:
        return await client.post("/webhook", content=body, headers=headers)


def test_middleware_records_and_passes_body_through() -> None:
    sink, seen = ListSink(), []
    body = whatsapp_body("Grüße 🌍")
    response = asyncio.run(
        call(wrapped(sink, seen), body, {"x-hub-signature-256": signature(body)})
    )
    assert response.status_code == 200
    assert response.json() == {"bot": "handled", "bytes": len(body)}
    assert response.headers["x-bot"] == "1"
    assert seen == [body]
    assert [(e.key, e.text) for e in sink.events] == [("whatsapp:wamid.mw1", "Grüße 🌍")]  # type: ignore[attr-defined]


def test_middleware_leaves_bad_signature_to_bot() -> None:
    sink, seen = ListSink(), []
    body = whatsapp_body("hi")
    response = asyncio.run(call(wrapped(sink, seen), body, {"x-hub-signature-256": "sha256=00"}))
    assert response.status_code == 403
    assert sink.events == []
    assert seen == []


def test_middleware_passes_oversized_body_unrecorded() -> None:
    sink, seen = ListSink(), []
    body = whatsapp_body("y" * 10_000)
    app = wrapped(sink, seen, max_body=1024)

    async def chunked() -> httpx.Response:
        async def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, len(body), 700):
                yield body[start : start + 700]

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bot") as client:
            return await client.post(
                "/webhook", content=chunks(), headers={"x-hub-signature-256": signature(body)}
            )

    response = asyncio.run(chunked())
    assert response.status_code == 200
    assert seen == [body]
    assert sink.events == []
    assert app.stats["too_large"] == 1


# The httpx transports


def test_async_transport_records_send_unchanged(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()

    async def send() -> tuple[httpx.Response, httpx.Response]:
        transport = AsyncRecordingTransport(sink.submit, graph_base_url=url)
        async with httpx.AsyncClient(transport=transport, base_url=url) as client:
            sent = await client.post(
                "/v21.0/230000000000001/messages",
                json={
                    "messaging_product": "whatsapp",
                    "to": "+49 151 0000 0001",
                    "type": "text",
                    "text": {"body": "Ihre Bestellung ist unterwegs 🚚"},
                },
            )
            other = await client.get("/v21.0/230000000000001")
        return sent, other

    sent, other = asyncio.run(send())
    assert sent.status_code == 200
    wamid = sent.json()["messages"][0]["id"]
    assert sent.headers["x-fb-trace-id"].startswith("trace-")
    assert other.status_code == 200
    assert len(sink.events) == 1
    message = sink.events[0]
    assert isinstance(message, ev.Message)
    assert (message.role, message.platform_message_id, message.user_id) == (
        "bot",
        wamid,
        "4915100000001",
    )
    assert message.text == "Ihre Bestellung ist unterwegs 🚚"


def test_sync_transport_records_messenger_send(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()
    with httpx.Client(transport=RecordingTransport(sink.submit, graph_base_url=url)) as client:
        answer = client.post(
            f"{url}/v21.0/me/messages",
            params={"access_token": "t"},
            json={"recipient": {"id": "7100000000000009"}, "message": {"text": "hola"}},
        )
        typing = client.post(
            f"{url}/v21.0/me/messages",
            json={"recipient": {"id": "7100000000000009"}, "sender_action": "typing_on"},
        )
        failed = client.post(
            f"{url}/v21.0/me/messages", json={"recipient": {"id": "fail"}, "message": {"text": "x"}}
        )
    assert answer.json()["recipient_id"] == "7100000000000009"
    assert typing.status_code == 200
    assert failed.status_code == 400
    assert [(e.platform_message_id, e.text) for e in sink.events] == [  # type: ignore[attr-defined]
        (answer.json()["message_id"], "hola")
    ]


def test_transport_ignores_other_hosts(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()
    transport = RecordingTransport(sink.submit, graph_base_url="http://127.0.0.1:9")
    with httpx.Client(transport=transport) as client:
        client.post(
            f"{url}/v21.0/me/messages", json={"recipient": {"id": "1"}, "message": {"text": "a"}}
        )
    assert sink.events == []


# The senders


def test_messenger_sender_sends_quick_replies(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()
    sender = MessengerSender(meta_settings(url), sink.submit)
    message = OutboundMessage(
        channel="messenger",
        user_id="7100000000000001",
        text="How did we do?",
        quick_replies=[QuickReply("Great", "CSAT_5"), QuickReply("Bad", "CSAT_1")],
        kind="survey_prompt",
        meta={"survey": "csat"},
    )
    result = asyncio.run(sender.send(message))
    assert result.ok
    call = stub.calls[-1]
    assert call["path"] == "/v27.0/me/messages"
    assert call["headers"]["authorization"] == "Bearer page-token"
    body = json.loads(call["body"])
    assert body["recipient"] == {"id": "7100000000000001"}
    assert body["message"]["quick_replies"] == [
        {"content_type": "text", "title": "Great", "payload": "CSAT_5"},
        {"content_type": "text", "title": "Bad", "payload": "CSAT_1"},
    ]
    recorded = sink.events[0]
    assert isinstance(recorded, ev.Message)
    assert recorded.platform_message_id == result.platform_message_id
    assert (recorded.role, recorded.kind, recorded.meta["survey"]) == (
        "bot",
        "survey_prompt",
        "csat",
    )


def test_whatsapp_sender_builds_buttons_lists_templates(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()
    sender = WhatsAppSender(meta_settings(url), sink.submit)
    buttons = OutboundMessage(
        channel="whatsapp",
        user_id="4915100000001",
        text="Rate us",
        quick_replies=[QuickReply(str(n), f"R{n}") for n in range(1, 4)],
    )
    listed = OutboundMessage(
        channel="whatsapp",
        user_id="4915100000001",
        text="Pick one",
        list_rows=[ListRow("Blue", "c_blue", "Navy")],
        list_button="Colours",
    )
    template = OutboundMessage(
        channel="whatsapp",
        user_id="4915100000001",
        template=Template("csat_survey", "de", [{"type": "body", "parameters": []}]),
    )
    results = [asyncio.run(sender.send(item)) for item in (buttons, listed, template)]
    assert all(result.ok for result in results)
    bodies = [json.loads(call["body"]) for call in stub.calls[-3:]]
    assert stub.calls[-1]["path"] == "/v27.0/230000000000001/messages"
    assert bodies[0]["interactive"]["type"] == "button"
    assert [b["reply"]["id"] for b in bodies[0]["interactive"]["action"]["buttons"]] == [
        "R1",
        "R2",
        "R3",
    ]
    assert bodies[1]["interactive"]["action"] == {
        "button": "Colours",
        "sections": [{"rows": [{"id": "c_blue", "title": "Blue", "description": "Navy"}]}],
    }
    assert bodies[2]["template"] == {
        "name": "csat_survey",
        "language": {"code": "de"},
        "components": [{"type": "body", "parameters": []}],
    }
    assert [e.platform_message_id for e in sink.events] == [r.platform_message_id for r in results]  # type: ignore[attr-defined]
    assert sink.events[2].meta["template"] == "csat_survey"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("recipient", "retryable"), [("fail", False), ("busy", True), ("throttled", True)]
)
def test_sender_failures_classified(
    graph: tuple[GraphStub, str], recipient: str, retryable: bool
) -> None:
    stub, url = graph
    sink = ListSink()
    sender = WhatsAppSender(meta_settings(url), sink.submit)
    result = asyncio.run(
        sender.send(OutboundMessage(channel="whatsapp", user_id=recipient, text="x"))
    )
    assert not result.ok
    assert result.retryable is retryable
    assert result.error
    assert sink.events == []


def test_sender_unreachable_graph_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    sender = MessengerSender(meta_settings(f"http://127.0.0.1:{closed_port}"))
    result = asyncio.run(sender.send(OutboundMessage(channel="messenger", user_id="1", text="x")))
    assert not result.ok
    assert result.retryable


def test_messenger_sender_rejects_templates(graph: tuple[GraphStub, str]) -> None:
    _, url = graph
    sender = MessengerSender(meta_settings(url))
    message = OutboundMessage(channel="messenger", user_id="1", template=Template("t", "en"))
    result = asyncio.run(sender.send(message))
    assert not result.ok
    assert not result.retryable
    with pytest.raises(ValueError, match="page_access_token"):
        MessengerSender(meta_settings(url, page_access_token=None))


def test_sender_factories_leave_recording_to_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatmw.adapters import messenger, whatsapp

    for name, value in {
        "CHATMW_META_APP_SECRET": "a",
        "CHATMW_META_VERIFY_TOKEN": "b",
        "CHATMW_GRAPH_BASE_URL": "http://127.0.0.1:9",
        "CHATMW_MESSENGER_PAGE_ACCESS_TOKEN": "p",
        "CHATMW_WHATSAPP_ACCESS_TOKEN": "w",
        "CHATMW_WHATSAPP_PHONE_NUMBER_ID": "1",
    }.items():
        monkeypatch.setenv(name, value)
    built = [messenger.sender_from_env(), whatsapp.sender_from_env()]
    assert [sender.records_sends for sender in built] == [False, False]
    assert [sender.channel for sender in built] == ["messenger", "whatsapp"]
    assert built[0].settings.graph_base_url == "http://127.0.0.1:9"
    assert MessengerSender(meta_settings("http://127.0.0.1:9"), ListSink().submit).records_sends


def test_transport_records_instagram_sends(graph: tuple[GraphStub, str]) -> None:
    stub, url = graph
    sink = ListSink()
    transport = RecordingTransport(
        sink.submit, graph_base_url=url, instagram_account_ids=frozenset({"17841400000000001"})
    )
    with httpx.Client(transport=transport) as client:
        for node in ("17841400000000001", "me"):
            client.post(
                f"{url}/v21.0/{node}/messages",
                json={"recipient": {"id": "5500000000000001"}, "message": {"text": "hi"}},
            )
    assert [(e.channel, e.user_id) for e in sink.events] == [  # type: ignore[attr-defined]
        ("instagram", "5500000000000001"),
        ("messenger", "5500000000000001"),
    ]
    assert sink.events[0].key.startswith("instagram:")  # type: ignore[attr-defined]
