"""HTTP entry points under generated requests, in process.

Every operation of the app ``mount_chatmw`` builds gets schemathesis' valid and invalid
requests on a small SQLite or PostgreSQL store: no response may be a server error, and
every response must match the schema its operation declares. The Meta webhook endpoint
acknowledges any signed body and stores what it cannot parse, and the bot middleware
returns the bot's response unchanged whatever the request body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI, Request, Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import func, select

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings, sign
from chatmw.adapters.proxy import create_proxy_app
from chatmw.app import ChatmwMount, mount_chatmw
from chatmw.codecs import ChatReply, ChatRequest, RasaCodec
from chatmw.config import Settings
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.runtime import Runtime
from chatmw.security.keys import create_key
from chatmw.store import models
from chatmw.widget import WidgetSettings

# Server-sent events never end, so a generated request to the live stream would not return.
EXCLUDED_PATHS = ("/metrics/live",)
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 10}
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def seed_events() -> list[ev.Event]:
    found: list[ev.Event] = []
    for number, channel in enumerate(["web", "messenger", "whatsapp"]):
        user = f"user-{number}"
        at = START + timedelta(hours=number)
        found.append(ev.Touch(channel=channel, occurred_at=at, key=f"touch-{number}",
                              user_id=user, source="newsletter", medium="email",
                              campaign="spring", ad_id=f"ad-{number}"))
        found.append(ev.Message(channel=channel, occurred_at=at, key=f"in-{number}", role="user",
                                user_id=user, text="What are your opening hours?",
                                conversation_id=f"conversation-{number}",
                                attributes={"plan": "pro"}))
        found.append(ev.Message(channel=channel, occurred_at=at + timedelta(seconds=2),
                                key=f"out-{number}", role="bot", user_id=user,
                                text="We open at 9.", conversation_id=f"conversation-{number}",
                                intent="opening_hours"))
    return found


@pytest.fixture
def mounted(database_url: str) -> Iterator[tuple[FastAPI, ChatmwMount, str]]:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False))
    app = FastAPI()
    mount = mount_chatmw(app, runtime, require_keys=False, manage_lifespan=False)
    asyncio.run(mount.start())
    runtime.writer.write(seed_events())
    key = create_key(runtime.engine, "admin").key
    yield app, mount, key
    asyncio.run(mount.stop())


def schema_operations(schema: Any) -> list[Any]:
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in EXCLUDED_PATHS:
            operations.append(operation)
    return operations


def check_operation(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run_cases(case: Any) -> None:
        case.call_and_validate(headers=headers,
                               checks=[not_a_server_error, response_schema_conformance])

    run_cases()


# Operations whose 422 body is {"detail": "text"}, while their OpenAPI description promises
# FastAPI's list of {"loc", "msg", "type"}.
KNOWN_GAPS = {
    ("POST", "/surveys/send"): GenerationMode.POSITIVE,
    ("PUT", "/surveys/config"): GenerationMode.POSITIVE,
}


def run_operations(app: FastAPI, key: str, gaps: bool) -> dict[str, list[str]]:
    """Fuzz every operation (only the known gaps when ``gaps``) and return the failures."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = schema_operations(schema)
    assert len(operations) > 20
    headers = {"Authorization": f"Bearer {key}"}

    failures = {}
    for operation in operations:
        for mode in EXAMPLES:
            known = KNOWN_GAPS.get((operation.method.upper(), operation.path)) == mode
            if known != gaps:
                continue
            try:
                check_operation(operation, mode, headers)
            except Unsatisfiable:
                continue  # no invalid request exists for an operation without parameters
            except BaseExceptionGroup as error:  # collected, so one run lists every failure
                label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures[label] = [line for line in str(error).splitlines() if line.strip()][:6]
    return failures


def test_api_conforms_to_openapi(mounted: tuple[FastAPI, ChatmwMount, str]) -> None:
    app, _, key = mounted

    failures = run_operations(app, key, gaps=False)

    report = "\n".join(f"{label}: {' / '.join(lines)}" for label, lines in failures.items())
    assert not failures, report


def test_survey_admin_422_matches_schema(mounted: tuple[FastAPI, ChatmwMount, str]) -> None:
    app, _, key = mounted

    failures = run_operations(app, key, gaps=True)

    assert sorted(failures) == []


# The Meta webhook endpoint and the bot middleware

APP_SECRET = "fuzz-api-app-secret"
BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"object": "page"}', b"1" * 5000, b"[" * 5000,
                     b'{"object": "page", "entry": [{"messaging": [{"x": "\\ud800"}]}]}',
                     b'{"object": "whatsapp_business_account", "entry": "x"}']),
)
HTTP_FUZZ = settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))


class PortalClient:
    """Calls an ASGI app in process from synchronous code (hypothesis tests are synchronous)."""

    def __init__(self, portal: BlockingPortal, app: Any) -> None:
        self.portal = portal
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://chatmw")

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(lambda: self.client.post(path, **kwargs))

    def close(self) -> None:
        self.portal.call(self.client.aclose)


def raw_payload_count(runtime: Runtime) -> int:
    with runtime.engine.connect() as connection:
        statement = select(func.count()).select_from(models.RawPayload)
        return int(connection.execute(statement).scalar_one())


def test_webhook_endpoint_acknowledges_signed_bytes(database_url: str) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False))
    runtime.start()
    settings_ = MetaSettings(app_secret=APP_SECRET, verify_token="token",
                             graph_base_url="http://127.0.0.1:9")
    app = create_proxy_app(settings_, runtime)

    @HTTP_FUZZ
    @given(body=BODIES)
    def post(body: bytes) -> None:
        response = client.post("/webhook", content=body,
                               headers={"x-hub-signature-256": sign(body, APP_SECRET)})
        assert response.status_code == 200, response.text
        assert response.text == "EVENT_RECEIVED"

    try:
        with start_blocking_portal() as portal:
            client = PortalClient(portal, app)
            post()
            client.close()
            portal.call(app.state.proxy.stop)
        assert runtime.recorder.flush(20)
        stats = runtime.recorder.stats()
        assert {reason: n for reason, n in stats.dropped.items() if n} == {}
        # Bodies are parsed where the batch is written, so the count is complete after the flush.
        unparseable = app.state.proxy.stats["unparseable"]
        assert unparseable > 0
        assert raw_payload_count(runtime) >= unparseable
    finally:
        runtime.stop()


async def fixed_bot(request: Request) -> Response:
    await request.body()
    return Response(b'[{"recipient_id": "u1", "text": "fixed"}]', status_code=201,
                    media_type="application/json", headers={"x-bot": "yes"})


def test_middleware_returns_bot_response(database_url: str) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False))
    runtime.start()
    bot = FastAPI()
    bot.add_api_route("/chat", fixed_bot, methods=["POST"])
    bot.add_middleware(ChatMetricsMiddleware, recorder=runtime.recorder, codec=RasaCodec(),
                       paths=["/chat"])

    @HTTP_FUZZ
    @given(body=st.one_of(BODIES, st.fixed_dictionaries({"sender": st.text(max_size=20),
                                                         "message": st.text(max_size=50)})
                          .map(lambda document: json.dumps(document).encode())))
    def post(body: bytes) -> None:
        response = client.post("/chat", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == 201
        assert response.content == b'[{"recipient_id": "u1", "text": "fixed"}]'
        assert response.headers["x-bot"] == "yes"

    try:
        with start_blocking_portal() as portal:
            client = PortalClient(portal, bot)
            post()
            client.close()
        assert runtime.recorder.flush(20)
        stats = runtime.recorder.stats()
        assert {reason: n for reason, n in stats.dropped.items() if n} == {}
    finally:
        runtime.stop()


# The widget's endpoints

WIDGET_ID = st.one_of(st.from_regex(r"\A[A-Za-z0-9_-]{8,64}\Z"), st.text(max_size=70),
                      st.integers(), st.none())
ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                  st.text(max_size=30)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3)),
                        max_leaves=10)
TOUCH = st.fixed_dictionaries({}, optional={
    "source": ANY_JSON, "campaign": st.text(max_size=300), "gclid": ANY_JSON,
    "landing_url": st.one_of(st.text(max_size=60), st.sampled_from(["http://[::1", "//x", "?"])),
    "referrer": ANY_JSON, "at": st.one_of(st.integers(), st.floats(), st.text(max_size=5)),
})
WIDGET_BODIES = st.one_of(
    BODIES,
    ANY_JSON.map(lambda document: json.dumps(document).encode()),
    st.fixed_dictionaries({}, optional={
        "visitor_id": WIDGET_ID, "conversation_id": WIDGET_ID, "message_id": WIDGET_ID,
        "event_id": WIDGET_ID, "text": st.one_of(st.text(max_size=40), ANY_JSON),
        "kind": st.one_of(st.sampled_from(["impression", "open"]), ANY_JSON),
        "display": ANY_JSON, "page_url": ANY_JSON,
        "attribution": st.one_of(ANY_JSON, st.fixed_dictionaries({"first": TOUCH, "last": TOUCH})),
    }).map(lambda document: json.dumps(document).encode()),
)


async def echo(request: ChatRequest) -> list[ChatReply]:
    return [ChatReply(text=request.text)]


def test_widget_endpoints_any_body(database_url: str) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False))
    app = FastAPI()
    widget = WidgetSettings(allowed_origins=["http://site.test"], bot=echo, rate_burst=10_000,
                            event_burst=10_000)
    mount = mount_chatmw(app, runtime, require_keys=False, widget=widget, manage_lifespan=False)

    @HTTP_FUZZ
    @given(path=st.sampled_from(["/chat/messages", "/chat/events", "/chat/poll"]),
           body=WIDGET_BODIES)
    def post(path: str, body: bytes) -> None:
        response = client.post(path, content=body, headers={"Origin": "http://site.test",
                                                            "content-type": "application/json"})
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:
            assert response.json()["detail"], response.text[:300]

    with start_blocking_portal() as portal:
        portal.call(mount.start)
        try:
            client = PortalClient(portal, app)
            post()
            valid = {"visitor_id": "visitor_0123456789", "conversation_id": "conversation_0123",
                     "message_id": "message_0123456789", "text": "hello"}
            accepted = client.post("/chat/messages", json=valid,
                                   headers={"Origin": "http://site.test"})
            client.close()
            assert runtime.recorder.flush(20)
            stats = runtime.recorder.stats()
        finally:
            portal.call(mount.stop)
    assert accepted.status_code == 200, accepted.text
    assert {reason: n for reason, n in stats.dropped.items() if n} == {}
