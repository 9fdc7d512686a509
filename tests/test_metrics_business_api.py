"""The business recording API, the spend import command and the metrics over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser.servers import free_port, serve
from business_support import fresh_database
from fastapi import FastAPI
from sqlalchemy import select
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.api import create_metrics_router
from chatmw.api_business import create_business_router
from chatmw.business import BusinessSettings, record_conversion, record_lead, record_spend
from chatmw.cli import app as cli_app
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.security.privacy import PrivacySettings
from chatmw.security.secret import Secret
from chatmw.store.models import Contact
from chatmw.store.models_business import Conversion as ConversionRow
from chatmw.store.models_business import Lead as LeadRow
from chatmw.store.models_business import Spend

T0 = ev.now_utc().replace(microsecond=0) - timedelta(days=3)
BUSINESS_METRICS = (
    "conversion",
    "attribution",
    "cpa",
    "leads",
    "ltv",
    "engagement",
    "resolution",
    "query-types",
    "dropoff",
)


@dataclass
class Api:
    client: httpx.Client
    runtime: Runtime

    def flush(self) -> None:
        assert self.runtime.recorder.flush(10)

    def metric(self, name: str, **params: str) -> dict[str, Any]:
        response = self.client.get(f"/metrics/{name}", params=params)
        assert response.status_code == 200, response.text
        return response.json()


@contextmanager
def running_api(database_url: str, privacy: PrivacySettings | None = None) -> Iterator[Api]:
    runtime = Runtime.from_settings(Settings(database_url=database_url), privacy=privacy)
    runtime.start(migrate=False)
    app = FastAPI()
    app.include_router(create_business_router(runtime, BusinessSettings(currency="EUR")))
    app.include_router(create_metrics_router(runtime.engine))
    try:
        with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
            yield Api(client, runtime)
    finally:
        runtime.stop()


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    """A server on an empty database, for tests that store data."""
    with running_api(database_url) as started:
        yield started


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """One server per backend for tests that store nothing (or the same chat every time)."""
    directory = str(tmp_path_factory.mktemp("api"))
    with fresh_database(request.param, directory) as url, running_api(url) as started:
        yield started


def chat(api: Api, user: str = "u1", conversation: str = "c1") -> None:
    for offset, role in ((0, "user"), (5, "bot"), (20, "user")):
        api.runtime.recorder.submit(
            ev.Message(
                channel="web",
                occurred_at=T0 + timedelta(seconds=offset),
                key=f"{conversation}-{offset}",
                role=role,
                user_id=user,
                text="hello",
                conversation_id=conversation,
            )
        )  # type: ignore[arg-type]


def conversion(**overrides: Any) -> dict[str, Any]:
    body = {
        "key": "order-1",
        "name": "purchase",
        "value": "49.90",
        "currency": "EUR",
        "channel": "web",
        "user_id": "u1",
        "occurred_at": (T0 + timedelta(hours=2)).isoformat(),
    }
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def error_loc(response: httpx.Response) -> list[Any]:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"]


def test_conversion_repost_counted_once(api: Api) -> None:
    chat(api)
    for _ in range(3):
        response = api.client.post("/business/conversions", json=conversion())
        assert response.status_code == 202
        assert response.json() == {"status": "accepted", "key": "order-1"}
    api.client.post("/business/conversions", json=conversion(key="order-2", value=10))
    api.flush()
    result = api.metric("conversion")
    assert result["conversions"] == 2
    assert result["revenue"] == "59.90"
    assert result["converted_conversations"] == 1
    assert result["conversion_rate"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"key": None}, "key"),
        ({"key": ""}, "key"),
        ({"name": None}, "name"),
        ({"value": "abc"}, "value"),
        ({"value": "1.1234567"}, "value"),
        ({"value": True}, "value"),
        ({"value": "NaN"}, "value"),
        ({"value": None}, "value"),
        ({"currency": "eur"}, "currency"),
        ({"currency": "USD"}, "currency"),
        ({"channel": None}, "channel"),
        ({"user_id": None}, "user_id"),
        ({"occurred_at": "2024-03-01T10:00:00"}, "occurred_at"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"extra": 1}, "extra"),
    ],
)
def test_conversion_rejects_invalid_field(
    shared_api: Api, overrides: dict[str, Any], field: str
) -> None:
    response = shared_api.client.post("/business/conversions", json=conversion(**overrides))
    assert error_loc(response) == ["body", field]


def test_conversion_other_currency_message(shared_api: Api) -> None:
    response = shared_api.client.post("/business/conversions", json=conversion(currency="USD"))
    assert response.json()["detail"][0]["msg"] == (
        "currency USD differs from this deployment's currency EUR; record amounts in EUR"
    )


def test_conversion_by_conversation_id(api: Api) -> None:
    chat(api, conversation="c9")
    response = api.client.post(
        "/business/conversions", json=conversion(user_id=None, conversation_id="c9")
    )
    assert response.status_code == 202
    api.flush()
    assert api.metric("conversion")["converted_conversations"] == 1


def lead(**overrides: Any) -> dict[str, Any]:
    body = {
        "channel": "web",
        "user_id": "u1",
        "email": "Ann@Example.org",
        "occurred_at": (T0 + timedelta(minutes=1)).isoformat(),
    }
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def test_lead_repost_counted_once(api: Api) -> None:
    chat(api)
    for _ in range(2):
        response = api.client.post("/business/leads", json=lead(score=70))
        assert response.status_code == 202
    both = api.client.post(
        "/business/leads", json=lead(email="b@example.org", phone="+33 6 12 34 56 78", key="form-7")
    )
    assert both.json()["keys"] == ["form-7:email", "form-7:phone"]
    api.client.post("/business/conversions", json=conversion())
    api.flush()
    result = api.metric("leads")
    assert result["leads"] == 3
    assert result["by_kind"] == {"email": 2, "phone": 1}
    assert result["converted_leads"] == 3
    assert result["average_score"] == 70.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"email": "not-an-address"}, "email"),
        ({"email": None}, "email"),
        ({"email": None, "phone": "12"}, "phone"),
        ({"score": 101}, "score"),
        ({"user_id": None}, "user_id"),
        ({"channel": ""}, "channel"),
    ],
)
def test_lead_rejects_invalid_field(shared_api: Api, overrides: dict[str, Any], field: str) -> None:
    response = shared_api.client.post("/business/leads", json=lead(**overrides))
    assert error_loc(response) == ["body", field]


def test_spend_json_replaces_same_day(api: Api) -> None:
    body = {"day": "2024-03-01", "channel": "web", "campaign": "spring", "amount": "12.50"}
    assert api.client.post("/business/spend", json=body).status_code == 200
    assert api.client.post("/business/spend", json={**body, "amount": "20"}).status_code == 200
    with api.runtime.engine.connect() as connection:
        rows = connection.execute(select(Spend.amount_micros, Spend.currency)).all()
    assert rows == [(20_000_000, "EUR")]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"amount": "-1"}, "amount"),
        ({"amount": "x"}, "amount"),
        ({"day": "2024-13-01"}, "day"),
        ({"currency": "USD"}, "currency"),
        ({"channel": ""}, "channel"),
    ],
)
def test_spend_rejects_invalid_field(
    shared_api: Api, overrides: dict[str, Any], field: str
) -> None:
    body = {"day": "2024-03-01", "channel": "web", "amount": "1", **overrides}
    assert error_loc(shared_api.client.post("/business/spend", json=body)) == ["body", field]


SPEND_CSV = (
    "day,channel,campaign,amount,currency\n"
    f"{T0.date().isoformat()},web,spring,100.00,EUR\n"
    f"{T0.date().isoformat()},web,,50,EUR\n"
    f"{(T0 + timedelta(days=1)).date().isoformat()},web,spring,25.5,EUR\n"
)


def test_spend_csv_upload_and_cpa(api: Api) -> None:
    chat(api)
    api.client.post("/business/conversions", json=conversion(value="70"))
    for _ in range(2):
        response = api.client.post(
            "/business/spend/csv", content=SPEND_CSV, headers={"content-type": "text/csv"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["stored"] == 3
    api.flush()
    result = api.metric("cpa")
    assert result["spend"] == "175.50"
    assert result["conversions"] == 1
    assert result["cpa"] == "175.50"
    assert result["roi"] == round((70 - 175.5) / 175.5, 4)
    groups = {group["group"]: group["spend"] for group in result["groups"]}
    assert groups == {"spring": "125.50", "(none)": "50.00"}


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ("day,channel,amount\n2024-03-01,web,1\n2024-03-02,web,abc\n", ["body", 3, "amount"]),
        ("day,channel,amount\n2024-02-30,web,1\n", ["body", 2, "day"]),
        ("day,amount\n2024-03-01,1\n", ["body", 1, "channel"]),
        ("day,channel,amount,cost\n", ["body", 1, "cost"]),
        ("day,channel,amount,currency\n2024-03-01,web,1,USD\n", ["body", 2, "currency"]),
        ("day,channel,amount\n2024-03-01,web,1\n2024-03-01,web,2\n", ["body", 3, "day"]),
        ("day,channel,amount\n2024-03-01,web,1,9\n", ["body", 2, "(row)"]),
    ],
)
def test_spend_csv_rejects_row_stores_nothing(shared_api: Api, text: str, loc: list[Any]) -> None:
    response = shared_api.client.post("/business/spend/csv", content=text)
    assert error_loc(response) == loc
    with shared_api.runtime.engine.connect() as connection:
        assert connection.execute(select(Spend.id)).all() == []


def test_spend_csv_with_bom_and_crlf(api: Api) -> None:
    text = (
        "\ufeffday,channel,campaign,amount\r\n2024-03-01,web,spring,10.5\r\n2024-03-02,web,,2\r\n"
    )
    response = api.client.post("/business/spend/csv", content=text.encode())
    assert response.status_code == 200, response.text
    assert response.json() == {
        "stored": 2,
        "currency": "EUR",
        "first_day": "2024-03-01",
        "last_day": "2024-03-02",
    }
    with api.runtime.engine.connect() as connection:
        rows = connection.execute(
            select(Spend.campaign, Spend.amount_micros).order_by(Spend.day)
        ).all()
    assert rows == [("spring", 10_500_000), ("", 2_000_000)]


def test_python_recording_functions(api: Api) -> None:
    chat(api)
    with pytest.raises(ValueError, match="user_id or conversation_id is required"):
        record_conversion(
            api.runtime.recorder, key="k", name="purchase", value="1", currency="EUR", channel="web"
        )
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        record_conversion(
            api.runtime.recorder,
            key="k",
            name="purchase",
            value="1.0000001",
            currency="EUR",
            channel="web",
            user_id="u1",
        )
    assert record_conversion(
        api.runtime.recorder,
        key="k",
        name="purchase",
        value=Decimal("5"),
        currency="EUR",
        channel="web",
        user_id="u1",
        occurred_at=T0 + timedelta(hours=1),
    )
    # Another currency cannot raise into the caller, so the writer drops it.
    assert record_conversion(
        api.runtime.recorder,
        key="k2",
        name="purchase",
        value="7",
        currency="USD",
        channel="web",
        user_id="u1",
        occurred_at=T0 + timedelta(hours=1),
    )
    assert record_lead(
        api.runtime.recorder,
        channel="web",
        user_id="u1",
        kind="email",
        value="ann@example.org",
        occurred_at=T0,
    )
    with pytest.raises(ValueError, match="amount must not be negative"):
        record_spend(
            api.runtime.recorder, day=T0.date(), channel="web", amount="-2", currency="EUR"
        )
    assert record_spend(
        api.runtime.recorder,
        day=T0.date(),
        channel="web",
        amount="2.5",
        currency="EUR",
        campaign="spring",
    )
    api.flush()
    assert api.metric("conversion")["revenue"] == "5.00"
    assert api.metric("leads")["leads"] == 1
    cpa = api.metric("cpa")
    assert cpa["spend"] == "2.50"
    assert cpa["cpa"] == "2.50"


@pytest.mark.parametrize("name", BUSINESS_METRICS)
def test_metric_served_as_json_and_csv(shared_api: Api, name: str) -> None:
    chat(shared_api)
    shared_api.flush()
    result = shared_api.metric(name)
    assert result["metric"] == name
    csv_response = shared_api.client.get(f"/metrics/{name}", params={"format": "csv"})
    assert csv_response.status_code == 200
    assert csv_response.text.splitlines()[0].split(",")[0] in ("group", "split", "touch")


@pytest.mark.parametrize(
    ("name", "param"),
    [
        ("conversion", "attribution_days"),
        ("ltv", "lifespan_years"),
        ("resolution", "repeat_hours"),
        ("dropoff", "idle_minutes"),
        ("ltv", "as_of"),
    ],
)
def test_metric_rejects_bad_parameter(shared_api: Api, name: str, param: str) -> None:
    response = shared_api.client.get(f"/metrics/{name}", params={param: "abc"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", param]


def test_metric_descriptions_in_openapi(shared_api: Api) -> None:
    paths = shared_api.client.get("/openapi.json").json()["paths"]
    for name in BUSINESS_METRICS:
        description = paths[f"/metrics/{name}"]["get"]["description"]
        assert "empty window" in description.lower() or "null" in description, name
    assert "/business/spend/csv" in paths


def test_cli_spend_import(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "spend.csv"
    path.write_text(SPEND_CSV.replace(",EUR", "").replace(",currency", ""))
    runner = CliRunner()
    result = runner.invoke(
        cli_app, ["spend", "import", str(path), "--db", database_url, "--currency", "EUR"]
    )
    assert result.exit_code == 0, result.output
    assert "stored 3 spend rows in EUR" in result.output
    path.write_text("day,channel,amount,currency\n2024-03-01,web,1,USD\n")
    rejected = runner.invoke(cli_app, ["spend", "import", str(path), "--db", database_url])
    assert rejected.exit_code == 2
    assert "line 2, column currency" in rejected.output or "differs" in rejected.output
    metrics = runner.invoke(cli_app, ["metrics", "cpa", "--db", database_url, "--json"])
    assert metrics.exit_code == 0, metrics.output
    assert json.loads(metrics.output)["spend"] == "175.50"


def test_business_events_survive_spool() -> None:
    from chatmw.events_business import Conversion, Lead, Spend
    from chatmw.spool import decode_event, encode_event

    events = [
        Conversion(
            channel="web",
            occurred_at=T0,
            key="k",
            name="purchase",
            value_micros=1_500_000,
            currency="EUR",
            user_id="u1",
            meta={"order": "A-1"},
        ),
        Lead(
            channel="web",
            occurred_at=T0,
            key="l",
            user_id="u1",
            kind="email",
            value="a@b.org",
            score=50.0,
        ),
        Spend.for_day(T0.date(), "web", Decimal("12.25"), "EUR", "spring"),
    ]
    for event in events:
        decoded = decode_event(json.loads(json.dumps(encode_event(event))))
        assert decoded == event
    assert events[0].value == Decimal("1.5")
    assert events[2].day == T0.date()
    assert events[2].amount == Decimal("12.25")


def test_pseudonymised_ids_still_attribute(database_url: str) -> None:
    privacy = PrivacySettings(pseudonym_key=Secret("k" * 64), text_mode="redacted")
    with running_api(database_url, privacy) as api:
        for offset, text in ((0, "hi, I am ann@example.org"), (9, "thanks")):
            api.runtime.recorder.submit(
                ev.Message(
                    channel="web",
                    occurred_at=T0 + timedelta(seconds=offset),
                    key=f"p{offset}",
                    role="user",
                    user_id="u1",
                    text=text,
                    conversation_id="c1",
                )
            )
        assert api.client.post("/business/conversions", json=conversion()).status_code == 202
        assert (
            api.client.post("/business/leads", json=lead(email="other@example.org")).status_code
            == 202
        )
        api.flush()
        converted = api.metric("conversion")
        leads = api.metric("leads")
        with api.runtime.engine.connect() as connection:
            contact_ids = connection.execute(select(Contact.external_id)).scalars().all()
            conversion_users = connection.execute(select(ConversionRow.user_id)).scalars().all()
            lead_rows = connection.execute(
                select(LeadRow.user_id, LeadRow.value, LeadRow.origin)
            ).all()
    assert converted["converted_conversations"] == 1
    assert converted["revenue"] == "49.90"
    assert leads["leads"] == 2
    assert leads["converted_leads"] == 2
    assert "u1" not in contact_ids
    assert conversion_users == contact_ids
    assert {user for user, _, _ in lead_rows} == set(contact_ids)
    assert {value for _, value, _ in lead_rows} == {None}
    assert sorted(origin for _, _, origin in lead_rows) == ["api", "message"]


def test_unreachable_database_gives_503() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/missing"
    runtime = Runtime.from_settings(Settings(database_url=url))
    app = FastAPI()
    app.include_router(create_business_router(runtime))
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        spend = client.post(
            "/business/spend", json={"day": "2024-03-01", "channel": "web", "amount": "1"}
        )
        upload = client.post(
            "/business/spend/csv", content="day,channel,amount\n2024-03-01,web,1\n"
        )
        posted = client.post("/business/conversions", json=conversion())
    runtime.engine.dispose()
    assert spend.status_code == 503
    assert upload.status_code == 503
    assert posted.status_code == 503
    assert spend.json() == {"detail": "the database is unavailable; retry later"}
