"""Chat exchanges decoded where the batch is written, and the writer in a child process."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw._demo.faq_bot import FAQ_CODEC
from chatmw.adapters import messenger
from chatmw.config import Settings
from chatmw.exchange import Exchange, ExchangeDecoder, captured_exchange, expand_all
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.runtime import Runtime
from chatmw.security.privacy import PrivacySettings
from chatmw.security.secret import Secret
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Contact, Message
from chatmw.store.models_rollups import RollupState
from chatmw.writer_priority import writer_niceness
from chatmw.writer_process import ProcessWriter, start_process_writer
from tests.spool_helpers import SwitchableWriter, wait_for

T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
KEY = "k" * 32


def exchange(index: int, user: str = "u1", text: str = "what are your opening hours?",
             decoder: ExchangeDecoder | None = None) -> Exchange:
    body = ('{"user_id": "%s", "message": "%s"}' % (user, text)).encode()
    reply = b'{"replies": [{"text": "We open at 9.", "intent": "opening_hours"}]}'
    return captured_exchange(channel="web", occurred_at=T0 + timedelta(minutes=index),
                             key=f"x{index}", decoder=decoder or ExchangeDecoder(FAQ_CODEC), request=body,
                             response=reply, status=200, latency_ms=120.0)


# Decoding

def test_exchange_expands_to_messages() -> None:
    events = expand_all([exchange(0)])

    user, bot, update = events
    assert isinstance(user, ev.Message) and isinstance(bot, ev.Message)
    assert isinstance(update, ev.ConversationUpdate) and update.intent == "opening_hours"
    assert (user.key, user.role, user.user_id, user.text) == (
        "x0", "user", "u1", "what are your opening hours?")
    assert (bot.key, bot.role, bot.reply_to, bot.intent) == (
        "x0:reply:0", "bot", "x0", "opening_hours")
    assert bot.latency_ms == 120.0
    assert bot.occurred_at == T0 + timedelta(milliseconds=120)
    # Decoding twice gives the same events, so a batch written again stores them once.
    assert expand_all([exchange(0)]) == events


def test_exchange_unfinished_keeps_user_message() -> None:
    unfinished = captured_exchange(channel="web", occurred_at=T0, key="x",
                                   decoder=ExchangeDecoder(FAQ_CODEC),
                                   request=b'{"user_id": "u", "message": "hi"}', latency_ms=None,
                                   response_state="unfinished")
    assert [e.role for e in expand_all([unfinished])] == ["user"]  # type: ignore[attr-defined]


def test_exchange_not_chat_is_counted() -> None:
    decoder = ExchangeDecoder(FAQ_CODEC)
    bad = captured_exchange(channel="web", occurred_at=T0, key="x", decoder=decoder,
                            request=b"not json", status=200, latency_ms=5.0)
    assert expand_all([bad, exchange(1, decoder=decoder)])[0].key == "x1"  # type: ignore[attr-defined]
    assert decoder.skipped == {"request_not_decoded": 1}


# The recorder and writers that do not decode exchanges

def test_recorder_decodes_exchanges_for_plain_writers() -> None:
    writer = SwitchableWriter()
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.01))
    recorder.transform = lambda event: event.copy_with(user_id="T-" + event.user_id) if hasattr(
        event, "user_id") else event
    recorder.start()
    try:
        assert recorder.submit(exchange(0))
        assert recorder.flush(10)
    finally:
        recorder.stop()
    written = [event for batch in writer.batches for event in batch]
    assert [type(event).__name__ for event in written] == [
        "Message", "Message", "ConversationUpdate"]
    assert {event.user_id for event in written} == {"T-u1"}  # type: ignore[attr-defined]
    assert recorder.stats().written == 3


def test_spooled_exchanges_are_decoded_and_transformed(tmp_path: Path) -> None:
    writer = SwitchableWriter()
    writer.down.set()
    spool = FileSpool(SpoolSettings(tmp_path / "spool"))
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.01, retries=0,
                                                 retry_backoff_s=0.01), spool=spool)
    recorder.transform = lambda event: event.copy_with(user_id="T-" + event.user_id) if hasattr(
        event, "user_id") else event
    recorder.start()
    try:
        assert recorder.submit(exchange(0))
        assert recorder.flush(10)
        chunk = spool.read_next(100)
    finally:
        recorder.stop(timeout=2)
        spool.close()
    assert chunk is not None
    assert [(type(e).__name__, e.user_id) for e in chunk.events] == [  # type: ignore[attr-defined]
        ("Message", "T-u1"), ("Message", "T-u1"), ("ConversationUpdate", "T-u1")]


# Events cross the process boundary

@pytest.mark.parametrize("event", [
    ev.Message(channel="web", occurred_at=T0, key="m", role="user", user_id="u", text="é\x00",
               attributes={"plan": "pro"}, meta={"a": [1, 2]}),
    ev.Status(channel="whatsapp", occurred_at=T0, platform_message_id="w", status="read"),
    ev.Touch(channel="web", occurred_at=T0, key="t", user_id="u", campaign="spring"),
    ev.ConversationUpdate(channel="web", occurred_at=T0, user_id="u", ended=True),
    ev.Exposure(channel="web", occurred_at=T0, key="e", user_id="u", kind="impression"),
    ev.RawPayload(channel="meta", occurred_at=T0, source="s", body=b"\xff", reason="r"),
])
def test_events_pickle_to_equal_events(event: ev.Event) -> None:
    assert pickle.loads(pickle.dumps(event)) == event


def test_copy_with_changes_fields_and_rejects_unknown_ones() -> None:
    message = ev.Message(channel="web", occurred_at=T0, key="m", role="user", user_id="u")
    assert message.copy_with(user_id="v") == ev.Message(
        channel="web", occurred_at=T0, key="m", role="user", user_id="v")
    with pytest.raises(TypeError, match="no fields"):
        message.copy_with(nickname="v")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TaggedMessage(ev.Message):
    # A subclass declared without slots: its own field lives in the instance's __dict__.
    tag: str = "none"


def test_unslotted_subclass_copies_and_pickles() -> None:
    message = _TaggedMessage(channel="web", occurred_at=T0, key="m", role="user", user_id="u",
                             text="hi", tag="a")
    copy = message.copy_with(user_id="v", tag="b")
    assert type(copy) is _TaggedMessage
    assert copy.user_id == "v"
    assert copy.tag == "b"
    assert copy.text == "hi"
    assert copy.key == "m"
    assert message.user_id == "u"
    assert message.tag == "a"
    assert pickle.loads(pickle.dumps(message)) == message


def test_copy_with_keeps_every_other_field() -> None:
    message = ev.Message(channel="web", occurred_at=T0, key="m", role="bot", user_id="u",
                         text="t", conversation_id="c", intent="greeting", latency_ms=12.5,
                         attributes={"plan": "pro"}, meta={"a": 1})
    copy = message.copy_with(conversation_id="d")
    assert copy == dataclasses.replace(message, conversation_id="d")


def test_rebuild_rejects_wrong_value_count() -> None:
    message = ev.Message(channel="web", occurred_at=T0, key="m", role="user", user_id="u")
    _, values = message.__reduce__()[1]
    with pytest.raises(ValueError):
        ev._rebuild(ev.Message, values[:-1])


# The writer process

def test_writer_process_stores_pseudonyms(database_url: str, engine: Engine) -> None:
    settings = Settings(database_url=database_url, writer_process=True)
    # The default privacy settings: pseudonyms, and text with addresses redacted.
    privacy = PrivacySettings(pseudonym_key=Secret(KEY))
    runtime = Runtime.from_settings(settings, privacy=privacy)
    runtime.start()
    try:
        assert isinstance(runtime.recorder.writer, ProcessWriter)
        exchanges = [exchange(0, "alice", "mail me at alice@example.com"), exchange(1, "bob")]
        for item in exchanges:
            assert runtime.recorder.submit(item)
        assert runtime.recorder.flush(60)
        written = runtime.recorder.stats().written
        pseudonyms = {runtime.privacy.subject_id(name) for name in ("alice", "bob")}  # type: ignore[union-attr]
    finally:
        runtime.stop()
    assert runtime.recorder.writer is runtime.writer
    with engine.connect() as connection:
        contacts = set(connection.execute(select(Contact.external_id)).scalars())
        roles = connection.execute(select(Message.role).order_by(Message.id)).scalars().all()
        texts = set(connection.execute(select(Message.text).where(Message.role == "user")).scalars())
    assert contacts == pseudonyms
    assert texts == {"mail me at [email]", "what are your opening hours?"}
    assert sorted(roles) == ["bot", "bot", "user", "user"]
    assert written == 6  # two messages and a conversation update per exchange


def test_writer_process_gets_new_handlers(database_url: str) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url, writer_process=True),
                                    privacy=None)
    runtime.start()
    try:
        writer = runtime.recorder.writer
        assert isinstance(writer, ProcessWriter)
        assert runtime.recorder.submit(exchange(0))
        assert runtime.recorder.flush(60)
        messenger.register_sink_handlers(runtime.recorder)
        watermark = messenger.Watermark(channel="messenger", occurred_at=T0, user_id="u1",
                                        status="read", watermark=T0)
        assert runtime.recorder.submit(watermark)
        assert runtime.recorder.flush(60)
        stats = runtime.recorder.stats()
    finally:
        runtime.stop()
    assert messenger.Watermark in runtime.writer.handlers
    assert stats.failed_batches == 0
    assert stats.dropped == {}


def test_writer_process_not_possible(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = make_engine(url)
    upgrade(engine)
    runtime = Runtime.from_settings(Settings(database_url=url), privacy=None)
    assert start_process_writer(runtime.writer, "sqlite://") is None
    runtime.writer.enrichers.append(lambda message: {})
    with caplog.at_level(logging.WARNING, logger="chatmw"):
        assert start_process_writer(runtime.writer, url) is None
    assert "cannot be copied to a writer process" in caplog.text
    engine.dispose()
    runtime.engine.dispose()


def test_writer_placement_from_env() -> None:
    assert Settings.from_env({"CHATMW_WRITER": "thread"}).writer_process is False
    assert Settings.from_env({}).writer_process is True
    with pytest.raises(ValueError, match="CHATMW_WRITER must be 'process' or 'thread'"):
        Settings.from_env({"CHATMW_WRITER": "fork"})


def test_writer_process_start_failure_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ProcessWriter(SwitchableWriter)

    def fail_to_start(self: object) -> None:
        raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(writer._context.Process, "start", fail_to_start)
    with pytest.raises(OperationalError, match="writer process could not start"):
        writer.write([exchange(0)])


def test_daemonic_process_keeps_thread_writer(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    runtime = Runtime.from_settings(Settings(database_url=url), privacy=None)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert start_process_writer(runtime.writer, url) is None
    runtime.engine.dispose()


def _child_priority(tmp_path: Path) -> tuple[int, int, int | None]:
    # Starts a runtime with a writer process, writes one exchange, and returns the parent's
    # niceness, the child's niceness and the child's scheduling policy (None off Linux).
    url = f"sqlite:///{tmp_path / 'w.db'}"
    runtime = Runtime.from_settings(Settings(database_url=url, writer_process=True), privacy=None)
    runtime.start()
    try:
        writer = runtime.recorder.writer
        assert isinstance(writer, ProcessWriter)
        assert runtime.recorder.submit(exchange(0))
        assert runtime.recorder.flush(60)
        child = writer._process.pid
        parent_niceness = os.getpriority(os.PRIO_PROCESS, 0)
        child_niceness = os.getpriority(os.PRIO_PROCESS, child)
        policy = os.sched_getscheduler(child) if hasattr(os, "SCHED_BATCH") else None
    finally:
        runtime.stop()
    return parent_niceness, child_niceness, policy


def test_writer_process_runs_nicer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATMW_WRITER_NICE", "7")
    parent_niceness, child_niceness, _ = _child_priority(tmp_path)
    assert child_niceness - parent_niceness == 7


def test_writer_process_default_priority(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.delenv("CHATMW_WRITER_NICE", raising=False)
    parent_niceness, child_niceness, policy = _child_priority(tmp_path)
    # The niceness is capped at 19: a parent at 15 or more leaves less room than 5.
    assert child_niceness == min(19, parent_niceness + 5)
    if policy is not None:
        assert policy == os.SCHED_IDLE


@pytest.mark.parametrize("raw", ["high", "-1", "20"])
def test_writer_niceness_rejects_bad_values(raw: str) -> None:
    with pytest.raises(ValueError, match="CHATMW_WRITER_NICE must be an integer from 0 to 19"):
        writer_niceness({"CHATMW_WRITER_NICE": raw})


def test_writer_process_refreshes_rollups(database_url: str, engine: Engine) -> None:
    runtime = Runtime.from_settings(Settings(database_url=database_url, writer_process=True),
                                    privacy=None)
    runtime.rollup_interval_s = 0.2
    runtime.start()
    try:
        assert runtime._rollups is None  # no refresher thread in this process
        for index in range(300):
            assert runtime.recorder.submit(exchange(index))
        assert runtime.recorder.flush(60)
        with engine.connect() as connection:
            newest = connection.execute(select(func.max(Message.id))).scalar_one()

        def refreshed() -> bool:
            with engine.connect() as connection:
                state = connection.execute(
                    select(RollupState.built, RollupState.watermark_id)).first()
            return state is not None and state.built and state.watermark_id >= newest

        assert wait_for(refreshed, timeout=60)
    finally:
        runtime.stop()


def test_writer_process_large_batch_arrives_whole(database_url: str, engine: Engine) -> None:
    # More events than one chunk of the pipe protocol: all are written in one batch.
    runtime = Runtime.from_settings(Settings(database_url=database_url, writer_process=True),
                                    privacy=None)
    runtime.start()
    try:
        writer = runtime.recorder.writer
        assert isinstance(writer, ProcessWriter)
        written = writer.write([exchange(index) for index in range(250)])
    finally:
        runtime.stop()
    with engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(Message)).scalar_one()
    assert written == 750
    assert stored == 500
