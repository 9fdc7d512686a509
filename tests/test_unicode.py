"""Unusual text through every HTTP entry point, read back from SQLite and PostgreSQL.

Emoji, right-to-left text and combining marks are stored exactly as sent. A lone surrogate
("\\ud800" in JSON) has no UTF-8 encoding and PostgreSQL rejects NUL in text, so both are
stored as U+FFFD on either database. Every value is
either stored or rejected with a 4xx that names the field. No request gets a 500 and the
recorder drops no event it accepted, except in the cases marked xfail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import select

from chatmw.adapters._meta import MetaSettings, sign
from chatmw.adapters.middleware import MetaWebhookMiddleware
from chatmw.app import mount_chatmw
from chatmw.codecs import ChatReply, ChatRequest, RasaCodec, replace_lone_surrogates
from chatmw.config import Settings
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.runtime import Runtime
from chatmw.security.keys import create_key
from chatmw.security.privacy import PrivacySettings
from chatmw.security.secret import Secret
from chatmw.store import models
from chatmw.widget import WidgetSettings

SITE = "http://site.test"
APP_SECRET = "unicode-app-secret"
BOT_PATH = "/webhooks/rest/webhook"
META_PATH = "/meta/webhook"
REPLACEMENT = "\ufffd"

# name -> the value sent; each is sent in every free-text field of every entry point.
VALUES = {
    "emoji": "😀👍🏽 👨‍👩‍👧 🇫🇷",
    "rtl": "مرحبا \u202eabc\u202c שלום",
    "combining": "e\u0301\u0327 Z\u0351\u0334 \u0e01\u0e34\u0e4a",
    "zero_width": "a\u200bb\ufeffc\u2060",
    "lone_surrogate": "x\ud800y\udfffz",
    "nul": "a\x00b",
}
STORED = VALUES | {"lone_surrogate": f"x{REPLACEMENT}y{REPLACEMENT}z", "nul": f"a{REPLACEMENT}b"}


def ascii_json(document: Any) -> bytes:
    """JSON with every non-ASCII character escaped, as many clients send it."""
    return json.dumps(document).encode()


async def echo_rasa(request: Request) -> Response:
    document = json.loads(await request.body())
    replies = [{"recipient_id": document.get("sender"), "text": document.get("message")}]
    return Response(ascii_json(replies), media_type="application/json")


async def meta_bot(request: Request) -> Response:
    await request.body()
    return Response("EVENT_RECEIVED")


async def echo_widget(request: ChatRequest) -> list[ChatReply]:
    return [ChatReply(text=request.text, intent="echo")]


@dataclass
class Harness:
    """A bot wrapped as the README shows, with the widget, Meta webhooks and every route."""

    client: httpx.AsyncClient
    runtime: Runtime
    admin_key: str

    def flush(self) -> None:
        assert self.runtime.recorder.flush(20), self.runtime.recorder.stats()

    def write_errors(self) -> dict[str, int]:
        return {reason: count for reason, count in self.runtime.recorder.stats().dropped.items()
                if count}

    def messages(self, **where: Any) -> list[models.Message]:
        statement = select(models.Message).filter_by(**where).order_by(models.Message.id)
        with self.runtime.engine.connect() as connection:
            return list(connection.execute(statement).all())

    def contact(self, contact_id: int | None) -> str | None:
        statement = select(models.Contact.external_id).where(models.Contact.id == contact_id)
        with self.runtime.engine.connect() as connection:
            return connection.execute(statement).scalar_one_or_none()


def build_app(runtime: Runtime, **widget: Any) -> FastAPI:
    bot = FastAPI()
    bot.add_api_route(BOT_PATH, echo_rasa, methods=["POST"])
    bot.add_api_route(META_PATH, meta_bot, methods=["POST"])
    bot.add_middleware(ChatMetricsMiddleware, recorder=runtime.recorder, codec=RasaCodec(),
                       paths=[BOT_PATH])
    bot.add_middleware(MetaWebhookMiddleware, runtime=runtime, path=META_PATH,
                       settings=MetaSettings(app_secret=APP_SECRET, verify_token="token"))
    settings = {"allowed_origins": [SITE], "bot": echo_widget, "rate_burst": 10_000,
                "event_burst": 10_000} | widget
    mount_chatmw(bot, runtime, require_keys=False, widget=WidgetSettings(**settings))
    return bot


@asynccontextmanager
async def harness(database_url: str, privacy: PrivacySettings | None = None,
                  **widget: Any) -> AsyncIterator[Harness]:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False),
                                    privacy=privacy)
    app = build_app(runtime, **widget)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://chatmw",
                          headers={"Origin": SITE}) as client,
    ):
        admin = await asyncio.to_thread(create_key, runtime.engine, "admin")
        yield Harness(client, runtime, admin.key)


def run(database_url: str, scenario: Callable[[Harness], Any],
        privacy: PrivacySettings | None = None, **widget: Any) -> Any:
    async def main() -> Any:
        async with harness(database_url, privacy, **widget) as h:
            return await scenario(h)

    return asyncio.run(main())


def check_status(name: str, response: httpx.Response) -> None:
    assert response.status_code < 500, f"{name}: {response.status_code} {response.text[:300]}"


def check_rejection(name: str, response: httpx.Response, field: str) -> None:
    assert 400 <= response.status_code < 500, f"{name}: {response.status_code}"
    assert field in response.text, f"{name}: {response.text[:300]}"


# The middleware-wrapped bot


def test_wrapped_bot_stores_text_intact(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for number, (name, value) in enumerate(VALUES.items()):
            sender = f"user-{name}-{value}"
            body = ascii_json({"sender": sender, "message": value,
                               "metadata": {"conversation_id": f"c-{number}-{value}"}})
            response = await h.client.post(BOT_PATH, content=body,
                                           headers={"content-type": "application/json"})
            assert response.status_code == 200, f"{name}: {response.text[:300]}"
            assert response.json() == [{"recipient_id": sender, "text": value}], name
        h.flush()

        assert h.write_errors() == {}
        for name in VALUES:
            stored = [row for row in h.messages(role="user") if row.text is not None
                      and row.text == STORED[name]]
            assert len(stored) == 1, f"{name}: user message not stored intact"
            assert h.contact(stored[0].contact_id) == f"user-{name}-{STORED[name]}"
            replies = h.messages(role="bot", conversation_id=stored[0].conversation_id)
            assert [row.text for row in replies] == [STORED[name]], name

    run(database_url, scenario)


def test_wrapped_bot_with_privacy_records_all(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for name, value in VALUES.items():
            text = f"mail me at a@b.example {value}"
            body = ascii_json({"sender": f"user-{value}", "message": text})
            response = await h.client.post(BOT_PATH, content=body,
                                           headers={"content-type": "application/json"})
            assert response.status_code == 200, f"{name}: {response.text[:300]}"
        h.flush()

        assert h.write_errors() == {}
        stored = h.messages(role="user")
        assert len(stored) == len(VALUES)
        assert all("a@b.example" not in (row.text or "") for row in stored)
        contacts = {h.contact(row.contact_id) for row in stored}
        assert len(contacts) == len(VALUES)
        assert contacts.isdisjoint({f"user-{STORED[name]}" for name in VALUES})

    run(database_url, scenario, PrivacySettings(pseudonym_key=Secret("k" * 32)))


# The widget's chat endpoint


def widget_message(number: int, text: str, **extra: Any) -> dict[str, Any]:
    return {"visitor_id": f"visitor_{number:014d}", "conversation_id": f"conversation_{number:08d}",
            "message_id": f"message_{number:010d}", "text": text, **extra}


def test_widget_stores_text_and_attribution(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for number, (name, value) in enumerate(VALUES.items()):
            touch = {"source": value, "campaign": value, "landing_url": f"https://site.test/{value}",
                     "referrer": f"https://{value}.example/"}
            body = widget_message(number, value, display=value, page_url=f"https://site.test/{value}",
                                  attribution={"first": touch, "last": touch})
            response = await h.client.post("/chat/messages", content=ascii_json(body),
                                           headers={"content-type": "application/json"})
            check_status(name, response)
            assert response.status_code == 200, f"{name}: {response.text[:300]}"
            # The bot gets the text as decoded: NUL kept, lone surrogates already replaced.
            assert response.json()["replies"][0]["text"] == replace_lone_surrogates(value), name
        h.flush()

        assert h.write_errors() == {}
        for name in VALUES:
            texts = [row.text for row in h.messages(role="user")]
            assert STORED[name] in texts, name
        with h.runtime.engine.connect() as connection:
            sources = set(connection.execute(select(models.Touch.source)).scalars())
        assert sources == {STORED[name] for name in VALUES}

    run(database_url, scenario)


def test_widget_rejects_bad_ids_by_name(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for name, value in VALUES.items():
            for field in ("visitor_id", "conversation_id", "message_id"):
                body = widget_message(1, "hello") | {field: f"id_{value}_0123456789"}
                response = await h.client.post("/chat/messages", content=ascii_json(body),
                                               headers={"content-type": "application/json"})
                check_rejection(name, response, field)

    run(database_url, scenario)


# Meta webhooks


def messenger_body(number: int, value: str) -> bytes:
    item = {"sender": {"id": f"psid-{value}"}, "recipient": {"id": "PAGE"},
            "timestamp": 1700000000000 + number,
            "message": {"mid": f"mid.{number}.{value}", "text": value}}
    return ascii_json({"object": "page", "entry": [{"id": "PAGE", "messaging": [item]}]})


def whatsapp_body(number: int, value: str) -> bytes:
    return ascii_json({"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{
        "field": "messages",
        "value": {"metadata": {"phone_number_id": "1"},
                  "contacts": [{"wa_id": f"wa-{number}", "profile": {"name": value}}],
                  "messages": [{"from": f"wa-{number}", "id": f"wamid.{number}.{value}",
                                "timestamp": str(1700000000 + number), "type": "text",
                                "text": {"body": value}}]},
    }]}]})


@pytest.mark.parametrize("make_body", [messenger_body, whatsapp_body],
                         ids=["messenger", "whatsapp"])
def test_meta_webhook_stores_text_intact(database_url: str, make_body: Callable[[int, str], bytes]
                                         ) -> None:
    async def scenario(h: Harness) -> None:
        for number, (name, value) in enumerate(VALUES.items()):
            body = make_body(number, value)
            response = await h.client.post(META_PATH, content=body, headers={
                "x-hub-signature-256": sign(body, APP_SECRET), "content-type": "application/json"})
            assert response.status_code == 200, f"{name}: {response.status_code}"
        h.flush()

        assert h.write_errors() == {}
        texts = [row.text for row in h.messages(role="user")]
        for name in VALUES:
            assert STORED[name] in texts, name

    run(database_url, scenario)


# Business endpoints


def business_bodies(number: int, value: str) -> dict[str, dict[str, Any]]:
    return {
        "conversions": {"key": f"conv-{number}-{value}", "name": value, "value": "1.00",
                        "currency": "EUR", "channel": "web", "user_id": f"u-{value}",
                        "meta": {"note": value}},
        "leads": {"channel": "web", "user_id": f"u-{value}", "email": f"{value}@example.com",
                  "meta": {"note": value}},
        "spend": {"day": "2026-03-01", "channel": "web", "campaign": value, "amount": "5"},
    }


async def post_business(h: Harness, names: list[str]) -> dict[str, httpx.Response]:
    headers = {"Authorization": f"Bearer {h.admin_key}", "content-type": "application/json"}
    responses = {}
    for number, name in enumerate(names):
        for route, body in business_bodies(number, VALUES[name]).items():
            responses[f"{route} {name}"] = await h.client.post(
                f"/business/{route}", content=ascii_json(body), headers=headers)
    return responses


def test_business_posts_store_or_name_field(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        names = [name for name in VALUES if name != "lone_surrogate"]
        for label, response in (await post_business(h, names)).items():
            check_status(label, response)
        h.flush()
        assert h.write_errors() == {}

    run(database_url, scenario)


def test_business_posts_lone_surrogate(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for label, response in (await post_business(h, ["lone_surrogate"])).items():
            check_status(label, response)

    run(database_url, scenario)


# Metrics query parameters


def test_metrics_params_never_fail(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        # A URL cannot carry a lone surrogate; test_raw_surrogate_bytes_in_query sends its bytes.
        for name, value in VALUES.items():
            if name == "lone_surrogate":
                continue
            for param in ("channel", "attr.plan", "source", "campaign", "ad", "tz", "since",
                          "group_by"):
                for path in ("/metrics/summary", "/metrics/volume", "/metrics/response-time"):
                    response = await h.client.get(path, params={param: value})
                    check_status(f"{path}?{param}={name}", response)
                    if response.status_code != 200:
                        check_rejection(name, response, param)

    run(database_url, scenario)


def test_raw_surrogate_bytes_in_query(database_url: str) -> None:
    async def scenario(h: Harness) -> Mapping[str, int]:
        statuses = {}
        for query in ("channel=%ED%A0%80", "attr.plan=%00", "tz=%FF", "source=%C0%AF"):
            response = await h.client.get(f"/metrics/summary?{query}")
            statuses[query] = response.status_code
        return statuses

    statuses = run(database_url, scenario)
    assert all(status < 500 for status in statuses.values()), statuses


def test_bot_validation_handler_kept() -> None:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from chatmw.app import _encode_validation_errors_safely

    async def own_handler(request: object, error: Exception) -> None:
        return None

    bot = FastAPI()
    bot.add_exception_handler(RequestValidationError, own_handler)
    _encode_validation_errors_safely(bot)
    assert bot.exception_handlers[RequestValidationError] is own_handler
