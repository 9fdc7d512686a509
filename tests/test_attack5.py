"""The recorder pipelining batches to a writer process: failures while a batch is pending."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw.adapters._meta import WebhookStats
from chatmw.adapters.webhook import WebhookDecoder
from chatmw.codecs import JsonCodec
from chatmw.exchange import ExchangeDecoder, captured_exchange
from chatmw.recorder import Recorder, RecorderSettings, RecorderStats
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.engine import make_engine
from chatmw.store.models import Message
from chatmw.store.writer import Writer
from chatmw.writer_process import ProcessWriter

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class _SlowWriter(Writer):
    """A store writer that waits ``delay`` seconds before each write, in the child."""

    def __init__(self, engine: Engine, delay: float, poison: str | None,
                 fail_odd: bool = False) -> None:
        super().__init__(engine)
        self.delay = delay
        self.poison = poison
        # Every other write (the first, the third...) fails as retryable.
        self.fail_odd = fail_odd
        self.calls = 0

    def write(self, batch):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        self.calls += 1
        if self.fail_odd and self.calls % 2:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        if self.poison is not None and any(
                getattr(event, "key", None) == self.poison for event in batch):
            raise ValueError("poison event")
        return super().write(batch)


def _slow_writer(url: str, delay: float, poison: str | None = None,
                 fail_odd: bool = False) -> _SlowWriter:
    return _SlowWriter(make_engine(url), delay, poison, fail_odd)


class _KeyedEnricher:
    """Scores a message 0.1 per call for its key; raises for the key ``failing``."""

    def __init__(self, failing: str | None) -> None:
        self.failing = failing
        self.calls: dict[str, int] = {}

    def __call__(self, message: ev.Message) -> dict[str, float]:
        if message.key == self.failing:
            raise ValueError("enricher failed")
        self.calls[message.key] = self.calls.get(message.key, 0) + 1
        return {"sentiment": self.calls[message.key] / 10}


def _enriched_writer(url: str, failing: str | None = None) -> Writer:
    writer = _slow_writer(url, 0.05)
    writer.enrichers.append(_KeyedEnricher(failing))
    return writer


class _FaultyCodec(JsonCodec):
    """A codec with a bug: it raises for a request whose message is ``boom``."""

    def decode_request(self, body: bytes):  # type: ignore[no-untyped-def]
        if b"boom" in body:
            raise RuntimeError("codec bug")
        return super().decode_request(body)


def _messages(count: int, prefix: str = "m") -> list[ev.Event]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index),
                       key=f"{prefix}{index}", role="user", user_id="u1", text="hello",
                       conversation_id="c1")
            for index in range(count)]


def _stored(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Message)).scalar_one()


def _wait_pending(recorder: Recorder) -> None:
    deadline = time.monotonic() + 30
    while recorder._writer_run.pending is None:
        assert time.monotonic() < deadline, "no batch became pending"
        time.sleep(0.01)


def _run(writer: ProcessWriter, events: list[ev.Event], batch_size: int = 4,
         **settings: float) -> RecorderStats:
    settings.setdefault("batch_interval_s", 0.01)
    recorder = Recorder(writer, RecorderSettings(batch_size=batch_size, **settings))
    recorder.start()
    try:
        for event in events:
            recorder.submit(event)
        assert recorder.flush(120)
        return recorder.stats()
    finally:
        recorder.stop(30)
        writer.close()


def _stop_while_pending(database_url: str, delay: float, spool: FileSpool | None = None,
                        kill: bool = False) -> Recorder:
    # Stops the recorder with a 0.2 s limit while the child writes its batch of 5 events
    # for ``delay`` seconds, then waits for the writer thread to end.
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, delay))
    writer.start()
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01),
                        spool=spool)
    recorder.start()
    thread = recorder._thread
    try:
        for event in _messages(5):
            recorder.submit(event)
        _wait_pending(recorder)
        assert recorder.stop(timeout=0.2) is False
        if kill:
            writer._process.kill()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        writer.close()
    return recorder


def test_stop_timeout_without_spool_counts_pending_batch(engine: Engine,
                                                          database_url: str) -> None:
    # The child is still writing the pending batch when stop() gives up. Without a spool,
    # the batch is counted once its result arrives: written when the child stored it.
    stats = _stop_while_pending(database_url, 1.5).stats()
    assert _stored(engine) == 5
    assert stats.written + stats.spooled + sum(stats.dropped.values()) == 5
    assert stats.written == 5


def test_stop_timeout_with_spool_spools_pending_batch(engine: Engine, database_url: str,
                                                       tmp_path) -> None:
    # With a spool the pending batch is spooled at the deadline and not counted again as
    # written when the child's late reply arrives.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    stats = _stop_while_pending(database_url, 1.5, spool).stats()
    assert stats.spooled == 5
    assert stats.written == 0
    assert spool.pending_events() == 5
    spool.close()


def _wait_until(condition, failure: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.005)


def _spooling_recorder(factory, tmp_path,  # type: ignore[no-untyped-def]
                       **settings: float) -> tuple[Recorder, ProcessWriter, FileSpool]:
    # A recorder with a spool and a started writer process, in batches of 5 events.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    writer = ProcessWriter(factory)
    writer.start()
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01,
                                                 **settings), spool=spool)
    return recorder, writer, spool


def _stop_timed_out(recorder: Recorder, timeout: float) -> None:
    # Stops the recorder with ``timeout``, which it misses, and waits for its writer thread.
    thread = recorder._thread
    assert recorder.stop(timeout=timeout) is False
    thread.join(30)
    assert not thread.is_alive()


def _assert_spooled_once(recorder: Recorder, spool: FileSpool, count: int) -> None:
    stats = recorder.stats()
    assert stats.spooled == count
    assert stats.written == 0
    assert sum(stats.dropped.values()) == 0
    assert spool.pending_events() == count
    spool.close()


def test_stop_timeout_settling_during_drain_counted_once(engine: Engine, database_url: str,
                                                         tmp_path) -> None:
    # The pending batch settles after stop() gave up but before it drained the queue: it
    # is counted once, as spooled, and the child stored it too.
    recorder, writer, spool = _spooling_recorder(
        functools.partial(_slow_writer, database_url, 0.6), tmp_path)
    drain = recorder._drain_nowait

    def drain_after_settle():  # type: ignore[no-untyped-def]
        _wait_until(lambda: recorder._writer_run.pending is None, "the pending batch never settled")
        return drain()

    recorder._drain_nowait = drain_after_settle  # type: ignore[method-assign]
    recorder.start()
    try:
        for event in _messages(5):
            recorder.submit(event)
        _wait_pending(recorder)
        _stop_timed_out(recorder, 0.2)
    finally:
        writer.close()
    assert _stored(engine) == 5
    _assert_spooled_once(recorder, spool, 5)


def test_stop_timeout_spools_batch_handed_over_while_settling(engine: Engine,
                                                              database_url: str,
                                                              tmp_path) -> None:
    # stop() gives up while the writer thread waits for the first batch's result with the
    # second batch already handed to the child: both batches are spooled, none counted twice.
    recorder, writer, spool = _spooling_recorder(
        functools.partial(_slow_writer, database_url, 0.8), tmp_path)
    # Both batches are queued before the writer thread starts, so it hands the second one
    # over before it waits for the first one's result.
    for event in _messages(5, "a") + _messages(5, "b"):
        assert recorder.submit(event)
    recorder.start()
    try:
        _wait_until(lambda: recorder._writer_run.following is not None,
                    "the second batch was not handed over")
        _stop_timed_out(recorder, 0.2)
    finally:
        writer.close()
    _assert_spooled_once(recorder, spool, 10)


def test_child_killed_with_batches_pending(engine: Engine, database_url: str) -> None:
    # The child dies while one batch is written and the next waits: both are written again
    # by a new child and counted once.
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, 0.5))
    writer.start()
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01))
    recorder.start()
    try:
        for event in _messages(5, "a"):
            recorder.submit(event)
        _wait_pending(recorder)
        for event in _messages(5, "b"):
            recorder.submit(event)
        time.sleep(0.2)
        writer._process.kill()
        assert recorder.flush(60)
        stats = recorder.stats()
    finally:
        recorder.stop(30)
        writer.close()
    assert _stored(engine) == 10
    assert stats.written == 10
    assert stats.dropped == {}


def test_child_timeout_with_batch_pending(engine: Engine, database_url: str) -> None:
    # A child slower than the time limit is killed; the retries then store everything once.
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, 0.6), timeout_s=0.3)
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01,
                                                 retries=2, retry_backoff_s=0.01))
    recorder.start()
    try:
        for event in _messages(10):
            recorder.submit(event)
        recorder.flush(60)
        stats = recorder.stats()
    finally:
        recorder.stop(30)
        writer.close()
    # Every write times out, so every event ends dropped after its retries, never written
    # and dropped at once.
    assert stats.written + sum(stats.dropped.values()) == 10
    assert stats.dropped.get("store_unavailable", 0) == 10 - stats.written


def test_poison_event_in_pending_batch_isolated(engine: Engine, database_url: str) -> None:
    stats = _run(ProcessWriter(functools.partial(_slow_writer, database_url, 0.0, "m3")),
                 _messages(12))
    assert _stored(engine) == 11
    assert stats.written == 11
    assert stats.dropped == {"write_error": 1}


def test_unpicklable_event_isolated_without_extra_events(engine: Engine,
                                                          database_url: str) -> None:
    # An event that cannot be pickled in the second chunk of a batch: the chunk before it
    # was sent already, and must not be written as part of the next batch.
    class Local(ev.Message):
        pass

    events = _messages(150)
    events[120] = Local(channel="web", occurred_at=T0, key="local", role="user",
                        user_id="u1", text="hello", conversation_id="c1")
    stats = _run(ProcessWriter(functools.partial(_slow_writer, database_url, 0.0)),
                 events + _messages(5, "z"), batch_size=150, batch_interval_s=1.0)
    assert _stored(engine) == 154
    assert stats.written == 154
    assert stats.dropped == {"write_error": 1}


def test_flush_returns_after_pending_batch_settled(engine: Engine, database_url: str) -> None:
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, 1.0))
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01))
    recorder.start()
    try:
        for event in _messages(5):
            recorder.submit(event)
        assert recorder.flush(60)
        stats = recorder.stats()
        stored = _stored(engine)
    finally:
        recorder.stop(30)
        writer.close()
    assert recorder._writer_run.pending is None
    assert stats.written == 5
    assert stored == 5


def test_stop_timeout_without_spool_counts_failed_pending_batch(engine: Engine,
                                                                 database_url: str) -> None:
    # The child dies after stop() gave up on its pending batch: the batch is counted as
    # dropped, since no spool took it and the thread does not write it again.
    stats = _stop_while_pending(database_url, 5.0, kill=True).stats()
    assert _stored(engine) == 0
    assert stats.written == 0
    assert stats.dropped == {"shutdown_timeout": 5}


def test_spool_replay_while_batch_pending(engine: Engine, database_url: str, tmp_path) -> None:
    # Events in the spool at start are replayed between live batches that are pending in
    # the child; each event is stored and counted once.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    assert spool.append(_messages(8, "s"))
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, 0.2))
    recorder = Recorder(writer, RecorderSettings(batch_size=4, batch_interval_s=0.01),
                        spool=spool)
    recorder.start()
    try:
        for event in _messages(8, "l"):
            recorder.submit(event)
        assert recorder.flush(60)
        stats = recorder.stats()
    finally:
        recorder.stop(30)
        writer.close()
        spool.close()
    assert _stored(engine) == 16
    assert stats.written == 16
    assert stats.replayed == 8
    assert stats.spooled == 0
    assert stats.dropped == {}


def _parent_only_class() -> type[ev.Message]:
    # A message class of a module that exists in this process only: the child cannot
    # unpickle it.
    import dataclasses
    import sys
    import types

    module = sys.modules.get("chatmw_parent_only")
    if module is None:
        module = types.ModuleType("chatmw_parent_only")

        @dataclasses.dataclass(frozen=True, slots=True)
        class ParentOnly(ev.Message):
            pass

        ParentOnly.__module__ = module.__name__
        ParentOnly.__qualname__ = "ParentOnly"
        module.ParentOnly = ParentOnly  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
    return module.ParentOnly  # type: ignore[no-any-return]


def test_event_child_cannot_unpickle_isolated(engine: Engine, database_url: str) -> None:
    # The child rejects the batch with the event it cannot read, so the recorder isolates
    # that event. The other events of its batch and the batches around it are stored.
    parent_only = _parent_only_class()
    events = _messages(10)
    events[6] = parent_only(channel="web", occurred_at=T0, key="parent-only", role="user",
                            user_id="u1", text="hello", conversation_id="c1")
    stats = _run(ProcessWriter(functools.partial(_slow_writer, database_url, 0.0)), events,
                 batch_size=5, retries=1, retry_backoff_s=0.01)
    assert _stored(engine) == 9
    assert stats.written == 9
    assert stats.dropped == {"write_error": 1}


def _sentiments(engine: Engine) -> dict[str, float | None]:
    with engine.connect() as connection:
        return dict(connection.execute(select(Message.key, Message.sentiment)).all())


def test_enricher_called_once_per_message(engine: Engine, database_url: str) -> None:
    # An enricher that returns a different value on a second call for the same message:
    # the stored value is the first call's, computed ahead of the write.
    stats = _run(ProcessWriter(functools.partial(_enriched_writer, database_url)),
                 _messages(12))
    assert stats.written == 12
    assert _sentiments(engine) == {f"m{index}": 0.1 for index in range(12)}


def test_enricher_raising_for_one_message(engine: Engine, database_url: str) -> None:
    # The enricher's error fails the write of its batch; the recorder isolates the message.
    stats = _run(ProcessWriter(functools.partial(_enriched_writer, database_url, "m5")),
                 _messages(12))
    assert stats.written == 11
    assert stats.dropped == {"write_error": 1}
    sentiments = _sentiments(engine)
    assert set(sentiments) == {f"m{index}" for index in range(12)} - {"m5"}
    assert all(value is not None for value in sentiments.values())


def _exchange(decoder: object, index: int, text: str) -> ev.Event:
    body = f'{{"user_id": "u1", "message": "{text}"}}'.encode()
    return captured_exchange("web", T0 + timedelta(seconds=index), f"asgi:p:{index}", decoder,
                             body, b'{"replies": []}', 200, 1.5, "complete", b"")


def test_exchange_whose_decoder_raises(engine: Engine, database_url: str) -> None:
    # A codec that raises for one exchange loses that exchange only, in a pipelined batch.
    decoder = ExchangeDecoder(_FaultyCodec(text_path="message", user_id_path="user_id"))
    events = [_exchange(decoder, index, "boom" if index == 3 else "hi") for index in range(10)]
    stats = _run(ProcessWriter(functools.partial(_slow_writer, database_url, 0.05)), events)
    assert stats.dropped == {}
    # Each decoded exchange is the user's message and the bot's status message.
    assert _stored(engine) == 18
    assert stats.written == 18
    with engine.connect() as connection:
        texts = connection.execute(select(Message.text)).scalars().all()
    assert "boom" not in texts
    assert texts.count("hi") == 9


def test_decoder_counts_exact_with_retries(engine: Engine, database_url: str) -> None:
    # Every batch fails once in the child before it is written: the webhook counters the
    # child sends back count each body once.
    from test_adapters_intake import BODY

    webhook_stats = WebhookStats()
    decoder = WebhookDecoder(frozenset({"app-7"}), webhook_stats)
    events = [captured_exchange("meta", T0 + timedelta(seconds=index), "", decoder, BODY, b"",
                                None, None, "complete", b"") for index in range(10)]
    writer = ProcessWriter(functools.partial(_slow_writer, database_url, 0.05, None, True))
    stats = _run(writer, events, retries=3, retry_backoff_s=0.01)
    assert stats.dropped == {}
    assert webhook_stats["events"] == 10
    # The ten bodies are one message.
    assert _stored(engine) == 1
