"""The widget's chat endpoint over real HTTP: replies, limits, origins, recording."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from browser.servers import free_port, serve
from fastapi import FastAPI
from sqlalchemy import select

from chatmw import events as ev
from chatmw.codecs import ChatReply, ChatRequest, RasaCodec
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.store import models
from chatmw.widget import WidgetSettings, create_widget_router
from chatmw.widget.example_bot import EXAMPLE_BOT_PATH, create_example_bot
from chatmw.widget.ratelimit import TokenBuckets

SITE = "http://site.test"
VISITOR = "visitor_0123456789abcd"
CONVERSATION = "conversation_0123456789"


class ListSink:
    """Keeps submitted events in a list, in order."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def submit(self, event: ev.Event) -> bool:
        self.events.append(event)
        return True

    def of_type(self, event_type: type) -> list:
        return [event for event in self.events if isinstance(event, event_type)]


@pytest.fixture(scope="module")
def bot_url() -> Iterator[str]:
    with serve(create_example_bot()) as server:
        yield server.url + EXAMPLE_BOT_PATH


def widget_app(settings: WidgetSettings, sink: object) -> FastAPI:
    app = FastAPI()
    app.include_router(create_widget_router(settings, sink))
    return app


@pytest.fixture(scope="module")
def shared_sink() -> ListSink:
    return ListSink()


@pytest.fixture
def sink(shared_sink: ListSink) -> ListSink:
    """The module's sink, emptied for each test."""
    shared_sink.events.clear()
    return shared_sink


@pytest.fixture(scope="module")
def chat(bot_url: str, shared_sink: ListSink) -> Iterator[httpx.Client]:
    """A client of one endpoint shared by the module, with a rate limit no test reaches."""
    settings = WidgetSettings(allowed_origins=[SITE], bot_url=bot_url, rate_burst=10_000)
    with (
        serve(widget_app(settings, shared_sink)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        yield client


def message_body(
    text: str = "hello", message_id: str = "message_00000001", **extra: object
) -> dict:
    body = {
        "visitor_id": VISITOR,
        "conversation_id": CONVERSATION,
        "message_id": message_id,
        "text": text,
        "page_url": "http://site.test/pricing.html?email=a@b.test",
    }
    body.update(extra)
    return body


def post_message(client: httpx.Client, body: object, origin: str | None = SITE) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    return client.post("/chat/messages", content=json.dumps(body), headers=headers)


# Three days ago: inside the window in which the endpoint trusts a touch time from the widget.
FIRST_AT = ev.to_ms(ev.now_utc() - timedelta(days=3))
ATTRIBUTION = {
    "first": {
        "source": "newsletter",
        "campaign": "spring",
        "landing_url": "http://site.test/?utm_source=newsletter",
        "referrer": "https://mail.test/",
        "at": FIRST_AT,
    },
    "last": {
        "source": "google",
        "medium": "cpc",
        "gclid": "abc123",
        "landing_url": "http://site.test/?gclid=abc123",
    },
}


# Replies and recorded events


def test_message_returns_bot_replies_with_buttons(chat: httpx.Client, sink: ListSink) -> None:
    response = post_message(chat, message_body("pricing"))

    assert response.status_code == 200
    body = response.json()
    assert body["conversation_id"] == CONVERSATION
    assert body["replies"][0] == {
        "text": "Starter is $19 a month and Team is $49 a month.",
        "buttons": [],
    }
    assert body["replies"][1]["buttons"] == [
        {"title": "Yes, book a demo", "payload": "/request_demo"},
        {"title": "No, thanks", "payload": "/deny"},
    ]
    assert response.headers["access-control-allow-origin"] == SITE


def test_message_records_user_and_bot_messages(chat: httpx.Client, sink: ListSink) -> None:
    post_message(chat, message_body("pricing", display="Pricing"))

    messages = sink.of_type(ev.Message)
    assert [m.role for m in messages] == ["user", "bot", "bot"]
    user, first_reply, second_reply = messages
    assert user.key == f"web:{CONVERSATION}:message_00000001"
    assert user.channel == "web"
    assert user.text == "pricing"
    assert user.meta == {"page": "/pricing.html", "button_title": "Pricing"}
    assert first_reply.key == user.key + ":reply:0"
    assert second_reply.key == user.key + ":reply:1"
    assert first_reply.reply_to == user.key
    assert first_reply.latency_ms is not None and first_reply.latency_ms > 0
    assert first_reply.occurred_at >= user.occurred_at
    assert second_reply.occurred_at - first_reply.occurred_at == timedelta(milliseconds=1)
    assert second_reply.meta["buttons"][0]["payload"] == "/request_demo"


def test_message_records_first_and_last_touch(chat: httpx.Client, sink: ListSink) -> None:
    post_message(chat, message_body(attribution=ATTRIBUTION))

    touches = sink.of_type(ev.Touch)
    assert [t.meta["touch"] for t in touches] == ["first", "last"]
    first, last = touches
    assert (first.kind, first.source, first.campaign, first.click_id) == (
        "utm",
        "newsletter",
        "spring",
        None,
    )
    assert first.occurred_at == ev.from_ms(FIRST_AT)
    assert first.referrer == "https://mail.test/"
    assert first.conversation_id == CONVERSATION
    assert (last.kind, last.source, last.medium, last.click_id) == (
        "click",
        "google",
        "cpc",
        "abc123",
    )
    assert last.meta["click_id_param"] == "gclid"
    assert first.key != last.key


def test_touch_keys_stable_across_messages(chat: httpx.Client, sink: ListSink) -> None:
    post_message(chat, message_body(attribution=ATTRIBUTION))
    post_message(
        chat, message_body("again", message_id="message_00000002", attribution=ATTRIBUTION)
    )

    keys = [t.key for t in sink.of_type(ev.Touch)]
    assert len(keys) == 4
    assert keys[:2] == keys[2:]


def test_touch_time_outside_window_replaced(chat: httpx.Client, sink: ListSink) -> None:
    stale = {"first": {"source": "old", "at": 1_000}, "last": {"source": "future", "at": 10**15}}
    before = ev.now_utc()
    post_message(chat, message_body(attribution=stale))

    for touch in sink.of_type(ev.Touch):
        assert touch.occurred_at >= before


def test_touch_urls_drop_other_parameters(chat: httpx.Client, sink: ListSink) -> None:
    touch = {
        "source": "newsletter",
        "landing_url": "https://site.test/a?email=x%40y.test&utm_source=newsletter&gclid=g1#top",
        "referrer": "https://search.test/results?q=my+name",
    }
    post_message(chat, message_body(attribution={"first": touch}))

    (stored,) = sink.of_type(ev.Touch)
    assert stored.landing_url == "https://site.test/a?utm_source=newsletter&gclid=g1"
    assert stored.referrer == "https://search.test/results"


def test_malformed_attribution_ignored(chat: httpx.Client, sink: ListSink) -> None:
    odd = {"first": {"source": 5, "campaign": ["x"], "medium": "m" * 400}, "last": "newsletter"}
    response = post_message(chat, message_body(attribution=odd))

    assert response.status_code == 200
    (touch,) = sink.of_type(ev.Touch)
    assert touch.source is None
    assert touch.campaign is None
    assert touch.medium == "m" * 255


def test_event_records_exposure(chat: httpx.Client, sink: ListSink) -> None:
    body = {
        "visitor_id": VISITOR,
        "event_id": "event_000000001",
        "kind": "impression",
        "page_url": "http://site.test/?utm_source=x",
        "conversation_id": None,
    }
    response = chat.post("/chat/events", json=body, headers={"Origin": SITE})

    assert response.status_code == 204
    (exposure,) = sink.of_type(ev.Exposure)
    assert exposure.kind == "impression"
    assert exposure.key == f"web:impression:{VISITOR}:event_000000001"
    assert exposure.meta == {"page": "/"}


def test_event_with_unknown_kind_rejected(chat: httpx.Client, sink: ListSink) -> None:
    body = {"visitor_id": VISITOR, "event_id": "event_000000001", "kind": "conversion"}
    response = chat.post("/chat/events", json=body, headers={"Origin": SITE})

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_kind"
    assert sink.events == []


def test_handler_bot_buttons_pass_through(sink: ListSink) -> None:
    async def survey_bot(request: ChatRequest) -> list[ChatReply]:
        buttons = [
            {"title": str(score), "payload": f'/csat{{"score": {score}}}'} for score in range(1, 6)
        ]
        return [
            ChatReply(text="How did we do?", extra={"buttons": buttons}),
            ChatReply(text=None, extra={"image": "x.png"}),
            ChatReply(text="Thanks", resolved=True),
        ]

    settings = WidgetSettings(allowed_origins=[SITE], bot=survey_bot)
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        response = post_message(client, message_body())

    replies = response.json()["replies"]
    assert len(replies) == 2
    assert [b["title"] for b in replies[0]["buttons"]] == ["1", "2", "3", "4", "5"]
    assert replies[0]["buttons"][4]["payload"] == '/csat{"score": 5}'
    (update,) = sink.of_type(ev.ConversationUpdate)
    assert update.resolved is True
    assert update.conversation_id == CONVERSATION


# Limits


def test_message_at_limit_accepted(chat: httpx.Client) -> None:
    response = post_message(chat, message_body("x" * 2000))

    assert response.status_code == 200


def test_message_over_limit_rejected(chat: httpx.Client, sink: ListSink) -> None:
    response = post_message(chat, message_body("x" * 2001))

    assert response.status_code == 413
    assert response.json() == {
        "error": "message_too_long",
        "detail": "message has 2001 characters; the maximum is 2000",
    }
    assert response.headers["access-control-allow-origin"] == SITE
    assert sink.events == []


def test_body_over_limit_rejected(chat: httpx.Client, sink: ListSink) -> None:
    response = post_message(chat, message_body(padding="p" * 40_000))

    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert sink.events == []


@pytest.mark.parametrize(
    "field,value",
    [
        ("visitor_id", None),
        ("visitor_id", "short"),
        ("visitor_id", "has space in it"),
        ("visitor_id", "x" * 65),
        ("conversation_id", "<script>alert(1)</script>"),
        ("conversation_id", 12345678),
        ("message_id", "../../etc/passwd"),
    ],
)
def test_malformed_id_rejected(
    chat: httpx.Client, sink: ListSink, field: str, value: object
) -> None:
    body = message_body()
    body[field] = value
    response = post_message(chat, body)

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_id"
    assert field in response.json()["detail"]
    assert sink.events == []


@pytest.mark.parametrize(
    "content,content_type,status,error",
    [
        ("{not json", "application/json", 400, "invalid_json"),
        ("[1, 2]", "application/json", 422, "invalid_body"),
        (json.dumps({"text": "hi"}), "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_malformed_body_rejected(
    chat: httpx.Client, content: str, content_type: str, status: int, error: str
) -> None:
    response = chat.post(
        "/chat/messages", content=content, headers={"Content-Type": content_type, "Origin": SITE}
    )

    assert response.status_code == status
    assert response.json()["error"] == error


def test_empty_text_rejected(chat: httpx.Client) -> None:
    response = post_message(chat, message_body("   "))

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_text"


def test_rate_limit_per_visitor(bot_url: str, sink: ListSink) -> None:
    settings = WidgetSettings(
        allowed_origins=[SITE], bot_url=bot_url, rate_burst=3, rate_per_minute=6
    )
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        statuses = [
            post_message(client, message_body(message_id=f"message_0000000{i}")).status_code
            for i in range(3)
        ]
        limited = post_message(client, message_body(message_id="message_00000009"))
        other = post_message(client, message_body(visitor_id="other_visitor_0001"))

    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    # Six a minute is one token every ten seconds; the bucket is just empty.
    assert 9 <= int(limited.headers["retry-after"]) <= 10
    assert "retry-after" in limited.headers["access-control-expose-headers"].lower()
    assert other.status_code == 200
    assert len(sink.of_type(ev.Message)) == 4 * 2


def test_token_bucket_refills_over_time() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_minute=60, burst=2, max_keys=2, clock=lambda: now[0])

    assert buckets.take("a") == 0
    assert buckets.take("a") == 0
    assert buckets.take("a") == pytest.approx(1.0)
    now[0] = 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] = 1.5
    assert buckets.take("a") == 0
    assert TokenBuckets.retry_after(0.2) == "1"
    assert TokenBuckets.retry_after(2.1) == "3"


def test_token_bucket_evicts_least_recent() -> None:
    buckets = TokenBuckets(rate_per_minute=1, burst=1, max_keys=2, clock=lambda: 0.0)
    buckets.take("a")
    buckets.take("b")
    buckets.take("c")

    assert buckets.take("a") == 0  # evicted, so it starts full again
    assert buckets.take("c") > 0


# Origins


def test_disallowed_origin_rejected(chat: httpx.Client, sink: ListSink) -> None:
    response = post_message(chat, message_body(), origin="http://evil.test")

    assert response.status_code == 403
    assert response.json()["error"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers
    assert sink.events == []


def test_missing_origin_rejected(chat: httpx.Client, sink: ListSink) -> None:
    response = post_message(chat, message_body(), origin=None)

    assert response.status_code == 403
    assert response.json()["error"] == "origin_missing"
    assert sink.events == []


def test_event_from_disallowed_origin_rejected(chat: httpx.Client, sink: ListSink) -> None:
    body = {"visitor_id": VISITOR, "event_id": "event_000000001", "kind": "open"}
    response = chat.post("/chat/events", json=body, headers={"Origin": "http://evil.test"})

    assert response.status_code == 403
    assert sink.events == []


@pytest.mark.parametrize("path", ["/chat/messages", "/chat/events"])
def test_preflight_allowed_origin(chat: httpx.Client, path: str) -> None:
    response = chat.options(
        path,
        headers={
            "Origin": SITE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == SITE
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "Content-Type"
    assert response.headers["vary"] == "Origin"


def test_preflight_disallowed_origin_rejected(chat: httpx.Client) -> None:
    response = chat.options(
        "/chat/messages",
        headers={"Origin": "http://site.test.evil.test", "Access-Control-Request-Method": "POST"},
    )

    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers


# Bot failures


def test_bot_down_returns_502(sink: ListSink) -> None:
    settings = WidgetSettings(allowed_origins=[SITE], bot_url=f"http://127.0.0.1:{free_port()}/bot")
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        response = post_message(client, message_body())

    assert response.status_code == 502
    assert response.json()["error"] == "bot_unavailable"
    assert [m.role for m in sink.of_type(ev.Message)] == ["user"]


def test_bot_error_status_returns_502(bot_url: str, sink: ListSink) -> None:
    settings = WidgetSettings(
        allowed_origins=[SITE], bot_url=bot_url.replace(EXAMPLE_BOT_PATH, "/missing")
    )
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        response = post_message(client, message_body())

    assert response.status_code == 502
    assert response.json()["detail"] == "The assistant is not available right now."


def test_bot_timeout_returns_504(sink: ListSink) -> None:
    async def slow_bot(request: ChatRequest) -> list[ChatReply]:
        await asyncio.sleep(5)
        return [ChatReply(text="late")]

    settings = WidgetSettings(allowed_origins=[SITE], bot=slow_bot, bot_timeout_s=0.2)
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        response = post_message(client, message_body())

    assert response.status_code == 504
    assert response.json()["error"] == "bot_timeout"


def test_unreadable_bot_response_returns_502(sink: ListSink) -> None:
    bot = FastAPI()

    @bot.post("/bot")
    async def not_a_list() -> dict:
        return {"text": "not the Rasa shape"}

    with serve(bot) as bot_server:
        settings = WidgetSettings(allowed_origins=[SITE], bot_url=bot_server.url + "/bot")
        with (
            serve(widget_app(settings, sink)) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            response = post_message(client, message_body())

    assert response.status_code == 502
    assert response.json()["error"] == "bot_bad_response"


# Assets and settings


def test_widget_assets_served(chat: httpx.Client) -> None:
    script = chat.get("/chat/widget.js")
    stylesheet = chat.get("/chat/widget.css")

    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert stylesheet.headers["content-type"].startswith("text/css")
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in script.text


def test_prefix_moves_paths(bot_url: str, sink: ListSink) -> None:
    settings = WidgetSettings(allowed_origins=[SITE], bot_url=bot_url, prefix="/api/v1")
    with serve(widget_app(settings, sink)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/v1/chat/widget.js").status_code == 200
        assert client.get("/chat/widget.js").status_code == 404


@pytest.mark.parametrize(
    "overrides,setting",
    [
        ({"allowed_origins": []}, "allowed_origins"),
        ({"allowed_origins": "http://site.test"}, "allowed_origins"),
        ({"allowed_origins": ["http://site.test/"]}, "allowed_origins"),
        ({"allowed_origins": ["site.test"]}, "allowed_origins"),
        ({"allowed_origins": ["HTTP://Site.test"]}, "allowed_origins"),
        ({"bot_url": None}, "bot_url"),
        ({"bot_url": "ftp://bot.test/"}, "bot_url"),
        ({"bot": 42}, "bot"),
        ({"prefix": "api"}, "prefix"),
        ({"prefix": "/api/"}, "prefix"),
        ({"max_message_chars": 0}, "max_message_chars"),
        ({"max_body_bytes": 100}, "max_body_bytes"),
        ({"rate_per_minute": 0}, "rate_per_minute"),
        ({"rate_burst": 0}, "rate_burst"),
        ({"bot_timeout_s": -1}, "bot_timeout_s"),
        ({"channel": ""}, "channel"),
    ],
)
def test_settings_reject_invalid_value(overrides: dict, setting: str) -> None:
    values = {"allowed_origins": [SITE], "bot_url": "http://127.0.0.1:5005/webhooks/rest/webhook"}
    values.update(overrides)

    with pytest.raises(ValueError, match=setting):
        WidgetSettings(**values)


def test_settings_accept_codec_and_handler() -> None:
    async def handler(request: ChatRequest) -> list[ChatReply]:
        return []

    assert WidgetSettings(
        allowed_origins=[SITE], bot=RasaCodec(), bot_url="http://bot.test/"
    ).bot_url
    assert (
        WidgetSettings(allowed_origins=[SITE, "https://www.site.test:8443"], bot=handler).bot_url
        is None
    )


# The store, on SQLite and PostgreSQL


def test_retried_message_stored_once(database_url: str, bot_url: str) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url))
    runtime.start(migrate=False)
    settings = WidgetSettings(allowed_origins=[SITE], bot_url=bot_url)
    try:
        with (
            serve(widget_app(settings, runtime.recorder)) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            for _ in range(2):
                assert (
                    post_message(
                        client, message_body("pricing", attribution=ATTRIBUTION)
                    ).status_code
                    == 200
                )
            event = {"visitor_id": VISITOR, "event_id": "event_000000001", "kind": "open"}
            for _ in range(2):
                assert (
                    client.post("/chat/events", json=event, headers={"Origin": SITE}).status_code
                    == 204
                )
        assert runtime.recorder.flush(10)
        with runtime.engine.connect() as connection:
            messages = connection.execute(
                select(
                    models.Message.role, models.Message.latency_ms, models.Message.response_ms
                ).order_by(models.Message.occurred_at_ms, models.Message.id)
            ).all()
            touches = connection.execute(
                select(models.Touch.source, models.Touch.meta).order_by(models.Touch.id)
            ).all()
            conversation = connection.execute(
                select(
                    models.Conversation.external_id,
                    models.Conversation.channel,
                    models.Conversation.user_message_count,
                    models.Conversation.first_touch_id,
                )
            ).one()
            first_touch_source = connection.execute(
                select(models.Touch.source).where(models.Touch.id == conversation.first_touch_id)
            ).scalar_one()
            exposures = connection.execute(select(models.Exposure.kind)).scalars().all()
    finally:
        runtime.stop()

    assert [row.role for row in messages] == ["user", "bot", "bot"]
    assert all(row.latency_ms > 0 for row in messages[1:])
    assert messages[1].response_ms is not None and messages[1].response_ms >= 0
    assert [(source, meta["touch"]) for source, meta in touches] == [
        ("newsletter", "first"),
        ("google", "last"),
    ]
    assert conversation.external_id == CONVERSATION
    assert conversation.channel == "web"
    assert conversation.user_message_count == 1
    assert first_touch_source == "newsletter"
    assert exposures == ["open"]
