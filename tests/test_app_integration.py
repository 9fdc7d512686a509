"""The composed apps: a web survey from the widget to /metrics/csat, and `chatmw serve`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser.chromium import CHROMIUM, CHROMIUM_ARGS
from browser.servers import free_port, serve
from fastapi import FastAPI
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import select

from chatmw.app import mount_chatmw
from chatmw.app_config import load_app_config, parse_app_config
from chatmw.codecs import ChatReply, ChatRequest
from chatmw.config import Settings
from chatmw.metrics import REGISTRY
from chatmw.runtime import Runtime
from chatmw.security.keys import create_key
from chatmw.security.privacy import PrivacySettings
from chatmw.security.secret import Secret
from chatmw.store import models
from chatmw.store.models_surveys import Survey
from chatmw.surveys.config import parse_config
from chatmw.widget import WidgetSettings, create_site_router, example_site_dir
from chatmw.widget import router as widget_router

SITE = "http://site.test"
VISITOR = "visitor_0123456789abcd"
CONVERSATION = "conversation_0123456789"
PROMPT = "How satisfied are you with this chat?"
THANKS = "Thank you for your rating!"
DEADLINE_S = 30.0
CHATMW = str(Path(sys.executable).parent / "chatmw")

SURVEYS = parse_config({
    "surveys": {
        "csat": {
            "kind": "csat",
            "channels": ["web"],
            "trigger": "ended",
            "delay_minutes": 0,
            "cooldown_days": 0,
            "texts": {"en": {"prompt": PROMPT, "reask": "Please pick 1 to 5.", "thanks": THANKS}},
        }
    },
    "dispatcher": {"poll_seconds": 0.2, "retry_backoff_seconds": 0.2},
})


class FarewellBot:
    """Replies to every message; ``bye`` ends the conversation. Keeps the texts it received."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def __call__(self, request: ChatRequest) -> list[ChatReply]:
        self.received.append(request.text or "")
        if request.text == "bye":
            return [ChatReply(text="Goodbye!", intent="goodbye", ended=True)]
        return [ChatReply(text="Our shop opens at 9.", intent="opening_hours")]


def message(text: str, number: int, display: str | None = None) -> dict[str, object]:
    return {"visitor_id": VISITOR, "conversation_id": CONVERSATION,
            "message_id": f"message_{number:08d}", "text": text, "display": display}


async def poll_until(client: httpx.AsyncClient, count: int) -> list[dict[str, object]]:
    """Poll the widget's outbox until ``count`` messages arrived, or fail at the deadline."""
    received: list[dict[str, object]] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(received) < count and time.monotonic() < deadline:
        response = await client.post("/chat/poll", json={"visitor_id": VISITOR})
        assert response.status_code == 200, response.text
        received += response.json()["replies"]
        await asyncio.sleep(0.05)
    return received


def test_web_survey_answered_through_widget(database_url: str) -> None:
    bot = FarewellBot()
    runtime = Runtime.from_settings(
        Settings(database_url=database_url),
        privacy=PrivacySettings(pseudonym_key=Secret("k" * 32)),
    )
    app = FastAPI()
    mount = mount_chatmw(app, runtime, surveys=SURVEYS,
                         widget=WidgetSettings(allowed_origins=[SITE], bot=bot, rate_burst=100))

    async def scenario() -> tuple[dict[str, object], ...]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://chatmw",
                              headers={"Origin": SITE}) as client,
        ):
            key = create_key(runtime.engine, "read").key
            first = (await client.post("/chat/messages", json=message("when do you open?", 1)))
            last = (await client.post("/chat/messages", json=message("bye", 2)))
            assert runtime.recorder.flush(10)
            prompts = await poll_until(client, 1)
            stars = prompts[0]["buttons"][3]  # type: ignore[index]
            answer = await client.post(
                "/chat/messages", json=message(stars["payload"], 3, stars["title"]))
            assert runtime.recorder.flush(10)
            thanks = await poll_until(client, 1)
            unauthorised = await client.get("/metrics/csat")
            figures = await client.get("/metrics/csat", headers={"X-API-Key": key})
            return (first.json(), last.json(), prompts, answer.json(), thanks,
                    {"status": unauthorised.status_code}, figures.json())

    first, last, prompts, answer, thanks, unauthorised, figures = asyncio.run(scenario())

    assert [reply["text"] for reply in first["replies"]] == ["Our shop opens at 9."]
    assert [reply["text"] for reply in last["replies"]] == ["Goodbye!"]
    assert len(prompts) == 1
    prompt = prompts[0]
    assert prompt["text"] == PROMPT
    assert set(prompt) == {"id", "text", "buttons"}
    payloads = [button["payload"] for button in prompt["buttons"]]
    survey_id = payloads[0].split(":")[1]
    assert payloads == [f"survey:{survey_id}:{score}" for score in range(1, 6)]

    # The button's payload is recorded, not sent to the bot.
    assert bot.received == ["when do you open?", "bye"]
    assert answer["replies"] == []
    assert [item["text"] for item in thanks] == [THANKS]
    assert unauthorised == {"status": 401}
    assert figures["sent"] == 1
    assert figures["answers"] == 1
    assert figures["satisfied"] == 1
    assert figures["response_rate_pct"] == 100
    assert figures["mean"] == 4
    assert figures["score"] == 100
    assert figures["distribution"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 0}

    with runtime.engine.connect() as connection:
        survey = connection.execute(select(Survey.state, Survey.score)).one()
        kinds = connection.execute(
            select(models.Message.kind, models.Message.role)
            .order_by(models.Message.occurred_at_ms, models.Message.id)).all()
        user_ids = set(connection.execute(select(models.Contact.external_id)).scalars())
    assert tuple(survey) == ("answered", 4)
    assert [tuple(row) for row in kinds] == [
        ("message", "user"), ("message", "bot"), ("message", "user"), ("message", "bot"),
        ("survey_prompt", "bot"), ("survey_answer", "user"), ("survey_prompt", "bot")]
    # The visitor id is stored only as a pseudonym, yet the prompt reached the visitor.
    assert VISITOR not in user_ids
    assert mount.dispatcher is not None


def test_widget_without_surveys_forwards_everything(tmp_path: Path) -> None:
    bot = FarewellBot()
    runtime = Runtime.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'w.db'}"))
    app = FastAPI()
    mount_chatmw(app, runtime, widget=WidgetSettings(allowed_origins=[SITE], bot=bot))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://chatmw",
                              headers={"Origin": SITE}) as client,
        ):
            reply = await client.post("/chat/messages", json=message("survey:1:4", 1))
            poll = await client.post("/chat/poll", json={"visitor_id": VISITOR})
            return reply, poll

    reply, poll = asyncio.run(scenario())
    assert bot.received == ["survey:1:4"]
    assert [item["text"] for item in reply.json()["replies"]] == ["Our shop opens at 9."]
    assert "poll_seconds" not in reply.json()
    assert poll.json() == {"replies": [], "poll_seconds": 0}


def test_poll_rejects_other_origins(tmp_path: Path) -> None:
    runtime = Runtime.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'o.db'}"))
    app = FastAPI()
    mount_chatmw(app, runtime, surveys=SURVEYS,
                 widget=WidgetSettings(allowed_origins=[SITE], bot=FarewellBot()),
                 manage_lifespan=False)
    transport = httpx.ASGITransport(app=app)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://chatmw") as client:
            statuses = []
            for origin, body in ((None, {"visitor_id": VISITOR}),
                                 ("http://evil.test", {"visitor_id": VISITOR}),
                                 (SITE, {"visitor_id": "short"})):
                headers = {"Origin": origin} if origin else {}
                response = await client.post("/chat/poll", json=body, headers=headers)
                statuses.append(response.status_code)
            return statuses

    assert asyncio.run(scenario()) == [403, 403, 422]


# Configuration


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    cases = [
        ({"api": {"burst": 0}}, "api.burst"),
        ({"api": {"require_keys": "yes"}}, "api.require_keys"),
        ({"api": {"colour": 1}}, "api.colour"),
        ({"privacy": {"text_mode": "all"}}, "privacy.text_mode"),
        ({"metrics_prefix": "metrics"}, "metrics_prefix"),
        ({"surveys": {"csat": {"kind": "csat", "sampling_rate": 1.5}}}, "surveys.csat"),
        ({"business_hours": {"hours": {"mon": ["25:00-26:00"]}}}, "business_hours.hours"),
        ({"unknown": 1}, "unknown"),
    ]
    for document, setting in cases:
        with pytest.raises(ValueError) as raised:
            parse_app_config(document, f"sqlite:///{tmp_path / 'c.db'}", environ={})
        assert str(raised.value).startswith(setting), (document, str(raised.value))


def test_config_file_read(tmp_path: Path) -> None:
    path = tmp_path / "chatmw.toml"
    path.write_text(
        'database_url = "sqlite:///from-file.db"\n'
        'metrics_prefix = "/stats"\n'
        "[api]\nrequire_keys = false\nburst = 5\n"
        '[privacy]\ntext_mode = "none"\n'
        '[business_hours]\ntimezone = "Europe/Paris"\nhours = { mon-fri = ["09:00-18:00"] }\n',
        encoding="utf-8",
    )
    config = load_app_config(path, environ={})
    overridden = load_app_config(path, database_url="sqlite:///cli.db", environ={})

    assert config.settings.database_url == "sqlite:///from-file.db"
    assert overridden.settings.database_url == "sqlite:///cli.db"
    assert config.settings.metrics_prefix == "/stats"
    assert config.require_keys is False
    assert config.key_burst == 5
    assert config.privacy is not None
    assert config.privacy.text_mode == "none"
    assert config.privacy.pseudonymise is True
    assert config.business_hours is not None
    assert config.surveys is None
    with pytest.raises(ValueError, match="cannot be read"):
        load_app_config(tmp_path / "missing.toml", environ={})


def test_example_configs_valid() -> None:
    examples = Path(__file__).resolve().parents[1] / "examples"
    config = load_app_config(examples / "chatmw.toml", environ={})
    with open(examples / "surveys.toml", "rb") as handle:
        surveys = tomllib.load(handle)
    with open(examples / "chatmw.toml", "rb") as handle:
        combined = parse_app_config({**tomllib.load(handle), **surveys}, environ={})

    assert config.business.currency == "EUR"
    assert config.business_hours is not None
    assert config.surveys is None
    assert combined.surveys is not None
    assert combined.surveys.surveys


# chatmw serve in its own process


def chatmw(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHATMW, *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


@pytest.fixture
def serve_env(database_url: str) -> dict[str, str]:
    env = dict(os.environ, CHATMW_DATABASE_URL=database_url, CHATMW_PSEUDONYM_KEY="p" * 32)
    env.pop("CHATMW_CONFIG", None)
    return env


@pytest.fixture
def served(serve_env: dict[str, str]) -> Iterator[str]:
    upgraded = chatmw("db", "upgrade", env=serve_env)
    assert upgraded.returncode == 0, upgraded.stderr
    port = free_port()
    process = subprocess.Popen(
        [CHATMW, "serve", "--port", str(port)],
        env=serve_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(base + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        yield base
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_serve_requires_read_key(served: str, serve_env: dict[str, str]) -> None:
    created = chatmw("keys", "create", "--scope", "read", env=serve_env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()

    with httpx.Client(base_url=served, timeout=30) as client:
        anonymous = client.get("/metrics/summary")
        wrong = client.get("/metrics/summary", headers={"Authorization": "Bearer cmw_nope"})
        summary = client.get("/metrics/summary", headers={"Authorization": f"Bearer {key}"})
        erase = client.delete("/metrics/admin/contacts/web/someone",
                              headers={"Authorization": f"Bearer {key}"})
        dashboard = client.get("/metrics/dashboard")
        options = client.get("/metrics/dashboard/options")
        health = client.get("/metrics/health", headers={"X-API-Key": key})
        schema = client.get("/openapi.json").json()

    assert anonymous.status_code == 401
    assert anonymous.json()["detail"]["error"] == "missing_api_key"
    assert wrong.status_code == 401
    assert summary.status_code == 200
    assert summary.json()["totals"]["messages"] == 0
    assert erase.status_code == 403
    assert dashboard.status_code == 200
    assert "text/html" in dashboard.headers["content-type"]
    assert options.status_code == 401
    assert health.status_code == 200
    assert health.json()["state"] == "healthy"
    paths = set(schema["paths"])
    missing = [name for name in REGISTRY if f"/metrics/{name}" not in paths]
    assert missing == []
    for path in ("/metrics/live", "/metrics/csat", "/metrics/nps", "/business/conversions",
                 "/surveys/config", "/metrics/admin/contacts/{channel}/{user_id}"):
        assert path in paths


def test_serve_no_auth_refused_off_loopback(serve_env: dict[str, str]) -> None:
    refused = chatmw("serve", "--no-auth", "--host", "0.0.0.0", env=serve_env)
    invalid = chatmw("serve", "--config", "/nonexistent/chatmw.toml", env=serve_env)

    assert refused.returncode == 2
    assert "loopback" in refused.stderr
    assert invalid.returncode == 2
    assert "cannot be read" in invalid.stderr


# The widget in a browser


@pytest.fixture
def page() -> Iterator[Page]:
    """A page of a Chromium started for this test only.

    The session's shared browser (``browser.chromium``) keeps Playwright's event loop
    running until the session ends, which makes ``asyncio.run`` fail in every later test.
    """
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install Debian's chromium package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def test_browser_shows_survey_after_goodbye(
    page: Page, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(widget_router, "POLL_SECONDS", 1)
    runtime = Runtime.from_settings(
        Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}"),
        privacy=PrivacySettings(pseudonym_key=Secret("k" * 32)),
    )
    port = free_port()
    app = FastAPI()
    site_dir = example_site_dir()
    assert site_dir is not None
    app.include_router(create_site_router(site_dir))
    mount_chatmw(app, runtime, surveys=SURVEYS,
                 widget=WidgetSettings(allowed_origins=[f"http://127.0.0.1:{port}"],
                                       bot=FarewellBot()))

    with serve(app, port, lifespan="on") as server:
        page.goto(server.url + "/")
        page.get_by_role("button", name="Open chat").click()
        box = page.get_by_role("textbox", name="Message")
        box.fill("bye")
        box.press("Enter")
        expect(page.locator(".message.bot .text", has_text="Goodbye!")).to_be_visible()
        expect(page.locator(".message.bot .text", has_text=PROMPT)).to_be_visible()
        stars = page.get_by_role("group", name="Suggested replies").get_by_role("button")
        expect(stars).to_have_count(5)
        stars.nth(3).click()
        expect(page.locator(".message.bot .text", has_text=THANKS)).to_be_visible()
        assert runtime.recorder.flush(10)
        with runtime.engine.connect() as connection:
            survey = connection.execute(select(Survey.state, Survey.score)).one()

    assert tuple(survey) == ("answered", 4)
