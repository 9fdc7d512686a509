"""The health exposition and its HTTP routes, over a real runtime and a real spool."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from spool_helpers import SwitchableWriter, wait_for

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.health import CONTENT_TYPE, create_health_router, render_metrics
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.runtime import Runtime
from chatmw.spool import FileSpool, SpoolSettings

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
# One sample line of the text format: name, optional labels, value.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(NaN|[+-]Inf|-?[0-9.e+-]+)$')


def message(key: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0, key=key, role="user", user_id="u1", text="hi")


def parse(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        name = match.group(1)
        assert any(name.startswith(family) for family in declared), f"undeclared {name}"
        samples[name + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_metrics_follow_outage(tmp_path: Path) -> None:
    writer = SwitchableWriter()
    spool = FileSpool(SpoolSettings(directory=tmp_path))
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.01, retries=0,
                                                 probe_interval_s=0.05), spool=spool)
    recorder.start()
    writer.down.set()
    for index in range(5):
        recorder.submit(message(f"m{index}"))
    assert recorder.flush(5)

    during = parse(render_metrics(recorder))

    assert during['chatmw_recorder_state{state="spooling"}'] == 1
    assert during['chatmw_recorder_state{state="healthy"}'] == 0
    assert during["chatmw_spool_pending_events"] == 5
    assert during["chatmw_events_spooled_total"] == 5
    assert during["chatmw_events_written_total"] == 0
    assert during["chatmw_spool_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("segment-*"))
    assert during["chatmw_spool_oldest_age_seconds"] >= 0
    assert during["chatmw_spool_replay_progress_ratio"] == 0
    assert math.isnan(during["chatmw_last_write_seconds"])

    writer.down.clear()
    assert wait_for(lambda: recorder.state == "healthy")
    after = parse(render_metrics(recorder))

    assert after["chatmw_events_replayed_total"] == 5
    assert after["chatmw_events_written_total"] == 5
    assert after["chatmw_spool_pending_events"] == 0
    assert math.isnan(after["chatmw_spool_oldest_age_seconds"])
    assert after["chatmw_spool_replay_progress_ratio"] == 1
    assert after['chatmw_recorder_state_changes_total{state="spooling"}'] == 1
    assert after['chatmw_recorder_state_changes_total{state="replaying"}'] == 1
    assert after["chatmw_write_seconds_count"] == 1
    assert after["chatmw_write_seconds_sum"] > 0
    recorder.stop()


def test_drops_labelled_by_reason() -> None:
    writer = SwitchableWriter()
    recorder = Recorder(writer, RecorderSettings(queue_size=2))
    for index in range(5):  # not started: the queue fills and there is no spool
        recorder.submit(message(f"m{index}"))
    samples = parse(render_metrics(recorder))
    assert samples['chatmw_events_dropped_total{reason="queue_full"}'] == 3
    assert samples["chatmw_queue_depth"] == 2
    assert "chatmw_spool_pending_events" not in samples


def test_state_changes_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = SwitchableWriter()
    spool = FileSpool(SpoolSettings(directory=tmp_path))
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.01, retries=0,
                                                 probe_interval_s=0.05), spool=spool)
    caplog.set_level(logging.INFO, logger="chatmw")
    recorder.start()
    writer.down.set()
    recorder.submit(message("a"))
    assert wait_for(lambda: recorder.state == "spooling")
    writer.down.clear()
    assert wait_for(lambda: recorder.state == "healthy")
    recorder.stop()
    changes = [r.getMessage() for r in caplog.records if "recorder state:" in r.getMessage()]
    assert changes[0].startswith("recorder state: healthy -> spooling")
    assert changes[1].startswith("recorder state: spooling -> replaying")
    assert changes[2].startswith("recorder state: replaying -> healthy")
    assert len(changes) == 3


def test_routes_serve_text_and_json(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'chatmw.db'}")
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    runtime = Runtime.from_settings(settings, spool=spool)
    runtime.start()
    runtime.recorder.submit(message("a"))
    assert runtime.recorder.flush(5)
    app = FastAPI()
    app.include_router(create_health_router(runtime, prefix="/chat"))

    async def fetch() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/chat/health/metrics"), await client.get("/chat/health")

    text, summary = asyncio.run(fetch())
    runtime.stop()

    assert text.status_code == 200
    assert text.headers["content-type"] == CONTENT_TYPE
    assert parse(text.text)["chatmw_events_written_total"] == 1
    assert summary.status_code == 200
    assert summary.json()["state"] == "healthy"
    assert summary.json()["written"] == 1
    assert summary.json()["spool"]["pending_events"] == 0


def test_label_values_escaped() -> None:
    writer = SwitchableWriter()
    recorder = Recorder(writer)
    recorder._count_drop('odd "reason"\\\n', 1)
    text = render_metrics(recorder)
    assert 'chatmw_events_dropped_total{reason="odd \\"reason\\"\\\\\\n"} 1' in text


def test_routes_accept_key_dependency(tmp_path: Path) -> None:
    from chatmw.security import KeyAuth, create_key, require_key

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'chatmw.db'}")
    runtime = Runtime.from_settings(settings)
    runtime.start()
    auth = KeyAuth(runtime.engine)
    key = create_key(runtime.engine, "read").key
    app = FastAPI()
    app.include_router(create_health_router(runtime, dependencies=[require_key("read", auth)]))

    async def fetch(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/metrics/health/metrics", headers=headers)

    anonymous = asyncio.run(fetch({}))
    keyed = asyncio.run(fetch({"X-API-Key": key}))
    runtime.stop()
    assert anonymous.status_code == 401
    assert keyed.status_code == 200


def test_routes_appear_in_openapi(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'chatmw.db'}")
    app = FastAPI()
    app.include_router(create_health_router(Runtime.from_settings(settings), prefix="/chat"))
    paths = app.openapi()["paths"]
    assert "/chat/health/metrics" in paths
    assert "/chat/health" in paths
