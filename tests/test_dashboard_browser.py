"""The dashboard in headless Chromium: it loads cleanly and shows the API's figures.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``) and the
playwright Python package; the browser is never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from sqlalchemy import Engine, insert, text

from chatmw import events as ev
from chatmw.api import create_metrics_router
from chatmw.dashboard import create_dashboard_router, plotly_js_path
from chatmw.live import create_live_router
from chatmw.sentiment import sentiment_enricher
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer
from chatmw.surveys.api import create_survey_router

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T0 = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)
SCREENSHOT = os.environ.get("CHATMW_DASHBOARD_SCREENSHOT")

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")


def populate(engine: Engine) -> None:
    messages: list[ev.Message] = []
    texts = ["I love this", "this is awful", "where is my order", "merci"]
    for number in range(24):
        channel = ("web", "whatsapp", "messenger")[number % 3]
        start = T0 + timedelta(hours=number * 7)
        for turn in range(1 + number % 3):
            at = start + timedelta(minutes=turn * 4)
            common = {
                "channel": channel,
                "user_id": f"user{number % 10}",
                "conversation_id": f"c{number}",
            }
            messages.append(
                ev.Message(
                    occurred_at=at,
                    key=f"c{number}-u{turn}",
                    role="user",
                    text=texts[(number + turn) % 4],
                    **common,
                )
            )
            messages.append(
                ev.Message(
                    occurred_at=at + timedelta(seconds=5 + number),
                    key=f"c{number}-b{turn}",
                    role="bot",
                    text="Sure",
                    **common,
                )
            )
    touches = [
        ev.Touch(
            channel="web",
            occurred_at=T0 + timedelta(hours=number * 7) - timedelta(seconds=5),
            key=f"t{number}",
            user_id=f"user{number % 10}",
            conversation_id=f"c{number}",
            source="google",
            medium="cpc",
            campaign="spring" if number % 2 else "launch",
        )
        for number in range(0, 24, 3)
    ]
    Writer(engine, enrichers=[sentiment_enricher]).write([*messages, *touches])
    with engine.begin() as connection:
        ids = dict(connection.execute(text("SELECT external_id, id FROM conversations")).all())
        surveys = [
            {
                "conversation_id": ids[f"c{number}"],
                "channel": ("web", "whatsapp", "messenger")[number % 3],
                "name": kind,
                "kind": kind,
                "trigger": "end",
                "state": "answered",
                "locale": "en",
                "created_at_ms": 0,
                "sent_at_ms": 1,
                "score": number % 5 + 1 if kind == "csat" else number % 11,
                "comment_window_ms": 0,
                "reasks": 0,
                "used_template": False,
            }
            for number in range(24)
            for kind in (("csat",) if number % 2 else ("nps",))
        ]
        connection.execute(insert(Survey.__table__), surveys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(engine: Engine, dependencies: Sequence[object] = ()) -> Iterator[str]:
    """Serve the metrics API, the dashboard and the live stream on a free port."""
    app = FastAPI()
    app.include_router(create_metrics_router(engine, prefix="/metrics", dependencies=dependencies))
    app.include_router(
        create_dashboard_router(engine, prefix="/metrics", dependencies=dependencies, live=True)
    )
    app.include_router(
        create_live_router(engine, prefix="/metrics", dependencies=dependencies, default_interval=1)
    )
    app.include_router(create_survey_router(engine, prefix="/metrics", dependencies=dependencies))
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uvicorn_server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(engine: Engine) -> Iterator[str]:
    populate(engine)
    with serving(engine) as base:
        yield base


def require_test_key(authorization: str | None = Header(None)) -> None:
    """Admit requests that send ``Authorization: Bearer test-key``, like an API key check."""
    if authorization != "Bearer test-key":
        raise HTTPException(401, detail={"error": "missing_api_key", "message": "send an API key"})


def api(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())


def number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def test_dashboard_shows_api_figures(server: str) -> None:
    console: list[str] = []
    outside: list[str] = []
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on(
            "console",
            lambda message: (
                console.append(f"{message.type}: {message.text}")
                if message.type in ("error", "warning")
                else None
            ),
        )
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        page.on(
            "request",
            lambda request: (
                outside.append(request.url) if not request.url.startswith(server) else None
            ),
        )

        page.goto(f"{server}/metrics/dashboard?since=2024-03-04&to=2024-03-10&tz=UTC&interval=day")
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)

        summary = api(server, "/metrics/summary?since=2024-03-04&until=2024-03-11&tz=UTC")
        assert (
            number(page.text_content("#tile-conversations")) == summary["totals"]["conversations"]
        )
        assert number(page.text_content("#tile-messages")) == summary["totals"]["messages"]
        assert number(page.text_content("#tile-users")) == summary["totals"]["users"]
        csat = api(server, "/metrics/csat?since=2024-03-04&until=2024-03-11&tz=UTC")
        nps = api(server, "/metrics/nps?since=2024-03-04&until=2024-03-11&tz=UTC")
        assert csat["answers"] > 0
        assert page.text_content("#tile-csat") == f"{csat['score']:.1f} %"
        assert page.text_content("#tile-nps") == f"{nps['nps']:.0f}"

        channels = api(server, "/metrics/channels?since=2024-03-04&until=2024-03-11&tz=UTC")
        table_rows = page.locator("#channels-table tbody tr")
        assert table_rows.count() == len(channels["channels"])
        first_row = table_rows.nth(0).locator("td")
        assert first_row.nth(0).text_content() == channels["channels"][0]["channel"]
        assert number(first_row.nth(1).text_content()) == channels["channels"][0]["conversations"]

        heatmap = api(server, "/metrics/heatmap?since=2024-03-04&until=2024-03-11&tz=UTC")
        drawn = page.evaluate("document.getElementById('heatmap').data[0].z")
        assert drawn == heatmap["conversations"]
        volume = api(
            server, "/metrics/volume?since=2024-03-04&until=2024-03-11&tz=UTC&interval=day"
        )
        trend = page.evaluate("document.getElementById('trend').data[0].y")
        assert trend == [row["conversations"] for row in volume["series"]]

        attribution = page.locator("#attribution-table tbody tr")
        assert attribution.count() >= 2

        # The live tiles fill from the server-sent events stream.
        playwright_sync.expect(page.locator("#live-active")).not_to_have_text("–", timeout=15_000)
        live = page.text_content("#live-active")
        assert 0 <= number(live) <= summary["totals"]["conversations"]

        # Filtering by channel reloads every figure for that channel.
        page.select_option("select[name=channel]", "whatsapp")
        page.click("#filters button[type=submit]")
        playwright_sync.expect(page).to_have_url(re.compile(r"[?&]channel=whatsapp(&|$)"))
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        filtered = api(
            server, "/metrics/summary?since=2024-03-04&until=2024-03-11&tz=UTC&channel=whatsapp"
        )
        assert (
            number(page.text_content("#tile-conversations")) == filtered["totals"]["conversations"]
        )
        assert page.locator("#channels-table tbody tr").count() == 1

        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT, full_page=True)
        browser.close()
    assert console == []
    assert outside == []


def test_dashboard_serves_plotly_from_package(server: str) -> None:
    with urllib.request.urlopen(
        f"{server}/metrics/dashboard/static/plotly.min.js", timeout=10
    ) as response:
        body = response.read()
    assert body == plotly_js_path().read_bytes()
    with urllib.request.urlopen(f"{server}/metrics/dashboard", timeout=10) as response:
        csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp


def test_dashboard_with_api_key(engine: Engine) -> None:
    populate(engine)
    console: list[str] = []
    with serving(engine, dependencies=[require_test_key]) as base:
        summary = api_with_key(base, "/metrics/summary?tz=UTC")
        with playwright_sync.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
            page.goto(f"{base}/metrics/dashboard?tz=UTC")
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            assert "API key" in page.text_content("#overview-error")

            page.fill("input[name=key]", "test-key")
            page.click("#filters button[type=submit]")
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            conversations = page.text_content("#tile-conversations")
            assert number(conversations) == summary["totals"]["conversations"]
            assert page.locator("select[name=channel] option").count() == 4
            playwright_sync.expect(page.locator("#live-active")).not_to_have_text(
                "–", timeout=15_000
            )
            assert "test-key" not in page.url
            browser.close()
    assert console == []


def api_with_key(base: str, path: str) -> dict:
    request = urllib.request.Request(base + path, headers={"Authorization": "Bearer test-key"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
