"""CSAT and NPS figures, the survey API routes and the export, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from surveys_support import T0, survey_config

from chatmw import events as ev
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_surveys import Survey
from chatmw.surveys.api import create_survey_router
from chatmw.surveys.metrics import csat, nps

WINDOW = {"since": "2024-05-06T00:00:00Z", "until": "2024-05-07T00:00:00Z"}
# (channel, kind, state, score); None scores were sent but not answered, or never sent.
SURVEYS: list[tuple[str, str, str, int | None]] = [
    *[("web", "csat", "answered", score) for score in (5, 4, 4, 3, 1, 5)],
    ("web", "csat", "unanswered", None),
    ("web", "csat", "sent", None),
    ("web", "csat", "skipped", None),
    ("messenger", "csat", "answered", 2),
    ("messenger", "csat", "answered", 5),
    ("messenger", "csat", "unanswered", None),
    *[("whatsapp", "nps", "answered", score) for score in (10, 9, 9, 8, 7, 6, 0, 3, 10)],
    ("whatsapp", "nps", "unanswered", None),
    ("whatsapp", "nps", "failed", None),
]
SENT_STATES = {"answered", "unanswered", "sent"}


def _populate(engine: Engine) -> None:
    start_ms = ev.to_ms(T0)
    with Session(engine) as session, session.begin():
        rows = [*SURVEYS, ("web", "csat", "answered", 1)]
        for index, (channel, kind, state, score) in enumerate(rows):
            # The last conversation started the day before the window.
            started = start_ms - 86_400_000 if index == len(rows) - 1 else start_ms + index * 60_000
            contact = Contact(
                channel=channel,
                external_id=f"user-{index}",
                first_seen_ms=started,
                last_seen_ms=started,
            )
            session.add(contact)
            session.flush()
            conversation = Conversation(
                channel=channel,
                external_id=f"conv-{index}",
                contact_id=contact.id,
                started_at_ms=started,
                last_message_at_ms=started,
                message_count=2,
                user_message_count=1,
                handed_off=False,
            )
            session.add(conversation)
            session.flush()
            sent = state in SENT_STATES
            session.add(
                Survey(
                    conversation_id=conversation.id,
                    contact_id=contact.id,
                    channel=channel,
                    name=kind,
                    kind=kind,
                    trigger="ended",
                    state=state,
                    locale="en",
                    created_at_ms=started,
                    due_at_ms=started,
                    sent_at_ms=started + 1000 if sent else None,
                    score=score,
                    comment="too slow" if score == 1 else None,
                    answered_at_ms=started + 2000 if score is not None else None,
                    comment_window_ms=0,
                    reasks=0,
                    used_template=False,
                )
            )


def _window(**extra: Any) -> MetricFilter:
    since = ev.from_ms(ev.to_ms(T0) - 9 * 3_600_000)
    return MetricFilter(since=since, until=since + timedelta(days=1), **extra)


def _expected_csat(channel: str | None) -> dict[str, Any]:
    items = [s for s in SURVEYS if s[1] == "csat" and channel in (None, s[0])]
    scores = [score for _, _, _, score in items if score is not None]
    sent = [item for item in items if item[2] in SENT_STATES]
    good = [score for score in scores if score in (4, 5)]
    return {
        "sent": len(sent),
        "answers": len(scores),
        "satisfied": len(good),
        "score": round(100 * len(good) / len(scores), 2),
        "mean": round(sum(scores) / len(scores), 3),
        "distribution": {str(n): scores.count(n) for n in range(1, 6)},
        "response_rate_pct": round(100 * len(scores) / len(sent), 2),
    }


def test_csat_figures(engine: Engine) -> None:
    _populate(engine)
    result = csat(engine, _window(group_by=GroupBy("channel")))
    expected = _expected_csat(None)
    for name, value in expected.items():
        assert result[name] == value, name
    assert result["score"] == 62.5
    groups = {group["group"]: group for group in result["groups"]}
    assert sorted(groups) == ["messenger", "web"]
    for channel in ("messenger", "web"):
        for name, value in _expected_csat(channel).items():
            assert groups[channel][name] == value, (channel, name)


def test_nps_figures(engine: Engine) -> None:
    _populate(engine)
    result = nps(engine, _window())
    scores = [s[3] for s in SURVEYS if s[1] == "nps" and s[3] is not None]
    promoters = sum(1 for s in scores if s >= 9)
    detractors = sum(1 for s in scores if s <= 6)
    assert (result["promoters"], result["passives"], result["detractors"]) == (
        promoters,
        len(scores) - promoters - detractors,
        detractors,
    )
    assert result["nps"] == round(100 * promoters / len(scores) - 100 * detractors / len(scores), 2)
    assert result["nps"] == 11.11
    assert result["sent"] == 10
    assert result["response_rate_pct"] == 90.0


def test_survey_outside_window_excluded(engine: Engine) -> None:
    _populate(engine)
    everything = csat(engine, MetricFilter())
    assert everything["answers"] == _expected_csat(None)["answers"] + 1


def _client(engine: Engine, **options: Any) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(create_survey_router(engine, survey_config(), **options))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _get(engine: Engine, path: str, **options: Any) -> httpx.Response:
    async with _client(engine, admin_dependency=lambda: None, **options) as client:
        return await client.get(path)


def test_figure_routes(engine: Engine) -> None:
    _populate(engine)
    query = f"since={WINDOW['since']}&until={WINDOW['until']}"
    csat_response = asyncio.run(_get(engine, f"/metrics/csat?{query}&group_by=channel"))
    nps_response = asyncio.run(_get(engine, f"/metrics/nps?{query}&channel=whatsapp"))
    table = asyncio.run(_get(engine, f"/metrics/csat?{query}&format=csv"))
    invalid = asyncio.run(_get(engine, "/metrics/nps?since=yesterday"))
    assert csat_response.status_code == 200
    assert csat_response.json()["score"] == 62.5
    assert nps_response.json()["nps"] == 11.11
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert rows[0]["group"] == "(all)"
    assert rows[0]["score_5"] == "3"
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["query", "since"]


def test_export_routes(engine: Engine) -> None:
    _populate(engine)
    jsonl = asyncio.run(_get(engine, f"/surveys/export?format=jsonl&since={WINDOW['since']}"))
    table = asyncio.run(_get(engine, "/surveys/export?format=csv&channel=whatsapp"))
    records = [json.loads(line) for line in jsonl.text.splitlines()]
    assert len(records) == len(SURVEYS)
    assert records[4]["comment"] == "too slow"
    assert records[4]["score"] == 1
    assert records[4]["user_id"] == "user-4"
    assert records[0]["sent_at"] == "2024-05-06T09:00:01Z"
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert len(rows) == 11
    assert {row["kind"] for row in rows} == {"nps"}


def test_admin_routes_closed_without_key_store(engine: Engine) -> None:
    # An app that mounts the router without a key store must not serve admin routes.
    async def call() -> httpx.Response:
        async with _client(engine) as client:
            return await client.get("/surveys/export")

    assert asyncio.run(call()).status_code >= 500


def test_admin_routes_need_admin_key(engine: Engine) -> None:
    from chatmw.security import KeyAuth, create_key

    read_key = create_key(engine, "read").key
    admin_key = create_key(engine, "admin").key
    app = FastAPI()
    app.state.chatmw_key_auth = KeyAuth(engine)
    app.include_router(create_survey_router(engine, survey_config()))

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.get("/surveys/config"),
                await client.get("/surveys/config", headers={"X-API-Key": read_key}),
                await client.get("/surveys/config", headers={"X-API-Key": admin_key}),
            ]

    missing, read_only, admin = asyncio.run(calls())
    assert missing.status_code == 401
    assert read_only.status_code == 403
    assert admin.status_code == 200


def test_config_routes(engine: Engine) -> None:
    document = survey_config().to_document()
    document["surveys"]["csat"]["sampling_rate"] = 0.25

    async def calls() -> list[httpx.Response]:
        async with _client(engine, admin_dependency=lambda: None) as client:
            bad = dict(document, surveys={"csat": {**document["surveys"]["csat"], "kind": "x"}})
            return [
                await client.put("/surveys/config", json=bad),
                await client.put("/surveys/config", json=document),
                await client.get("/surveys/config"),
                await client.delete("/surveys/config"),
                await client.get("/surveys/config"),
            ]

    rejected, saved, current, deleted, restored = asyncio.run(calls())
    assert rejected.status_code == 422
    assert rejected.json()["detail"][0]["msg"].startswith(
        "surveys.csat.kind: expected one of csat, nps")
    assert rejected.json()["detail"][0]["loc"] == ["body"]
    assert saved.status_code == 200
    assert current.json()["surveys"]["csat"]["sampling_rate"] == 0.25
    assert deleted.status_code == 204
    assert restored.json()["surveys"]["csat"]["sampling_rate"] == 1.0


def test_send_route(engine: Engine) -> None:
    _populate(engine)

    async def calls() -> list[httpx.Response]:
        async with _client(engine, admin_dependency=lambda: None) as client:
            with Session(engine) as session, session.begin():
                session.add(
                    Conversation(
                        channel="web",
                        external_id="fresh",
                        contact_id=1,
                        started_at_ms=0,
                        last_message_at_ms=0,
                        message_count=1,
                        user_message_count=1,
                        handed_off=False,
                    )
                )
            body = {"channel": "web", "conversation_id": "fresh"}
            return [
                await client.post("/surveys/send", json=body),
                await client.post("/surveys/send", json=body),
                await client.post(
                    "/surveys/send", json={"channel": "web", "conversation_id": "nope"}
                ),
            ]

    created, duplicate, missing = asyncio.run(calls())
    assert created.status_code == 201
    assert created.json()["state"] == "scheduled"
    assert duplicate.status_code == 409
    assert missing.status_code == 404


def test_cli_export(engine: Engine, database_url: str, tmp_path: Path) -> None:
    _populate(engine)
    output = tmp_path / "surveys.csv"
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "chatmw"),
            "surveys",
            "export",
            "--db",
            database_url,
            "--format",
            "csv",
            "--output",
            str(output),
            "--channel",
            "web",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 10
    assert rows[0]["conversation_started_at"] == "2024-05-05T09:00:00Z"
