"""The batch pipe to the writer process: framing, groups of writes and the frame reader."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import pickle
import signal
import struct
import threading
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.reduction import ForkingPickler

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw.codecs import JsonCodec
from chatmw.exchange import ExchangeDecoder, captured_exchange
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.store.engine import make_engine
from chatmw.store.models import Message
from chatmw.writer_process import (
    _EVENT_ROWS,
    _WRITE_BYTES,
    SEND_CHUNK,
    ProcessWriter,
    _event_rows,
    _frame,
    _FrameReader,
    _receive_batch,
    _send_in_chunks,
    build_writer,
)

T0 = datetime(2025, 4, 1, 8, 0, tzinfo=UTC)
MIB = 1024 * 1024


def _messages(count: int, prefix: str = "m", text: str = "hello",
              user: str = "u1") -> list[ev.Event]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index),
                       key=f"{prefix}{index}", role="user", user_id=user,
                       text=f"{index} {text}", conversation_id=f"c-{user}")
            for index in range(count)]


def _exchanges(count: int, prefix: str = "x") -> list[ev.Event]:
    decoder = ExchangeDecoder(JsonCodec(text_path="message", user_id_path="user_id"))
    return [captured_exchange("web", T0 + timedelta(seconds=index), f"asgi:{prefix}:{index}",
                              decoder, b'{"user_id": "u2", "message": "hi"}',
                              b'{"replies": []}', 200, 1.5, "complete", b"")
            for index in range(count)]


def _unpicklable(key: str = "bad") -> ev.Event:
    # A class local to a function cannot be pickled.
    class Unpicklable(ev.Message):
        pass

    return Unpicklable(channel="web", occurred_at=T0, key=key, role="user", user_id="u1",
                       text="hello", conversation_id="c-u1")


def _stored(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Message)).scalar_one()


def _keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(select(Message.key)).scalars())


def _exchange(batches: list[list[ev.Event]]) -> tuple[list[object], list[object]]:
    # Sends each batch with _send_in_chunks in a thread while this thread receives them
    # with _receive_batch on a _FrameReader. Returns the batches received and the errors
    # of the sends (None for a batch sent whole).
    parent, child = multiprocessing.Pipe()
    reader = _FrameReader(child)
    errors: list[object] = []

    def send() -> None:
        for batch in batches:
            try:
                _send_in_chunks(parent, batch)
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - checked by the caller
                errors.append(error)
        parent.send(None)

    sender = threading.Thread(target=send)
    sender.start()
    received: list[object] = []
    try:
        while True:
            batch = _receive_batch(reader)
            if batch is None:
                break
            received.append(batch)
    finally:
        sender.join(60)
        parent.close()
        child.close()
    return received, errors


def _chunk_frame_size(chunk: list[ev.Event]) -> int:
    # The size of the frame _send_in_chunks writes for ``chunk``.
    rows = _event_rows(chunk)
    message = list(chunk) if rows is None else (_EVENT_ROWS, rows)
    return len(_frame(ForkingPickler.dumps(message)))


def _sized_chunk(size: int) -> list[ev.Event]:
    # A chunk of SEND_CHUNK messages whose frame is ``size`` bytes.
    chunk = _messages(SEND_CHUNK, "e", "p" * 300)
    for _ in range(5):
        grow = size - _chunk_frame_size(chunk)
        last = chunk[-1]
        chunk[-1] = dataclasses.replace(last, text=last.text + "q" * grow)  # type: ignore
    return chunk


# The pipe alone: a sending thread and a receiving one.


def test_pipe_huge_text() -> None:
    # One event larger than a read, than a group and than the socket pair's buffer.
    events = _messages(3) + _messages(1, "big", "z" * (6 * MIB)) + _messages(250, "n")
    received, errors = _exchange([events, _messages(2, "after")])
    assert errors == [None, None]
    assert received == [events, _messages(2, "after")]


def test_pipe_many_huge_events() -> None:
    events = [_messages(1, f"big{index}", chr(97 + index) * (3 * MIB))[0]
              for index in range(4)]
    received, _ = _exchange([events])
    assert received == [events]


def test_pipe_group_boundary_exact() -> None:
    # The first chunk's frame is exactly a group's size, so it is written alone.
    chunk = _sized_chunk(_WRITE_BYTES)
    assert _chunk_frame_size(chunk) == _WRITE_BYTES
    events = chunk + _messages(SEND_CHUNK, "f")
    received, errors = _exchange([events, chunk, chunk[:1]])
    assert errors == [None, None, None]
    assert received == [events, chunk, chunk[:1]]


def test_pipe_group_boundary_minus_one() -> None:
    chunk = _sized_chunk(_WRITE_BYTES - 1)
    assert _chunk_frame_size(chunk) == _WRITE_BYTES - 1
    events = chunk + _messages(SEND_CHUNK, "f")
    received, _ = _exchange([events])
    assert received == [events]


@pytest.mark.parametrize("position", [0, 99, 100, 250, 399])
def test_pipe_unpicklable_position(position: int) -> None:
    # Large texts make each chunk a group of its own. The next batch arrives alone.
    events = _messages(400, "b", "w" * 1000)
    events[position] = _unpicklable()
    following = _messages(3, "after")
    received, errors = _exchange([events, following])
    assert isinstance(errors[0], Exception)
    assert received == [following]


@pytest.mark.parametrize("position", [0, 150, 299])
def test_pipe_unpicklable_small_batch(position: int) -> None:
    # Nothing was written before the failing chunk: no discard frame is needed.
    events = _messages(300, "s")
    events[position] = _unpicklable()
    received, errors = _exchange([events, _messages(2, "after")])
    assert errors[1] is None
    assert received == [_messages(2, "after")]


def test_pipe_unpicklable_after_huge() -> None:
    events = _messages(1, "big", "h" * (3 * MIB)) + _messages(150, "r")
    events[120] = _unpicklable()
    received, _ = _exchange([events, _messages(1, "after")])
    assert received == [_messages(1, "after")]


def test_pipe_mixed_exchanges() -> None:
    events: list[ev.Event] = []
    for index in range(5):
        events += _messages(70, f"m{index}-", "t" * 500) + _exchanges(60, f"x{index}")
    received, _ = _exchange([events, _exchanges(1, "solo")])
    assert len(received) == 2
    assert [getattr(e, "key", None) for e in received[0]] == [  # type: ignore[union-attr]
        getattr(e, "key", None) for e in events]
    assert [e.request for e in received[0][70:130]] == [  # type: ignore[index, union-attr]
        e.request for e in events[70:130]]  # type: ignore[attr-defined]


def test_pipe_empty_batch() -> None:
    received, _ = _exchange([[], _messages(1)])
    assert received == [[], _messages(1)]


# The frame reader on hand-made bytes.


def _raw_pipe() -> tuple[multiprocessing.connection.Connection, _FrameReader, int]:
    parent, child = multiprocessing.Pipe()
    return parent, _FrameReader(child), parent.fileno()


def test_reader_large_header() -> None:
    # The -1 header with an 8-byte size, as Connection sends a message over 2 GiB.
    parent, reader, descriptor = _raw_pipe()
    payload = pickle.dumps({"big": "header"})
    os.write(descriptor, struct.pack("!iQ", -1, len(payload)) + payload)
    parent.send("next")
    assert reader.recv() == {"big": "header"}
    assert reader.recv() == "next"


def test_reader_byte_by_byte() -> None:
    # The headers (both kinds) and bodies come one byte per write.
    parent, reader, descriptor = _raw_pipe()
    first = pickle.dumps("first")
    second = pickle.dumps(list(range(50)))
    data = struct.pack("!iQ", -1, len(first)) + first + struct.pack("!i", len(second)) + second

    def trickle() -> None:
        for byte in data:
            os.write(descriptor, bytes([byte]))
            time.sleep(0.001)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        assert reader.recv() == "first"
        assert reader.recv() == list(range(50))
    finally:
        thread.join(30)


def test_reader_eof_mid_body() -> None:
    parent, reader, descriptor = _raw_pipe()
    payload = pickle.dumps("x" * 1000)
    os.write(descriptor, struct.pack("!i", len(payload)) + payload[:100])
    parent.close()
    with pytest.raises(EOFError):
        reader.recv()


def test_reader_eof_mid_header() -> None:
    parent, reader, descriptor = _raw_pipe()
    os.write(descriptor, struct.pack("!iQ", -1, 10)[:6])
    parent.close()
    with pytest.raises(EOFError):
        reader.recv()


def test_reader_poll_partial_message() -> None:
    # The reader buffered the start of the second message with the first one.
    parent, reader, descriptor = _raw_pipe()
    first = pickle.dumps("one")
    second = pickle.dumps("two" * 100)
    os.write(descriptor, struct.pack("!i", len(first)) + first
             + struct.pack("!i", len(second)) + second[:10])
    assert reader.recv() == "one"
    assert reader.poll(0) is True
    os.write(descriptor, second[10:])
    assert reader.recv() == "two" * 100


def test_reader_unpickling_error_skipped() -> None:
    # A message that cannot be unpickled is consumed whole, so the next one reads fine.
    parent, reader, descriptor = _raw_pipe()
    junk = b"\x80\x05not a pickle"
    os.write(descriptor, struct.pack("!i", len(junk)) + junk)
    parent.send("after")
    with pytest.raises(Exception):  # noqa: B017,PT011 - any unpickling error
        reader.recv()
    assert reader.recv() == "after"


def test_frame_large_size_header() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 0x80000000

    frame = _frame(Huge(b"abc"))
    assert frame[:12] == struct.pack("!iQ", -1, 0x80000000)


def test_frame_limit_size_header() -> None:
    class Limit(bytes):
        def __len__(self) -> int:
            return 0x7FFFFFFF

    frame = _frame(Limit(b"abc"))
    assert frame[:4] == struct.pack("!i", 0x7FFFFFFF)


# A real child writer process on SQLite.


def _sqlite(tmp_path) -> tuple[str, Engine]:
    from chatmw.store.engine import upgrade

    url = f"sqlite:///{tmp_path / 'pipe.db'}"
    engine = make_engine(url)
    upgrade(engine)
    return url, engine


def test_child_huge_text_stored(tmp_path) -> None:
    url, engine = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    events = _messages(1, "big", "k" * (5 * MIB)) + _messages(300, "n", "v" * 300)
    try:
        assert writer.write(events) == 301
        assert writer.write(_messages(1, "after")) == 1
    finally:
        writer.close()
    assert _stored(engine) == 302


def test_child_killed_mid_send(tmp_path) -> None:
    # The child dies while the parent writes a batch larger than the pipe.
    url, engine = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    writer.start()
    events = _messages(50, "big", "k" * (MIB // 2))
    pid = writer._process.pid
    killer = threading.Timer(0.05, os.kill, (pid, signal.SIGKILL))
    killer.start()
    try:
        written: int | None
        try:
            written = writer.result(writer.submit(events))
        except OperationalError:
            written = None
        killer.join()
        assert writer.write(_messages(2, "after")) == 2
    finally:
        writer.close()
    # The batch is stored whole when its write ended before the kill, otherwise not at all.
    expected = 2 if written is None else 52
    assert _stored(engine) == expected


def test_child_killed_before_reply(tmp_path) -> None:
    url, engine = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    try:
        ticket = writer.submit(_messages(5))
        writer.result(ticket)
        ticket = writer.submit(_messages(1, "big", "k" * (3 * MIB)))
        os.kill(writer._process.pid, signal.SIGKILL)
        with pytest.raises(OperationalError):
            writer.result(ticket)
        assert writer.write(_messages(3, "after")) == 3
    finally:
        writer.close()
    # The large message is stored when the child wrote it before the kill.
    assert _stored(engine) in (8, 9)


def test_child_replies_together(tmp_path) -> None:
    # Several batches are sent before any reply is read: the replies come in one read.
    url, engine = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    try:
        tickets = [writer.submit(_messages(index + 1, f"b{index}-")) for index in range(40)]
        time.sleep(1.0)
        results = [writer.result(ticket) for ticket in reversed(tickets)]
    finally:
        writer.close()
    assert results == list(range(40, 0, -1))
    assert _stored(engine) == sum(range(41))


def test_close_with_batch_in_flight(tmp_path) -> None:
    url, engine = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False))
    ticket = writer.submit(_messages(1, "big", "k" * (4 * MIB)) + _messages(10))
    writer.close()
    with pytest.raises(OperationalError):
        writer.result(ticket)
    try:
        assert writer.write(_messages(2, "after")) == 2
    finally:
        writer.close()
    assert _stored(engine) in (2, 13)


# The recorder with a writer process.


def _traffic(count: int) -> list[ev.Event]:
    events: list[ev.Event] = []
    for index in range(count):
        if index % 97 == 0:
            events += _messages(1, f"big{index}-", "g" * (MIB + index))
        elif index % 5 == 0:
            events += _exchanges(1, f"x{index}")
        else:
            events += _messages(1, f"k{index}-", "t" * (index % 700), user=f"u{index % 23}")
    return events


def _record(writer: ProcessWriter, events: list[ev.Event], batch_size: int):
    recorder = Recorder(writer, RecorderSettings(batch_size=batch_size, batch_interval_s=0.05))
    recorder.start()
    try:
        for event in events:
            while not recorder.submit(event):
                time.sleep(0.01)
        assert recorder.flush(180)
        return recorder.stats()
    finally:
        recorder.stop(30)
        writer.close()


def test_recorder_sqlite_once(tmp_path) -> None:
    url, engine = _sqlite(tmp_path)
    events = _traffic(3000)
    stats = _record(ProcessWriter(functools.partial(build_writer, url, sentiment=False)),
                    events, 400)
    assert stats.dropped == {}
    assert stats.submitted == 3000
    # Each of the 593 exchanges is decoded into two messages: the request and a reply.
    assert stats.written == 3000 + 593
    assert _stored(engine) == 3000 + 593


def test_recorder_unpicklable_once(tmp_path) -> None:
    url, engine = _sqlite(tmp_path)
    events = _messages(900, "p", "w" * 800)
    for position in (5, 450, 899):
        events[position] = _unpicklable(f"bad{position}")
    stats = _record(ProcessWriter(functools.partial(build_writer, url, sentiment=False)),
                    events + _messages(10, "z"), 900)
    assert stats.dropped == {"write_error": 3}
    assert stats.written == 907
    assert _stored(engine) == 907


def test_recorder_postgres_partners(postgres_url: str) -> None:
    # Large batches split among three writer processes, with texts larger than the pipe.
    from conftest import _empty_postgres

    _empty_postgres(postgres_url)
    engine = make_engine(postgres_url)
    events = _traffic(3000)
    events[1001] = _unpicklable("bad1001")
    writer = ProcessWriter(functools.partial(build_writer, postgres_url, sentiment=False),
                           processes=3, split_min_batch=200)
    try:
        stats = _record(writer, events, 500)
        stored = _stored(engine)
    finally:
        engine.dispose()
    assert stats.dropped == {"write_error": 1}
    assert stats.written == 2999 + 593
    assert stored == 2999 + 593


def test_partner_killed_mid_part(postgres_url: str) -> None:
    # A partner dies while the writer process sends it a part larger than the pipe: the
    # recorder writes the batch again, and every message is stored and counted once.
    from conftest import _empty_postgres

    _empty_postgres(postgres_url)
    engine = make_engine(postgres_url)
    writer = ProcessWriter(functools.partial(build_writer, postgres_url, sentiment=False),
                           processes=2, split_min_batch=200)
    writer.start()
    partner = writer._partners[0]
    events: list[ev.Event] = []
    for user in range(30):
        events += _messages(20, f"u{user}-", "s" * 50_000, user=f"user{user}")
    recorder = Recorder(writer, RecorderSettings(batch_size=600, batch_interval_s=2.0,
                                                 retry_backoff_s=0.05))
    recorder.start()
    try:
        for event in events:
            assert recorder.submit(event)
        time.sleep(0.05)
        partner.kill()
        assert recorder.flush(120)
        stats = recorder.stats()
        stored = _keys(engine)
    finally:
        recorder.stop(30)
        writer.close()
        engine.dispose()
    assert stats.dropped == {}
    assert stats.written == 600
    assert stored == sorted(event.key for event in events)  # type: ignore[attr-defined]
