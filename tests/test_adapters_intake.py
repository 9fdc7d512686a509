"""Webhook intake and forwarding: recorder refusals, durable acknowledgement, retries to the bot."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
import pytest
from adapters_support import APP_SECRET, VERIFY_TOKEN, GraphStub, ServerThread, signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from chatmw import events as ev
from chatmw.adapters._meta import MetaSettings, WebhookStats
from chatmw.adapters.messenger import Watermark
from chatmw.adapters.proxy import Forwarder, create_proxy_app
from chatmw.adapters.webhook import WebhookDecoder, WebhookIntake, parse_webhook
from chatmw.exchange import Exchange, captured_exchange, expand_all
from chatmw.recorder import Recorder, RecorderSettings

BODY = json.dumps(
    {
        "object": "page",
        "entry": [
            {
                "id": "1",
                "time": 1767225600000,
                "messaging": [
                    {
                        "sender": {"id": "42"},
                        "recipient": {"id": "1"},
                        "timestamp": 1767225600000,
                        "message": {"mid": "m_intake_1", "text": "hi"},
                    }
                ],
            }
        ],
    }
).encode()


class Sink:
    def __init__(self, accept: bool = True, replayable: bool = False) -> None:
        self.accept = accept
        self.replayable = replayable
        self.submitted: list[ev.Event] = []
        self.durable: list[list[ev.Event]] = []

    def submit(self, event: ev.Event) -> bool:
        self.submitted.append(event)
        return self.accept

    def submit_durable(self, events: Sequence[ev.Event]) -> bool:
        self.durable.append(list(events))
        return self.accept


def meta(**overrides: object) -> MetaSettings:
    values: dict[str, object] = {"app_secret": APP_SECRET, "verify_token": VERIFY_TOKEN}
    values.update(overrides)
    return MetaSettings(**values)  # type: ignore[arg-type]


def test_intake_asks_retry_when_recorder_full() -> None:
    sink = Sink(accept=False)
    intake = WebhookIntake(meta(), sink)
    outcome = intake.receive(BODY, signature(BODY))
    assert outcome.status == 503
    assert outcome.forward is False
    assert intake.stats["not_accepted"] == 1


def test_intake_durable_uses_spool_when_replayable() -> None:
    sink = Sink(replayable=True)
    outcome = WebhookIntake(meta(durable_acknowledgement=True), sink).receive(BODY, signature(BODY))
    assert outcome.status == 200
    assert [len(batch) for batch in sink.durable] == [1]
    assert sink.submitted == []
    refused = Sink(accept=False, replayable=True)
    assert (
        WebhookIntake(meta(durable_acknowledgement=True), refused)
        .receive(BODY, signature(BODY))
        .status
        == 503
    )


def test_intake_durable_without_spool_queues() -> None:
    sink = Sink(replayable=False)
    outcome = WebhookIntake(meta(durable_acknowledgement=True), sink).receive(BODY, signature(BODY))
    assert outcome.status == 200
    assert sink.durable == []
    assert len(sink.submitted) == 1


class FlakyBot:
    def __init__(self, failures: int, failure_status: int = 500) -> None:
        self.failures = failures
        self.failure_status = failure_status
        self.attempts: list[bytes] = []

    def app(self) -> Starlette:
        async def webhook(request: Request) -> Response:
            self.attempts.append(await request.body())
            if len(self.attempts) <= self.failures:
                return PlainTextResponse("down", status_code=self.failure_status)
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/hook", webhook, methods=["POST"])])


async def forward_once(url: str, retries: int = 3) -> WebhookStats:
    stats = WebhookStats()
    settings = meta(
        bot_webhook_url=url, forward_retries=retries, forward_backoff_s=0.01, forward_timeout_s=2
    )
    forwarder = Forwarder(settings, stats)
    await forwarder.start()
    assert forwarder.enqueue(
        BODY,
        [
            (b"x-hub-signature-256", signature(BODY).encode()),
            (b"host", b"meta.example"),
            (b"content-length", b"9"),
        ],
    )
    assert await forwarder.join(10)
    await forwarder.stop(1)
    return stats


def test_forwarder_retries_server_errors() -> None:
    bot = FlakyBot(failures=2)
    with ServerThread(bot.app()) as server:
        stats = asyncio.run(forward_once(f"{server.url}/hook"))
    assert bot.attempts == [BODY] * 3
    assert stats["forwarded"] == 1
    assert stats["forward_failed"] == 0


def test_forwarder_gives_up_after_retries() -> None:
    bot = FlakyBot(failures=10)
    with ServerThread(bot.app()) as server:
        stats = asyncio.run(forward_once(f"{server.url}/hook", retries=2))
    assert len(bot.attempts) == 3
    assert stats["forward_failed"] == 1
    assert stats["forwarded"] == 0


def test_forwarder_does_not_retry_rejection() -> None:
    bot = FlakyBot(failures=10, failure_status=403)
    with ServerThread(bot.app()) as server:
        stats = asyncio.run(forward_once(f"{server.url}/hook"))
    assert len(bot.attempts) == 1
    assert stats["forward_failed"] == 1


def test_forwarder_full_queue_counts_drop() -> None:
    async def scenario() -> tuple[list[bool], WebhookStats]:
        stats = WebhookStats()
        settings = meta(
            bot_webhook_url="http://127.0.0.1:9/hook",
            forward_queue_size=2,
            forward_workers=1,
            forward_retries=0,
            forward_timeout_s=0.5,
        )
        forwarder = Forwarder(settings, stats)
        await forwarder.start()
        results = [forwarder.enqueue(BODY, []) for _ in range(4)]
        await forwarder.stop(0.1)
        return results, stats

    results, stats = asyncio.run(scenario())
    # The worker task has not run yet when the four enqueues happen, so two fit.
    assert results == [True, True, False, False]
    assert stats["forward_dropped"] == 2


def test_passthrough_keeps_compressed_answer() -> None:
    stub = GraphStub()
    sink = Sink()
    with ServerThread(stub.app()) as graph:
        app = create_proxy_app(meta(graph_base_url=graph.url), sink=sink)
        with ServerThread(app) as proxy:
            response = httpx.post(
                f"{proxy.url}/v21.0/me/messages",
                params={"gzip": "1"},
                json={"recipient": {"id": "7100000000000001"}, "message": {"text": "zipped"}},
            )
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["message_id"].startswith("m_gz")
    assert [(e.platform_message_id, e.text) for e in sink.submitted] == [  # type: ignore[attr-defined]
        (response.json()["message_id"], "zipped")
    ]


def test_watermark_survives_spool_encoding() -> None:
    spool = pytest.importorskip("chatmw.spool")
    event = Watermark(
        channel="messenger",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        user_id="42",
        status="read",
        watermark=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
    )
    decoded = spool.decode_event(json.loads(json.dumps(spool.encode_event(event))))
    assert decoded == event


def test_recorder_sink_gets_messenger_handlers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chatmw.adapters.messenger import drop_recorded_echoes
    from chatmw.config import Settings
    from chatmw.runtime import Runtime

    runtime = Runtime.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}"))
    create_proxy_app(meta(), sink=runtime.recorder)
    create_proxy_app(meta(), sink=runtime.recorder)
    assert Watermark in runtime.writer.handlers
    assert runtime.writer.preprocessors.count(drop_recorded_echoes) == 1
    runtime.engine.dispose()


class ListWriter:
    # Takes the batches as a writer process does (exchanges undecoded) and decodes them here.
    expands_exchanges = True

    def __init__(self) -> None:
        self.taken: list[type] = []
        self.written: list[ev.Event] = []

    def write(self, batch: Sequence[ev.Event]) -> int:
        self.taken.extend(type(event) for event in batch)
        self.written.extend(expand_all(batch))
        return len(batch)


def recorder_intake(queue_size: int = 100) -> tuple[WebhookIntake, Recorder, ListWriter]:
    writer = ListWriter()
    recorder = Recorder(writer, RecorderSettings(queue_size=queue_size, batch_size=10))
    return WebhookIntake(meta(), recorder), recorder, writer


def test_intake_queues_body_undecoded_for_recorder() -> None:
    intake, recorder, writer = recorder_intake()
    received = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    outcome = intake.receive(BODY, signature(BODY), received)

    assert (outcome.status, outcome.body, outcome.forward) == (200, b"EVENT_RECEIVED", True)
    assert recorder.stats().submitted == 1
    recorder.start()
    assert recorder.flush(10)
    recorder.stop()
    assert writer.taken == [Exchange]
    expected = parse_webhook(BODY, received)
    assert writer.written == expected
    assert [event.key for event in writer.written] == ["messenger:m_intake_1"]  # type: ignore[attr-defined]
    assert intake.stats["events"] == 1


def test_intake_undecoded_answers_retry_when_queue_full() -> None:
    intake, recorder, _ = recorder_intake(queue_size=1)

    first = intake.receive(BODY, signature(BODY))
    second = intake.receive(BODY, signature(BODY))

    assert first.status == 200
    assert (second.status, second.forward) == (503, False)
    assert intake.stats["not_accepted"] == 1


def test_intake_undecoded_rejects_bad_signature_unqueued() -> None:
    intake, recorder, _ = recorder_intake()

    outcome = intake.receive(BODY, "sha256=" + "0" * 64)

    assert outcome.status == 403
    assert recorder.stats().submitted == 0
    assert intake.stats["rejected_signature"] == 1


def test_intake_undecoded_keeps_unparseable_body() -> None:
    intake, recorder, writer = recorder_intake()
    body = b'{"object": "page", "entry": [ broken'

    assert intake.receive(body, signature(body)).status == 200
    recorder.start()
    assert recorder.flush(10)
    recorder.stop()

    assert [(type(event), event.body) for event in writer.written] == [  # type: ignore[attr-defined]
        (ev.RawPayload, body)
    ]
    assert intake.stats["unparseable"] == 1


def test_webhook_decoder_copy_has_own_counters() -> None:
    stats = WebhookStats()
    decoder = WebhookDecoder(frozenset({"app-7"}), stats)
    exchange = captured_exchange("meta", datetime(2026, 1, 2, tzinfo=UTC), "", decoder, BODY,
                                 b"", None, None, "complete", b"")

    copied = pickle.loads(pickle.dumps(exchange))

    assert copied.decoder.agent_app_ids == frozenset({"app-7"})
    assert copied.decoder.token == decoder.token
    assert copied.decoder.expand(copied) == decoder.expand(exchange)
    assert stats["events"] == 1
    assert copied.decoder.stats["events"] == 1


def test_writer_process_counts_reach_intake(database_url: str) -> None:
    """Counters of bodies parsed in the writer process reach the intake's counters once."""
    import functools

    from sqlalchemy import func, select

    from chatmw.store.engine import make_engine
    from chatmw.store.models import Message, RawPayload
    from chatmw.writer_process import ProcessWriter, build_writer

    writer = ProcessWriter(functools.partial(build_writer, database_url, sentiment=False))
    recorder = Recorder(writer, RecorderSettings(batch_size=10, batch_interval_s=0.05))
    intake = WebhookIntake(meta(), recorder)
    broken = b'{"object": "page", "entry": [ broken'
    recorder.start()
    try:
        for body in (BODY, broken, BODY):
            assert intake.receive(body, signature(body)).status == 200
        assert recorder.flush(60)
    finally:
        recorder.stop()
        writer.close()

    # Two bodies give one message (the second is a duplicate), the broken one a raw payload.
    assert intake.stats["events"] == 3
    assert intake.stats["unparseable"] == 1
    engine = make_engine(database_url)
    with engine.connect() as connection:
        messages = connection.execute(select(func.count()).select_from(Message)).scalar_one()
        payloads = connection.execute(select(func.count()).select_from(RawPayload)).scalar_one()
    engine.dispose()
    assert messages == 1
    assert payloads == 1
