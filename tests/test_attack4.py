"""Odd input through the webhook proxy and the store writer, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from adapters_support import APP_SECRET, VERIFY_TOKEN, EchoBot, GraphStub, ServerThread, signature
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.proxy import create_proxy_app
from chatmw.config import Settings
from chatmw.recorder import RecorderSettings
from chatmw.runtime import Runtime
from chatmw.store import models
from chatmw.store.writer import Writer

PAGE = "104857600000001"
PSID = "7100000000000009"
AT_MS = 1_717_000_000_000


@pytest.fixture
def proxy(database_url: str) -> Iterator[tuple[str, Runtime]]:
    graph, bot = GraphStub(), EchoBot()
    runtime = Runtime.from_settings(
        Settings(database_url=database_url, recorder=RecorderSettings(batch_interval_s=0.01)))
    runtime.start(migrate=False)
    with ServerThread(graph.app()) as graph_server, ServerThread(bot.app()) as bot_server:
        settings = MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN,
                                bot_webhook_url=f"{bot_server.url}/bot/webhook",
                                graph_base_url=graph_server.url, forward_backoff_s=0.02)
        bot.graph_url = graph_server.url
        with ServerThread(create_proxy_app(settings, runtime)) as server:
            yield server.url, runtime
    runtime.stop()


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/webhook", content=body, timeout=10, headers={
        "content-type": "application/json", "x-hub-signature-256": signature(body)})


def test_webhook_non_finite_numbers_stored(proxy: tuple[str, Runtime]) -> None:
    # Python's JSON parser reads NaN and Infinity, which JSON has no text for. A referral
    # carrying them is stored on either database, and so is the message after it.
    url, runtime = proxy
    referral = {"ref": "nan-ad", "source": "ADS", "type": "OPEN_THREAD", "ad_id": "42",
                "ads_context_data": {"score": "<NaN>", "bid": "<-Infinity>", "big": "<1e400>"}}
    items = [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": AT_MS,
         "referral": referral},
        {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": AT_MS + 1,
         "message": {"mid": "m_nan_1", "text": "hello"}},
    ]
    document = json.dumps({"object": "page",
                           "entry": [{"id": PAGE, "time": AT_MS, "messaging": items}]})
    for literal in ("NaN", "-Infinity", "1e400"):
        document = document.replace(f'"<{literal}>"', literal)
    body = document.encode()
    assert _post(url, body).status_code == 200
    assert runtime.recorder.flush(10)
    with Session(runtime.engine) as session:
        touches = session.execute(select(models.Touch.campaign, models.Touch.meta)).all()
        messages = session.scalars(select(models.Message.key)).all()
    assert messages == ["messenger:m_nan_1"]
    assert [campaign for campaign, _ in touches] == ["nan-ad"]
    # JSON has no text for these numbers: each is stored as null.
    assert {name: touches[0][1][name] for name in ("score", "bid", "big")} == {
        "score": None, "bid": None, "big": None}


def test_writer_stores_non_finite_meta_as_null(engine: Engine) -> None:
    # An event built in Python, as an importer or the API builds it, with NaN and infinities
    # in its meta is stored on either database, with null in their place.
    event = ev.Message(channel="web", occurred_at=datetime(2024, 3, 1, 9, tzinfo=UTC),
                       key="m-nan", role="user", user_id="u-nan", text="hi",
                       meta={"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    Writer(engine).write([event])
    with Session(engine) as session:
        stored = session.scalars(select(models.Message.meta)).all()
        # The database's own JSON functions read what was stored.
        extract = ("json_extract(meta, '$.b[1]')" if engine.dialect.name == "sqlite"
                   else "CAST(meta AS JSONB) -> 'b' ->> 1")
        second = session.scalar(text(f"SELECT {extract} FROM messages"))
    assert stored == [{"a": None, "b": [None, 1.5], "c": {"d": None}}]
    assert float(second) == 1.5


# The largest amount a conversion may have (just below 10^12) in micros. Ten of them sum
# past the largest 64-bit integer.
MAX_MICROS = 999_999_999_999_999_999


@pytest.mark.parametrize("name", ["conversion", "channels", "cpa", "ltv"])
def test_rollup_conversion_sums_past_64_bits(engine: Engine, name: str) -> None:
    import chatmw.metrics  # noqa: F401 - registers the metrics
    from chatmw.business import BusinessSettings, install
    from chatmw.events_business import Conversion
    from chatmw.metrics.filters import GroupBy, MetricFilter
    from chatmw.metrics.registry import REGISTRY
    from chatmw.metrics.rollup_query import raw_only
    from chatmw.metrics.rollup_refresh import refresh

    start = datetime(2026, 3, 2, tzinfo=UTC)
    writer = Writer(engine)
    install(writer, BusinessSettings(currency="EUR"))
    writer.write([
        ev.Message(channel="web", occurred_at=start + timedelta(minutes=number), key=f"m{number}",
                   role="user", user_id=f"u{number % 2}", text="hi", conversation_id=f"c{number}")
        for number in range(2)])
    writer.write([
        Conversion(channel="web", occurred_at=start + timedelta(hours=1), key=f"order-{number}",
                   name="purchase", value_micros=MAX_MICROS, currency="EUR",
                   **({"conversation_id": f"c{number % 2}"} if number < 10
                      else {"user_id": f"u{number % 2}"}))
        for number in range(12)])
    refresh(engine)
    spec = REGISTRY[name]
    options = {param.name: param.default for param in spec.params}
    options["as_of"] = (start + timedelta(days=20)).isoformat()
    for group_by in (None, GroupBy("channel")):
        flt = MetricFilter(since=start, until=start + timedelta(days=14), group_by=group_by)
        with raw_only():
            expected = spec.compute(engine, flt, options)
        assert spec.compute(engine, flt, options) == expected
    assert "11999999999999.99998" in json.dumps(expected)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_refresh_contact_ids_past_32_bits(engine: Engine) -> None:
    from chatmw.metrics.contact_sets import decode
    from chatmw.metrics.filters import MetricFilter
    from chatmw.metrics.rollup_query import cover, raw_only
    from chatmw.metrics.rollup_refresh import refresh
    from chatmw.metrics.summary import summary
    from chatmw.metrics.volume import volume

    start = datetime(2026, 3, 2, tzinfo=UTC)
    with engine.begin() as connection:
        # A contact stored with an explicit id: SQLite numbers the next ones after it.
        connection.execute(text(
            "INSERT INTO contacts (id, channel, external_id, first_seen_ms, last_seen_ms)"
            " VALUES (5000000000, 'web', 'imported', 0, 0)"))
    Writer(engine).write([
        ev.Message(channel="web", occurred_at=start + timedelta(hours=number), key=f"m{number}",
                   role="user", user_id=f"u{number}", text="hi", conversation_id=f"c{number}")
        for number in range(3)])
    assert refresh(engine).rebuilt
    with engine.connect() as connection:
        ids = connection.execute(text("SELECT id FROM contacts ORDER BY id")).scalars().all()
        blobs = connection.execute(text(
            "SELECT contacts FROM rollup_contact_sets WHERE kind = 'users'")).scalars().all()
    assert ids == [5_000_000_000, 5_000_000_001, 5_000_000_002, 5_000_000_003]
    assert blobs
    assert all(set(decode(blob)) == set(ids[1:]) for blob in blobs)
    flt = MetricFilter(since=start, until=start + timedelta(days=7))
    with engine.connect() as connection:
        coverage = cover(connection, flt)
    assert coverage is not None
    assert coverage.raw == []
    with raw_only():
        expected = (summary(engine, flt, {}), volume(engine, flt, {"interval": "day"}))
    assert expected[0]["totals"]["users"] == 3
    assert (summary(engine, flt, {}), volume(engine, flt, {"interval": "day"})) == expected


class _FlakyWriter(Writer):
    # The store writer, whose first write fails as a locked database does, after it has
    # decoded what the batch carries.
    calls: int = 0

    def write(self, batch: Sequence[ev.Event]) -> int:
        from sqlalchemy.exc import OperationalError

        self.calls += 1
        if self.calls == 1:
            self.expand(batch)
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return super().write(batch)


def test_retried_webhook_counted_once(engine: Engine) -> None:
    from chatmw.adapters.webhook import WebhookIntake
    from chatmw.recorder import Recorder

    writer = _FlakyWriter(engine)
    recorder = Recorder(writer, RecorderSettings(batch_size=10, retry_backoff_s=0.01))
    settings = MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN)
    intake = WebhookIntake(settings, recorder)
    message = {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": AT_MS,
               "message": {"mid": "m_retry_1", "text": "hi"}}
    good = json.dumps({"object": "page", "entry": [{"id": PAGE, "time": AT_MS,
                                                    "messaging": [message]}]}).encode()
    broken = b'{"object": "page", "entry": [ broken'
    assert intake.receive(good, signature(good)).status == 200
    assert intake.receive(broken, signature(broken)).status == 200
    recorder.start()
    assert recorder.flush(10)
    recorder.stop()
    assert writer.calls == 2
    with Session(engine) as session:
        assert session.scalars(select(models.Message.key)).all() == ["messenger:m_retry_1"]
        assert session.scalars(select(models.RawPayload.body)).all() == [broken]
    assert (intake.stats["events"], intake.stats["unparseable"]) == (2, 1)


def test_refresh_contact_ids_near_int4_max(engine: Engine) -> None:
    # PostgreSQL keeps contact ids in int4. A contact numbered near its end, after a
    # sequence that skipped ahead, is counted by a rebuild as any other.
    import chatmw.metrics  # noqa: F401 - registers the metrics
    from chatmw.metrics.filters import MetricFilter
    from chatmw.metrics.registry import REGISTRY
    from chatmw.metrics.rollup_query import raw_only
    from chatmw.metrics.rollup_refresh import refresh

    start = datetime(2026, 3, 2, tzinfo=UTC)

    def messages(first: int, users: int) -> list[ev.Event]:
        return [ev.Message(channel="web", occurred_at=start + timedelta(hours=number),
                           key=f"m{number}", role="user", user_id=f"u{number}", text="hi",
                           conversation_id=f"c{number}")
                for number in range(first, first + users)]

    Writer(engine).write(messages(0, 2))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT setval('contacts_id_seq', 2147483600)"))
        else:
            connection.execute(text(
                "INSERT INTO contacts (id, channel, external_id, first_seen_ms, last_seen_ms)"
                " VALUES (2147483600, 'web', 'imported', 0, 0)"))
    Writer(engine).write(messages(2, 3))
    assert refresh(engine).rebuilt
    flt = MetricFilter(since=start, until=start + timedelta(days=7))
    for name in ("summary", "growth", "retention", "engagement"):
        spec = REGISTRY[name]
        options = {param.name: param.default for param in spec.params}
        with raw_only():
            expected = spec.compute(engine, flt, options)
        assert spec.compute(engine, flt, options) == expected, name
    assert REGISTRY["summary"].compute(engine, flt, {})["totals"]["conversations"] == 5
