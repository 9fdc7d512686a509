"""The live figures and their server-sent events stream, served by a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.live import create_live_router, live_snapshot
from chatmw.store.engine import make_engine
from chatmw.store.writer import Writer

NOW = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)


def message(
    key: str, role: str, at: datetime, conversation: str, channel: str = "web", **fields
) -> ev.Message:
    return ev.Message(
        channel=channel,
        occurred_at=at,
        key=key,
        role=role,
        user_id=conversation,
        text="hi",
        conversation_id=conversation,
        **fields,
    )


def populate(engine: Engine) -> None:
    minute = timedelta(minutes=1)
    Writer(engine).write(
        [
            # Active: last message 2 minutes ago; answered in 30 s, 3 minutes ago.
            message("a1", "user", NOW - 4 * minute, "a"),
            message("a2", "bot", NOW - 4 * minute + timedelta(seconds=30), "a"),
            message("a3", "user", NOW - 2 * minute, "a"),
            # Active on whatsapp: answered in 90 s, 30 seconds ago.
            message("b1", "user", NOW - 2 * minute, "b", channel="whatsapp"),
            message("b2", "agent", NOW - timedelta(seconds=30), "b", channel="whatsapp"),
            # Not active: last message 20 minutes ago; its answer is outside the 5-minute window.
            message("c1", "user", NOW - 21 * minute, "c"),
            message("c2", "bot", NOW - 20 * minute, "c"),
            # Not active: ended, then sent only a survey prompt, which is no dialogue message.
            message("d0", "user", NOW - 3 * minute, "d"),
            message("d1", "bot", NOW - minute, "d", kind="survey_prompt"),
            # Active: ended, then reopened by a user message 50 seconds ago.
            message("e1", "user", NOW - 10 * minute, "e"),
        ]
    )
    ended = [
        ev.ConversationUpdate(
            channel="web",
            occurred_at=NOW - 2 * minute + timedelta(seconds=1),
            user_id="d",
            conversation_id="d",
            ended=True,
        ),
        ev.ConversationUpdate(
            channel="web",
            occurred_at=NOW - 9 * minute,
            user_id="e",
            conversation_id="e",
            ended=True,
        ),
    ]
    Writer(engine).write(ended)
    # The reopening message arrives after the end was recorded.
    Writer(engine).write([message("e2", "user", NOW - timedelta(seconds=50), "e")])


def test_snapshot_figures(engine: Engine) -> None:
    populate(engine)
    snapshot = live_snapshot(engine, int(NOW.timestamp() * 1000), active_minutes=5)
    # a, b and the reopened e; not c (too old) nor d (ended).
    assert snapshot["active_conversations"] == 3
    assert snapshot["messages_last_minute"] == 2
    assert snapshot["messages_per_minute"] == round(7 / 5, 2)
    assert snapshot["responses"] == 2
    assert snapshot["response_time_p50"] == 60.0
    whatsapp = live_snapshot(
        engine, int(NOW.timestamp() * 1000), active_minutes=5, channels=("whatsapp",)
    )
    assert whatsapp["active_conversations"] == 1
    assert whatsapp["response_time_p50"] == 90.0


def test_snapshot_empty_store(engine: Engine) -> None:
    snapshot = live_snapshot(engine, int(NOW.timestamp() * 1000), active_minutes=5)
    assert snapshot["active_conversations"] == 0
    assert snapshot["messages_per_minute"] == 0
    assert snapshot["response_time_p50"] is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(engine: Engine) -> Iterator[tuple[str, object]]:
    app = FastAPI()
    router = create_live_router(engine, prefix="/metrics")
    app.include_router(router)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", router.live_streams
    server.should_exit = True
    thread.join(timeout=10)


def next_snapshot(lines: Iterator[str]) -> dict:
    """Return the next snapshot's data. The iterator stays open: closing it would disconnect."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: ") and name == "snapshot":
            return json.loads(line[len("data: ") :])
    raise AssertionError("stream ended before a snapshot")


def test_stream_sends_snapshots_and_ends_after_count(live_server) -> None:
    base, _ = live_server
    params = {"interval": 1, "count": 2}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{base}/metrics/live", params=params) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    snapshots = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(snapshots) == 2
    assert body.startswith("retry: 1000\n\n")
    assert {"active_conversations", "messages_per_minute", "response_time_p50"} <= set(snapshots[0])


def test_stream_closes_on_client_disconnect(live_server) -> None:
    base, streams = live_server
    params = {"interval": 1}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{base}/metrics/live", params=params) as response,
    ):
        lines = response.iter_lines()
        first, second = next_snapshot(lines), next_snapshot(lines)
        assert streams.open == 1
    assert first["at"] < second["at"]
    deadline = time.monotonic() + 5
    while streams.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert streams.open == 0
    assert streams.started == 1


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"interval": 0.1}, "interval"),
        ({"interval": 61}, "interval"),
        ({"interval": "nan"}, "interval"),
        ({"active_minutes": 0}, "active_minutes"),
        ({"count": 0}, "count"),
    ],
)
def test_stream_rejects_invalid_parameters(tmp_path, params: dict, param: str) -> None:
    # Parameters are checked before any query, so one SQLite store serves every case.
    engine = make_engine(f"sqlite:///{tmp_path / 'live.db'}")
    app = FastAPI()
    app.include_router(create_live_router(engine))

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/metrics/live", params=params)

    response = asyncio.run(fetch())
    engine.dispose()
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", param]


def test_router_rejects_invalid_defaults(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'live.db'}")
    with pytest.raises(ValueError, match="default_interval"):
        create_live_router(engine, default_interval=0)
    with pytest.raises(ValueError, match="default_active_minutes"):
        create_live_router(engine, default_active_minutes=0)
    engine.dispose()


def test_stream_limit_rejects_extra_clients(engine: Engine) -> None:
    app = FastAPI()
    router = create_live_router(engine, prefix="/metrics", max_streams=1)
    app.include_router(router)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/metrics/live"
    try:
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", base, params={"interval": 1}) as first,
        ):
            lines = first.iter_lines()
            next_snapshot(lines)
            # count=1 ends the second stream should the limit fail to reject it.
            second = client.get(base, params={"interval": 2, "count": 1})
        assert second.status_code == 503
        assert second.headers["retry-after"] == "2"
        assert router.live_streams.rejected == 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
