"""The widget in a real headless Chromium, against real servers on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from browser.chromium import chromium  # noqa: F401 - a fixture, found by pytest by this name
from browser.servers import ServerThread, free_port, serve
from browser.sites import embedding_page_app, example_site_app, wait_until
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import func, select

from chatmw import events as ev
from chatmw._demo.faq_bot import create_app
from chatmw.codecs import ChatReply, ChatRequest
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.store import models
from chatmw.widget import WidgetSettings, example_site_dir, mount_widget
from chatmw.widget.demo import mount_demo_site
from chatmw.widget.example_bot import EXAMPLE_BOT_PATH, create_example_bot

XSS = '<img src=x onerror="window.__xss=1">'
HELLO_REPLY = "Hello! Ask me about pricing, or anything else."


class ListSink:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def submit(self, event: ev.Event) -> bool:
        self.events.append(event)
        return True


@pytest.fixture(scope="module")
def bot_url() -> Iterator[str]:
    with serve(create_example_bot()) as server:
        yield server.url + EXAMPLE_BOT_PATH


@pytest.fixture
def runtime(database_url: str) -> Iterator[Runtime]:
    runtime = Runtime.from_settings(Settings(database_url=database_url))
    runtime.start(migrate=False)
    yield runtime
    runtime.stop()


def demo_server(runtime: Runtime, bot_url: str) -> ServerThread:
    """The example site and the chat endpoint on one origin, wired with ``mount_widget``."""
    port = free_port()
    settings = WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"], bot_url=bot_url)
    app = FastAPI()
    mount_widget(app, runtime, settings, site_dir=example_site_dir())
    return ServerThread(app, port)


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:  # noqa: F811 - the imported fixture
    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


def widget(page: Page):
    return page.locator("#chatmw-widget")


def open_chat(page: Page) -> None:
    page.get_by_role("button", name="Open chat").click()
    expect(page.get_by_role("dialog", name="Acme assistant")).to_be_visible()


def say(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def expect_bot_message(page: Page, text: str) -> None:
    expect(page.locator(".message.bot .text", has_text=text).last).to_be_visible()


def shadow_focus(page: Page) -> str:
    return page.evaluate(
        "() => { const node = document.querySelector('#chatmw-widget').shadowRoot.activeElement;"
        " return node ? (node.id || node.className) : ''; }"
    )


# Attribution and the stored conversation, on SQLite and PostgreSQL


def test_conversation_carries_attribution(
    chromium: Browser,  # noqa: F811 - the imported fixture
    runtime: Runtime,
    bot_url: str,
) -> None:
    server = demo_server(runtime, bot_url).start()
    try:
        context = chromium.new_context()
        page = context.new_page()
        page.set_default_timeout(10_000)
        landing = f"{server.url}/?utm_source=newsletter&utm_campaign=spring"
        page.goto(landing, referer="https://news.example/")
        expect(page.get_by_role("button", name="Open chat")).to_be_visible()
        open_chat(page)
        say(page, "hello")
        expect_bot_message(page, HELLO_REPLY)

        # A navigation that drops the query string keeps the transcript and the attribution.
        page.get_by_role("link", name="See pricing").click()
        page.wait_for_url(f"{server.url}/pricing.html")
        expect_bot_message(page, HELLO_REPLY)
        say(page, "what are your plans?")
        expect_bot_message(page, "Would you like a demo?")
        page.get_by_role("button", name="Yes, book a demo").click()
        expect_bot_message(page, "Great, a demo request is on its way to our team.")
        expect(page.get_by_role("button", name="No, thanks")).to_be_disabled()

        # A second conversation on a page without campaign parameters.
        page.evaluate("() => localStorage.removeItem('chatmw:conversation')")
        page.reload()
        expect(page.locator(".message")).to_have_count(0)
        say(page, "hi")
        expect_bot_message(page, HELLO_REPLY)

        # A later visit (a new browser session) from an ad click: first touch stays.
        storage = context.storage_state()
        later = chromium.new_context(storage_state=storage)
        later_page = later.new_page()
        later_page.goto(f"{server.url}/pricing.html?utm_source=google&utm_medium=cpc&gclid=g-123")
        open_chat(later_page)
        say(later_page, "back again")
        expect_bot_message(later_page, "You said: back again")
        later.close()
        context.close()
    finally:
        server.stop()
    assert runtime.recorder.flush(10)

    engine = runtime.engine
    with engine.connect() as connection:
        wait_until(
            lambda: (
                connection.execute(select(func.count()).select_from(models.Exposure)).scalar() >= 6
            )
        )
        conversations = connection.execute(
            select(
                models.Conversation.id,
                models.Conversation.channel,
                models.Conversation.user_message_count,
                models.Conversation.first_response_ms,
                models.Conversation.first_touch_id,
                models.Conversation.last_touch_id,
            ).order_by(models.Conversation.started_at_ms)
        ).all()
        messages = connection.execute(
            select(
                models.Message.conversation_id,
                models.Message.role,
                models.Message.text,
                models.Message.latency_ms,
                models.Message.response_ms,
                models.Message.meta,
            ).order_by(models.Message.occurred_at_ms, models.Message.id)
        ).all()
        touches = {row.id: row for row in connection.execute(select(models.Touch)).all()}
        exposures = connection.execute(select(models.Exposure.kind)).scalars().all()

    assert len(conversations) == 2
    first, second = conversations
    assert {c.channel for c in conversations} == {"web"}
    assert first.user_message_count == 3
    assert second.user_message_count == 2
    for conversation in conversations:
        first_touch = touches[conversation.first_touch_id]
        assert (first_touch.source, first_touch.campaign, first_touch.kind) == (
            "newsletter",
            "spring",
            "utm",
        )
        assert first_touch.landing_url == landing
        assert first_touch.referrer == "https://news.example/"
        assert first_touch.meta == {"touch": "first"}
        assert conversation.first_response_ms is not None and conversation.first_response_ms >= 0
    assert touches[first.last_touch_id].source == "newsletter"
    last_of_second = touches[second.last_touch_id]
    assert (last_of_second.kind, last_of_second.source, last_of_second.medium) == (
        "click",
        "google",
        "cpc",
    )
    assert last_of_second.click_id == "g-123"
    assert last_of_second.meta == {"touch": "last", "click_id_param": "gclid"}

    first_messages = [m for m in messages if m.conversation_id == first.id]
    assert [(m.role, m.text) for m in first_messages] == [
        ("user", "hello"),
        ("bot", HELLO_REPLY),
        ("user", "what are your plans?"),
        ("bot", "Starter is $19 a month and Team is $49 a month."),
        ("bot", "Would you like a demo?"),
        ("user", "/request_demo"),
        ("bot", "Great, a demo request is on its way to our team."),
    ]
    assert first_messages[2].meta == {"page": "/pricing.html"}
    assert first_messages[5].meta == {"page": "/pricing.html", "button_title": "Yes, book a demo"}
    for message in messages:
        if message.role == "bot":
            assert message.latency_ms is not None and 0 < message.latency_ms < 5000
    timed = [m for m in messages if m.response_ms is not None]
    assert len(timed) == 5  # one per user message: the reply to each run
    # The reply time covers the bot's latency plus the endpoint's own work.
    for message in timed:
        assert message.response_ms >= message.latency_ms - 1
    # Four page loads and two opens by the visitor (the reload restores the open panel).
    assert sorted(exposures) == ["impression"] * 4 + ["open"] * 2


# Rendering, keyboard and errors


def test_markup_renders_as_text(page: Page, bot_url: str) -> None:
    sink = ListSink()
    port = free_port()
    settings = WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"], bot_url=bot_url)
    with serve(example_site_app(settings, sink), port) as server:
        page.goto(server.url + "/")
        open_chat(page)
        say(page, XSS)
        expect_bot_message(page, "You said: " + XSS)
        expect(page.locator(".message.user .text").first).to_have_text(XSS)
        page.reload()
        expect_bot_message(page, "You said: " + XSS)
        images = widget(page).locator("img").count()
        injected = page.evaluate("() => window.__xss")

    assert images == 0
    assert injected is None
    assert [e.text for e in sink.events if isinstance(e, ev.Message)] == [XSS, "You said: " + XSS]


def test_keyboard_only_conversation(page: Page, bot_url: str) -> None:
    sink = ListSink()
    port = free_port()
    settings = WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"], bot_url=bot_url)
    with serve(example_site_app(settings, sink), port) as server:
        page.goto(server.url + "/")
        launcher = page.get_by_role("button", name="Open chat")
        expect(launcher).to_be_visible()
        for _ in range(10):
            page.keyboard.press("Tab")
            if shadow_focus(page) == "launcher":
                break
        assert shadow_focus(page) == "launcher"
        expect(launcher).to_have_attribute("aria-expanded", "false")

        page.keyboard.press("Enter")
        expect(page.get_by_role("dialog")).to_be_visible()
        assert shadow_focus(page) == "chatmw-input"
        page.keyboard.type("slow")
        page.keyboard.press("Enter")
        typing = page.get_by_role("status")
        expect(typing).to_be_visible()
        expect(typing).to_have_text("Assistant is typing")
        expect_bot_message(page, "Sorry for the wait: that took a moment.")
        expect(typing).to_be_hidden()
        expect(page.get_by_role("log")).to_have_attribute("aria-live", "polite")
        assert shadow_focus(page) == "chatmw-input"

        page.keyboard.press("Escape")
        expect(page.get_by_role("dialog")).to_be_hidden()
        assert shadow_focus(page) == "launcher"
        expect(page.get_by_role("button", name="Open chat")).to_have_attribute(
            "aria-expanded", "false"
        )


def test_error_and_retry_when_bot_down(page: Page, runtime: Runtime) -> None:
    bot_port = free_port()
    bot_url = f"http://127.0.0.1:{bot_port}{EXAMPLE_BOT_PATH}"
    with serve_started(demo_server(runtime, bot_url)) as server:
        page.goto(server.url + "/")
        open_chat(page)
        say(page, "hello")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The assistant is not available right now.")
        retry = page.get_by_role("button", name="Retry")
        expect(retry).to_be_visible()
        retry.click()
        expect(alert).to_contain_text("The assistant is not available right now.")

        # The unsent message follows the visitor to the next page, still ready to retry.
        page.get_by_role("link", name="See pricing").click()
        page.wait_for_url(f"{server.url}/pricing.html")
        expect(alert).to_contain_text("Your last message was not sent.")
        with serve(create_example_bot(), bot_port):
            retry.click()
            expect_bot_message(page, HELLO_REPLY)
        expect(alert).to_be_hidden()
        expect(page.locator(".message.user")).to_have_count(1)
        page.reload()
        expect_bot_message(page, HELLO_REPLY)
        expect(alert).to_be_hidden()
    assert runtime.recorder.flush(10)

    with runtime.engine.connect() as connection:
        rows = connection.execute(
            select(models.Message.role, models.Message.text).order_by(models.Message.occurred_at_ms)
        ).all()
    assert [tuple(row) for row in rows] == [("user", "hello"), ("bot", HELLO_REPLY)]


def test_other_origin_embeds_widget(page: Page, bot_url: str) -> None:
    sink = ListSink()
    site_port, stranger_port = free_port(), free_port()
    while stranger_port == site_port:  # two free ports, not the same one twice
        stranger_port = free_port()
    site_origin = f"http://127.0.0.1:{site_port}"
    settings = WidgetSettings(allowed_origins=[site_origin], bot_url=bot_url)
    with serve(example_site_app(settings, sink)) as chat_server:
        script_url = chat_server.url + "/chat/widget.js"
        with (
            serve(embedding_page_app(script_url), site_port) as site,
            serve(embedding_page_app(script_url), stranger_port) as stranger,
        ):
            page.goto(site.url + "/?utm_source=partner")
            open_chat_anywhere(page)
            say(page, "hello")
            expect_bot_message(page, HELLO_REPLY)

            page.goto(stranger.url + "/")
            open_chat_anywhere(page)
            say(page, "hello from elsewhere")
            expect(page.get_by_role("alert")).to_be_visible()
            expect(page.locator(".message.bot")).to_have_count(0)

    texts = [e.text for e in sink.events if isinstance(e, ev.Message)]
    assert texts == ["hello", HELLO_REPLY]
    # The other origin's impression, open and message were all rejected.
    exposures = [e.kind for e in sink.events if isinstance(e, ev.Exposure)]
    assert sorted(exposures) == ["impression", "open"]
    touches = [e for e in sink.events if isinstance(e, ev.Touch)]
    assert {t.source for t in touches} == {"partner"}


def open_chat_anywhere(page: Page) -> None:
    page.get_by_role("button", name="Open chat").click()
    expect(page.get_by_role("dialog", name="Chat with us")).to_be_visible()


class serve_started:
    """Stops an already built server at the end of a ``with`` block, after starting it."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server

    def __enter__(self) -> ServerThread:
        return self.server.start()

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


# The demo app


def test_demo_app_serves_widget_site(page: Page, database_url: str) -> None:
    port = free_port()
    app = create_app(wrapped=True, database_url=database_url)
    assert mount_demo_site(app, app.state.chatmw, "127.0.0.1", port)
    with serve(app, port, lifespan="on") as server:
        page.goto(server.url + "/pricing.html?utm_source=newsletter&utm_campaign=spring")
        open_chat(page)
        say(page, "pricing")
        expect_bot_message(page, "Would you like a demo?")
        page.get_by_role("button", name="No, thanks").click()
        expect_bot_message(page, "No problem. I'm here if you need anything.")
        assert app.state.chatmw.recorder.flush(10)
        with app.state.chatmw.engine.connect() as connection:
            texts = (
                connection.execute(
                    select(models.Message.text)
                    .where(models.Message.role == "user")
                    .order_by(models.Message.occurred_at_ms)
                )
                .scalars()
                .all()
            )
            campaigns = connection.execute(select(models.Touch.campaign)).scalars().all()

    assert texts == ["pricing", "/deny"]
    assert set(campaigns) == {"spring"}


def test_rate_limit_shown_to_visitor(page: Page, bot_url: str) -> None:
    sink = ListSink()
    port = free_port()
    settings = WidgetSettings(
        allowed_origins=[f"http://127.0.0.1:{port}"],
        bot_url=bot_url,
        rate_burst=1,
        rate_per_minute=2,
    )
    with serve(example_site_app(settings, sink), port) as server:
        page.goto(server.url + "/")
        open_chat(page)
        say(page, "hello")
        expect_bot_message(page, HELLO_REPLY)
        say(page, "hello again")
        alert = page.get_by_role("alert")
        # One token every 30 s, so the wait is 30 s less the time since the first message.
        expect(alert).to_contain_text(
            re.compile(r"You are sending messages too quickly\. Try again in (2\d|30) seconds\.")
        )
        expect(page.get_by_role("button", name="Retry")).to_be_visible()

    texts = [e.text for e in sink.events if isinstance(e, ev.Message)]
    assert texts == ["hello", HELLO_REPLY]


def test_reply_buttons_send_payload(page: Page) -> None:
    async def survey_bot(request: ChatRequest) -> list[ChatReply]:
        if request.text and request.text.startswith("/rate"):
            return [ChatReply(text="Thanks for rating us.")]
        buttons = [
            {"title": f"{score} <b>stars</b>", "payload": f"/rate{score}"} for score in (1, 5)
        ]
        return [ChatReply(text="How did we do? <i>1-5</i>", extra={"buttons": buttons})]

    sink = ListSink()
    port = free_port()
    settings = WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"], bot=survey_bot)
    with serve(example_site_app(settings, sink), port) as server:
        page.goto(server.url + "/")
        open_chat(page)
        say(page, "done")
        expect_bot_message(page, "How did we do? <i>1-5</i>")
        group = page.get_by_role("group", name="Suggested replies")
        expect(group.get_by_role("button")).to_have_count(2)
        group.get_by_role("button", name="5 <b>stars</b>").click()
        expect_bot_message(page, "Thanks for rating us.")
        expect(page.locator(".message.user .text").last).to_have_text("5 <b>stars</b>")
        expect(group.get_by_role("button", name="1 <b>stars</b>")).to_be_disabled()
        markup = widget(page).locator("b, i").count()

    assert markup == 0
    user_messages = [e for e in sink.events if isinstance(e, ev.Message) and e.role == "user"]
    assert [m.text for m in user_messages] == ["done", "/rate5"]
    assert user_messages[1].meta["button_title"] == "5 <b>stars</b>"


def test_idle_conversation_starts_fresh(page: Page, bot_url: str) -> None:
    sink = ListSink()
    port = free_port()
    settings = WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"], bot_url=bot_url)
    with serve(example_site_app(settings, sink), port) as server:
        page.goto(server.url + "/")
        open_chat(page)
        say(page, "hello")
        expect_bot_message(page, HELLO_REPLY)
        # Thirty-one minutes of silence, while the page stays open.
        page.evaluate(
            "() => { const key = 'chatmw:conversation';"
            " const record = JSON.parse(localStorage.getItem(key));"
            " record.last = Date.now() - 31 * 60 * 1000;"
            " localStorage.setItem(key, JSON.stringify(record)); }"
        )
        say(page, "hi")
        expect_bot_message(page, HELLO_REPLY)
        expect(page.locator(".message")).to_have_count(2)
        page.reload()
        expect(page.locator(".message")).to_have_count(2)

    messages = [e for e in sink.events if isinstance(e, ev.Message)]
    assert [m.text for m in messages] == ["hello", HELLO_REPLY, "hi", HELLO_REPLY]
    assert messages[0].conversation_id == messages[1].conversation_id
    assert messages[2].conversation_id == messages[3].conversation_id
    assert messages[0].conversation_id != messages[2].conversation_id
