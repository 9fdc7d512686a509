"""Response-time, volume and summary metrics against independently computed values."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import _empty_postgres
from fastapi import FastAPI
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.api import create_metrics_router
from chatmw.cli import app as cli_app
from chatmw.metrics import MetricFilter, parse_filter
from chatmw.metrics.filters import FilterError
from chatmw.metrics.response_time import response_times
from chatmw.metrics.stats import percentile_cont
from chatmw.metrics.summary import summary
from chatmw.metrics.volume import volume
from chatmw.store.engine import make_engine
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 4, 8, 0, tzinfo=UTC)


def reference_percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks, written from the definition."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    below = int(rank)
    if below + 1 >= len(ordered):
        return ordered[-1]
    return ordered[below] * (1 - (rank - below)) + ordered[below + 1] * (rank - below)


def build_conversations(writer: Writer, seed: int = 7) -> dict[str, dict[str, list[float]]]:
    """Write random conversations and return the expected durations (ms) per company."""
    rng = random.Random(seed)
    expected: dict[str, dict[str, list[float]]] = {}
    batch: list[ev.Event] = []
    for number in range(60):
        company = rng.choice(["Acme", "Globex", "Initech"])
        start = T0 + timedelta(minutes=37 * number)
        at = start
        runs: list[tuple[str, float]] = []
        run_start: datetime | None = None
        figures = expected.setdefault(
            company, {"first": [], "reply": [], "first_bot": [], "reply_agent": []}
        )
        for step in range(rng.randint(1, 6)):
            role = "user" if step == 0 else rng.choice(["user", "user", "bot", "agent"])
            at = at + timedelta(seconds=rng.randint(1, 900))
            if role == "user" and run_start is None:
                run_start = at
            elif role != "user" and run_start is not None:
                runs.append((role, (at - run_start).total_seconds() * 1000))
                run_start = None
            batch.append(
                ev.Message(
                    channel="twitter",
                    occurred_at=at,
                    key=f"c{number}-{step}",
                    role=role,
                    user_id=f"user{number % 17}",
                    text="x",
                    conversation_id=f"c{number}",
                    attributes={"company": company},
                )
            )
        if runs:
            figures["first"].append(runs[0][1])
            if runs[0][0] == "bot":
                figures["first_bot"].append(runs[0][1])
        figures["reply"].extend(value for _, value in runs)
        figures["reply_agent"].extend(value for role, value in runs if role == "agent")
    rng.shuffle(batch)
    writer.write(batch[:100])
    writer.write(batch[100:])
    return expected


def test_response_time_per_company_matches_reference(engine: Engine) -> None:
    expected = build_conversations(Writer(engine))
    result = response_times(engine, parse_filter({"group_by": ["attr:company"]}), {})
    groups = {group["group"]: group for group in result["groups"]}
    assert set(groups) == set(expected)
    for company, figures in expected.items():
        group = groups[company]
        assert group["first_response"]["all"]["count"] == len(figures["first"])
        assert group["first_response"]["all"]["p50"] == pytest.approx(
            reference_percentile(figures["first"], 0.5) / 1000, abs=0.001
        )
        assert group["first_response"]["all"]["p95"] == pytest.approx(
            reference_percentile(figures["first"], 0.95) / 1000, abs=0.001
        )
        assert group["first_response"]["bot"]["count"] == len(figures["first_bot"])
        assert group["reply_time"]["all"]["count"] == len(figures["reply"])
        assert group["reply_time"]["all"]["max"] == pytest.approx(max(figures["reply"]) / 1000)
        assert group["reply_time"]["agent"]["count"] == len(figures["reply_agent"])
        assert group["reply_time"]["all"]["mean"] == pytest.approx(
            sum(figures["reply"]) / len(figures["reply"]) / 1000, abs=0.001
        )


def test_percentiles_match_postgres_percentile_cont(postgres_url: str) -> None:
    # PostgreSQL's own percentile_cont is the reference; SQLite has no such function.
    _empty_postgres(postgres_url)
    engine = make_engine(postgres_url)
    build_conversations(Writer(engine), seed=11)
    with engine.connect() as connection:
        p50, p90 = connection.execute(
            text(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY first_response_ms), "
                "percentile_cont(0.9) WITHIN GROUP (ORDER BY first_response_ms) "
                "FROM conversations WHERE first_response_ms IS NOT NULL"
            )
        ).one()
    result = response_times(engine, MetricFilter(), {})
    assert result["first_response"]["all"]["p50"] == pytest.approx(p50 / 1000, abs=0.0005)
    assert result["first_response"]["all"]["p90"] == pytest.approx(p90 / 1000, abs=0.0005)
    engine.dispose()


def test_percentile_cont_interpolates() -> None:
    assert percentile_cont([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile_cont([10.0], 0.95) == 10.0
    assert percentile_cont([0.0, 10.0], 0.9) == 9.0
    assert percentile_cont([], 0.5) is None


def test_window_counts_conversations_by_start(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0 - timedelta(minutes=5),
                key="early-u",
                role="user",
                user_id="a",
                conversation_id="early",
            ),
            ev.Message(
                channel="web",
                occurred_at=T0 + timedelta(minutes=5),
                key="early-b",
                role="bot",
                user_id="a",
                conversation_id="early",
            ),
            ev.Message(
                channel="web",
                occurred_at=T0 + timedelta(minutes=1),
                key="inside-u",
                role="user",
                user_id="b",
                conversation_id="inside",
            ),
        ]
    )
    flt = parse_filter(
        {"since": [T0.isoformat()], "until": [(T0 + timedelta(hours=1)).isoformat()]}
    )
    result = summary(engine, flt)
    assert result["totals"]["conversations"] == 1
    assert result["totals"]["messages"] == 1
    assert result["first_response"]["count"] == 0
    assert result["previous"]["totals"]["conversations"] == 1
    assert result["previous"]["first_response"]["count"] == 1
    assert result["change"]["conversations"] == 0


def test_empty_window_gives_nulls(engine: Engine) -> None:
    flt = parse_filter({"since": ["2030-01-01"], "until": ["2030-01-02"]})
    result = summary(engine, flt)
    assert result["totals"]["conversations"] == 0
    assert result["first_response"] == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p95": None,
        "max": None,
    }
    assert result["change"]["conversations_pct"] is None
    series = volume(engine, flt, {"interval": "hour"})["series"]
    assert len(series) == 24
    assert all(row["messages"] == 0 for row in series)


def test_volume_days_across_dst_change(engine: Engine) -> None:
    tz = ZoneInfo("America/New_York")
    writer = Writer(engine)
    # 2024-03-10 has 23 hours in New York; 23:30 local on the 9th and 00:30 on the 10th
    # fall on different local days although 1 hour apart.
    moments = [
        datetime(2024, 3, 9, 23, 30, tzinfo=tz),
        datetime(2024, 3, 10, 0, 30, tzinfo=tz),
        datetime(2024, 3, 10, 23, 30, tzinfo=tz),
    ]
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=moment,
                key=f"m{i}",
                role="user",
                user_id=f"u{i}",
                conversation_id=f"c{i}",
            )
            for i, moment in enumerate(moments)
        ]
    )
    flt = parse_filter(
        {"since": ["2024-03-09"], "until": ["2024-03-12"], "tz": ["America/New_York"]}
    )
    result = volume(engine, flt, {"interval": "day"})
    assert [row["bucket"] for row in result["series"]] == [
        "2024-03-09T00:00:00-05:00",
        "2024-03-10T00:00:00-05:00",
        "2024-03-11T00:00:00-04:00",
    ]
    assert [row["conversations"] for row in result["series"]] == [1, 2, 0]
    assert result["series"][1]["conversations_change"] == 1
    assert result["series"][1]["conversations_change_pct"] == 100.0
    assert result["series"][2]["users_change_pct"] == -100.0


@pytest.mark.parametrize(
    ("params", "param", "fragment"),
    [
        ({"tz": ["Mars/Olympus"]}, "tz", "unknown time zone"),
        ({"since": ["yesterday"]}, "since", "invalid ISO-8601"),
        ({"since": ["2024-02-01"], "until": ["2024-01-01"]}, "until", "later than since"),
        ({"group_by": ["planet"]}, "group_by", "unknown grouping"),
        ({"colour": ["red"]}, "colour", "unknown parameter"),
        ({"touch": ["middle"]}, "touch", "first"),
        ({"attr.bad name": ["x"]}, "attr.bad name", "invalid attribute name"),
    ],
)
def test_invalid_filters_name_parameter(
    params: dict[str, list[str]], param: str, fragment: str
) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(params)
    assert caught.value.param == param
    assert fragment in caught.value.message


def make_client(engine: Engine) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(create_metrics_router(engine))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatmw.test")


async def fetch(engine: Engine, path: str) -> httpx.Response:
    async with make_client(engine) as client:
        return await client.get(path)


@pytest.mark.anyio
async def test_api_rejects_invalid_parameter(engine: Engine) -> None:
    response = await fetch(engine, "/metrics/volume?interval=fortnight")
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["query", "interval"]
    assert "fortnight" in detail["msg"]


@pytest.mark.anyio
async def test_api_filters_by_attribute(engine: Engine) -> None:
    build_conversations(Writer(engine))
    everything = (await fetch(engine, "/metrics/summary")).json()
    acme = (await fetch(engine, "/metrics/summary?attr.company=Acme")).json()
    grouped = (await fetch(engine, "/metrics/summary?group_by=attr:company")).json()
    acme_group = next(group for group in grouped["groups"] if group["group"] == "Acme")
    assert acme["totals"] == acme_group["totals"]
    assert acme["totals"]["conversations"] < everything["totals"]["conversations"]


@pytest.mark.anyio
async def test_api_csv_has_header_and_rows(engine: Engine) -> None:
    build_conversations(Writer(engine))
    response = await fetch(engine, "/metrics/response-time?format=csv&group_by=attr:company")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    lines = response.text.splitlines()
    assert lines[0].split(",")[:4] == ["group", "figure", "role", "count"]
    assert len(lines) == 1 + 6 * 4


@pytest.mark.anyio
async def test_openapi_documents_parameters(engine: Engine) -> None:
    spec = (await fetch(engine, "/openapi.json")).json()
    volume_params = {p["name"] for p in spec["paths"]["/metrics/volume"]["get"]["parameters"]}
    assert {"since", "until", "tz", "channel", "group_by", "interval", "format"} <= volume_params
    assert "percentile_cont" in spec["paths"]["/metrics/response-time"]["get"]["description"]


@pytest.mark.anyio
async def test_cli_json_equals_http_body(engine: Engine, database_url: str) -> None:
    build_conversations(Writer(engine))
    http_body = (
        await fetch(engine, "/metrics/response-time?group_by=attr:company&tz=Europe/Paris")
    ).content
    outcome = CliRunner().invoke(
        cli_app,
        [
            "metrics",
            "response-time",
            "--db",
            database_url,
            "--group-by",
            "attr:company",
            "--tz",
            "Europe/Paris",
            "--json",
        ],
    )
    assert outcome.exit_code == 0, outcome.output
    assert outcome.stdout.encode() == http_body + b"\n"
    assert json.loads(outcome.stdout)["filters"]["group_by"] == "attr:company"


def test_cli_invalid_option_exits_2(database_url: str) -> None:
    outcome = CliRunner().invoke(
        cli_app, ["metrics", "volume", "--db", database_url, "--interval", "x"]
    )
    assert outcome.exit_code == 2
    assert "interval" in outcome.output


def test_summary_counts_every_writer_as_user(engine: Engine) -> None:
    Writer(engine).write(
        [
            ev.Message(
                channel="twitter",
                occurred_at=T0,
                key="a",
                role="user",
                user_id="ann",
                conversation_id="thread",
            ),
            ev.Message(
                channel="twitter",
                occurred_at=T0 + timedelta(seconds=5),
                key="b",
                role="user",
                user_id="bob",
                conversation_id="thread",
            ),
            ev.Message(
                channel="twitter",
                occurred_at=T0 + timedelta(seconds=9),
                key="c",
                role="agent",
                user_id="ann",
                conversation_id="thread",
            ),
        ]
    )
    result = summary(engine, MetricFilter())
    assert result["totals"]["conversations"] == 1
    assert result["totals"]["users"] == 2
