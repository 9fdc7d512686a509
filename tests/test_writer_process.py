"""ProcessWriter: the store writer in a child process, behind the recorder."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw.codecs import JsonCodec
from chatmw.exchange import Exchange, ExchangeDecoder, captured_exchange
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Conversation, Message
from chatmw.store.writer import Writer
from chatmw.writer_process import (
    _WRITE_BYTES,
    SEND_CHUNK,
    ProcessWriter,
    WriteRejected,
    _FrameReader,
    _Preparer,
    _receive_batch,
    _send_in_chunks,
    build_writer,
)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class _Failing:
    """A writer that raises ``error`` on every write (built in the child)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def write(self, batch: object) -> None:
        raise self.error


def _failing_writer(kind: str) -> _Failing:
    if kind == "retryable":
        return _Failing(OperationalError("INSERT", {}, Exception("database is locked")))
    return _Failing(ValueError("bad event"))


def _messages(count: int) -> list[ev.Event]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index), key=f"m{index}",
                       role="user" if index % 2 == 0 else "bot", user_id="u1", text="hello",
                       conversation_id="c1")
            for index in range(count)]


def _exchanges(count: int) -> list[ev.Event]:
    decoder = ExchangeDecoder(JsonCodec(text_path="message", user_id_path="user_id"))
    return [captured_exchange("web", T0 + timedelta(seconds=index), f"asgi:p:{index}", decoder,
                              b'{"user_id": "u1", "message": "hi"}', b'{"replies": []}',
                              200, 1.5 + index, "complete", b"")
            for index in range(count)]


def _migrated_sqlite(tmp_path) -> tuple[str, Engine]:
    """Return the URL of a new migrated SQLite file and an engine on it."""
    url = f"sqlite:///{tmp_path / 'chatmw.db'}"
    engine = make_engine(url)
    upgrade(engine)
    return url, engine


def _stored_messages(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Message)).scalar_one()


def test_batch_chunks_round_trip() -> None:
    # Exchanges and messages, over more than one chunk, come back equal and in order.
    exchanges = _exchanges(SEND_CHUNK + 30)
    batch = exchanges[:SEND_CHUNK] + _messages(3) + exchanges[SEND_CHUNK:]
    parent, child = multiprocessing.Pipe()
    try:
        _send_in_chunks(parent, batch)
        received = _receive_batch(child)
    finally:
        parent.close()
        child.close()

    assert received is not None
    assert len(received) == len(batch)
    assert [type(event) for event in received] == [type(event) for event in batch]
    assert received == batch
    first = received[0]
    assert isinstance(first, Exchange)
    assert first.latency_ms == 1.5
    assert first.decoder.codec == exchanges[0].decoder.codec  # type: ignore[attr-defined]


def test_unpicklable_batch_after_write_discarded() -> None:
    # The first chunks fill more than one group of writes, so they go out before the chunk
    # that cannot be pickled: the child drops them and then reads the next batch alone.
    class Local(ev.Message):
        pass

    # Distinct texts: pickle writes a repeated object once per chunk.
    first = [dataclasses.replace(message, text=f"{index} " + "x" * 1500)  # type: ignore[type-var]
             for index, message in enumerate(_messages(SEND_CHUNK * 2))]
    first.append(Local(channel="web", occurred_at=T0, key="local", role="user", user_id="u1",
                       text="hello", conversation_id="c1"))
    assert sum(len(message.text or "") for message in first[:SEND_CHUNK]) > _WRITE_BYTES
    following = _messages(3)
    parent, child = multiprocessing.Pipe()
    errors: list[Exception] = []

    def send() -> None:
        try:
            _send_in_chunks(parent, first)
        except Exception as error:  # noqa: BLE001 - checked below
            errors.append(error)
        _send_in_chunks(parent, following)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        received = _receive_batch(child)
    finally:
        sender.join(30)
        parent.close()
        child.close()

    assert len(errors) == 1
    assert received == following


def test_frame_reader_reads_grouped_frames() -> None:
    # Messages of Connection.send and of one write of several frames come back whole and
    # in order, small ones and one larger than a read. A closed pipe ends with EOFError.
    large = "y" * (_WRITE_BYTES * 3)
    parent, child = multiprocessing.Pipe()
    reader = _FrameReader(child)
    received: list[object] = []

    def read() -> None:
        received.extend([reader.recv(), reader.recv(), _receive_batch(reader), reader.recv()])
        try:
            received.append(reader.recv())
        except EOFError:
            received.append("end of pipe")

    thread = threading.Thread(target=read)
    thread.start()
    try:
        parent.send({"first": 1})
        parent.send(large)
        _send_in_chunks(parent, _messages(3))
        parent.send((True, False, "", 3, {}))
    finally:
        parent.close()
        thread.join(30)
        child.close()

    assert not thread.is_alive()
    assert received == [{"first": 1}, large, _messages(3), (True, False, "", 3, {}),
                        "end of pipe"]


def test_frame_reader_poll_waits() -> None:
    parent, child = multiprocessing.Pipe()
    reader = _FrameReader(child)
    try:
        assert not reader.poll(0.01)
        parent.send("one")
        parent.send("two")
        assert reader.poll(5)
        assert reader.recv() == "one"
        assert reader.poll(0)  # the second message came with the first read
        assert reader.recv() == "two"
        assert not reader.poll(0.01)
    finally:
        parent.close()
        child.close()


def test_receive_batch_ends_on_stop() -> None:
    parent, child = multiprocessing.Pipe()
    try:
        parent.send(None)
        assert _receive_batch(child) is None
        parent.close()
        assert _receive_batch(child) is None
    finally:
        child.close()


def test_process_writer_stores_through_recorder(engine: Engine, database_url: str) -> None:
    writer = ProcessWriter(functools.partial(build_writer, database_url, sentiment=True))
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.05))
    recorder.start()
    try:
        for event in _messages(6):
            assert recorder.submit(event)
        assert recorder.flush(60)
    finally:
        recorder.stop()
        writer.close()

    with engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(Message)).scalar_one()
        count = connection.execute(select(Conversation.message_count)).scalar_one()
        scored = connection.execute(
            select(func.count()).select_from(Message).where(Message.sentiment.is_not(None))
        ).scalar_one()
    assert stored == 6
    assert count == 6
    assert scored == 3


def test_process_writer_raises_retryable_as_operational() -> None:
    writer = ProcessWriter(functools.partial(_failing_writer, "retryable"))
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            writer.write(_messages(1))
    finally:
        writer.close()


def test_process_writer_raises_other_errors_as_rejected() -> None:
    writer = ProcessWriter(functools.partial(_failing_writer, "rejected"))
    try:
        with pytest.raises(WriteRejected, match="bad event"):
            writer.write(_messages(1))
    finally:
        writer.close()


def test_process_writer_restarts_dead_child(tmp_path) -> None:
    url, engine = _migrated_sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    try:
        writer.write(_messages(1))
        first = writer._process
        first.kill()
        first.join()
        writer.write(_messages(3))
        assert writer._process is not first
    finally:
        writer.close()
    assert _stored_messages(engine) == 3
    engine.dispose()


def test_process_writer_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ProcessWriter(functools.partial(build_writer, "sqlite://"), timeout_s=0)


def test_process_writer_answers_tickets_in_any_order(tmp_path) -> None:
    # Two batches handed over before either result is read; the results are read in the
    # opposite order and each one reports its own batch.
    url, engine = _migrated_sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    try:
        first = writer.submit(_messages(2))
        second = writer.submit(_messages(5))
        assert writer.result(second) == 5
        assert writer.result(first) == 2
        with pytest.raises(OperationalError, match="stopped before writing"):
            writer.result(first)
    finally:
        writer.close()
    assert _stored_messages(engine) == 5
    engine.dispose()


class _StallingWriter:
    """The standard writer, except that a batch with a message keyed ``stall`` waits 60 s."""

    def __init__(self, database_url: str) -> None:
        self.writer = build_writer(database_url, sentiment=False)

    def write(self, batch: list[ev.Event]) -> int:
        if any(getattr(event, "key", None) == "stall" for event in batch):
            time.sleep(60)
        return self.writer.write(batch)


def test_process_writer_fails_pending_tickets_of_dead_child(tmp_path) -> None:
    url, engine = _migrated_sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(_StallingWriter, url))
    try:
        writer.write(_messages(1))
        stalling = [dataclasses.replace(_messages(1)[0], key="stall")]
        tickets = [writer.submit(stalling + _messages(3)), writer.submit(_messages(4))]
        # The child is inside the first pending write, which it cannot finish.
        time.sleep(0.5)
        writer._process.kill()
        for ticket in tickets:
            with pytest.raises(OperationalError):
                writer.result(ticket)
        # The next hand-over starts a new child, whose tickets work.
        assert writer.result(writer.submit(_messages(6))) == 6
    finally:
        writer.close()
    assert _stored_messages(engine) == 6
    engine.dispose()


class _CountingEnricher:
    """Scores a user message by the length of its text and counts its calls."""

    def __init__(self, failing_key: str | None = None) -> None:
        self.calls: list[str] = []
        self.failing_key = failing_key

    def __call__(self, message: ev.Message) -> dict[str, float]:
        self.calls.append(message.key)
        if message.key == self.failing_key:
            raise ValueError("enricher failed")
        if message.role != "user":
            return {}
        return {"sentiment": len(message.text or "") / 100}


def _stored_sentiments(engine: Engine) -> dict[str, float | None]:
    with engine.connect() as connection:
        return dict(connection.execute(select(Message.key, Message.sentiment)).all())


def test_prepare_decodes_without_enriching(engine: Engine) -> None:
    # The inbox decodes the exchanges ahead; the enricher runs once per message, in the write.
    writer = Writer(engine)
    enricher = _CountingEnricher()
    writer.enrichers.append(enricher)
    received = _Preparer(writer).prepare(_messages(4) + _exchanges(2))

    assert enricher.calls == []
    assert len(received.events) == 8
    assert writer.write(received.events) == 8
    assert len(enricher.calls) == 8
    assert len(set(enricher.calls)) == 8
    sentiments = _stored_sentiments(engine)
    assert sentiments["m0"] == len("hello") / 100
    assert sentiments["m1"] is None
    assert len(sentiments) == 8


def test_replaced_message_enriched_as_replaced(engine: Engine) -> None:
    # A preprocessor that replaces a message object gets the enricher's result for the new
    # object.
    def longer_text(session: object, messages: list[ev.Message]) -> list[ev.Message]:
        return [dataclasses.replace(message, text="hello again") if message.key == "m0"
                else message for message in messages]

    writer = Writer(engine)
    enricher = _CountingEnricher()
    writer.enrichers.append(enricher)
    writer.preprocessors.append(longer_text)
    received = _Preparer(writer).prepare(_messages(2))
    writer.write(received.events)

    assert enricher.calls == ["m0", "m1"]
    assert _stored_sentiments(engine)["m0"] == len("hello again") / 100


def test_enricher_error_fails_write(engine: Engine) -> None:
    writer = Writer(engine)
    writer.enrichers.append(_CountingEnricher(failing_key="m1"))
    received = _Preparer(writer).prepare(_messages(3))
    with pytest.raises(ValueError, match="enricher failed"):
        writer.write(received.events)
    assert _stored_sentiments(engine) == {}
