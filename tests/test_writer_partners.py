"""Partner writer processes: large batches split by user among several writer processes."""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from conftest import _empty_postgres
from sqlalchemy import Engine, func, select
from test_writer_reference import stored, traffic

from chatmw import events as ev
from chatmw.config import DEFAULT_PROCESSES, Settings, writer_processes
from chatmw.events_business import Spend
from chatmw.recorder import Recorder, RecorderSettings, RecorderStats
from chatmw.runtime import build_writer
from chatmw.store.models import Contact, Conversation, Message, RawPayload
from chatmw.writer_process import (
    SPLIT_MIN_BATCH,
    ProcessWriter,
    WriterSnapshot,
    _Preparer,
    split_by_user,
    start_process_writer,
)

T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
# The smallest batch the writer processes of these tests split (the default is larger).
SPLIT_MIN = 200


def _message(index: int, user: str, text: str = "hello", channel: str = "web") -> ev.Message:
    return ev.Message(channel=channel, occurred_at=T0 + timedelta(seconds=index),
                      key=f"k{index}", role="user" if index % 2 == 0 else "bot",
                      user_id=user, text=text)


def _part_of(user: str, count: int = 2, channel: str = "web") -> int:
    return zlib.crc32(f"{channel}\x00{user}".encode()) % count


def _users(count: int) -> list[str]:
    return [f"user{index}" for index in range(count)]


def _stored_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(select(Message.key)).scalars())


def _boom_enricher(message: ev.Message) -> dict[str, object]:
    # Rejects one message, as a bug in an enricher would.
    if message.text == "boom":
        raise ValueError("the enricher cannot score this message")
    return {}


def test_split_keeps_users_together() -> None:
    users = _users(12)
    events: list[ev.Event] = [_message(index, users[index % 12]) for index in range(SPLIT_MIN)]
    spend = Spend.for_day(date(2025, 6, 2), "web", Decimal("12.50"), "EUR")
    events[5:5] = [spend]

    parts = split_by_user(events, 3)

    assert parts is not None
    assert len(parts) == 3
    assert sorted(map(id, events)) == sorted(id(event) for part in parts for event in part)
    for index, part in enumerate(parts):
        for event in part:
            if isinstance(event, ev.Message):
                assert _part_of(event.user_id, 3) == index
    assert spend in parts[0]
    # Each part keeps the batch order.
    for part in parts:
        positions = [events.index(event) for event in part]
        assert positions == sorted(positions)
    # The users are spread over the parts.
    assert all(parts)


def test_split_same_user_same_part() -> None:
    # The same user gets the same part in every batch, and a user on another channel is
    # another contact, hashed on its own.
    first = [_message(index, f"user{index % 40}") for index in range(SPLIT_MIN)]
    second = [_message(index + 1000, f"user{index % 40}") for index in range(SPLIT_MIN)]

    first_parts = split_by_user(first, 2)
    second_parts = split_by_user(second, 2)

    assert first_parts is not None
    assert second_parts is not None
    for index in range(2):
        assert ({m.user_id for m in first_parts[index]}  # type: ignore[attr-defined]
                == {m.user_id for m in second_parts[index]})  # type: ignore[attr-defined]
    mixed = [_message(index, "ana", channel=("web", "whatsapp")[index % 2])
             for index in range(SPLIT_MIN)]
    mixed_parts = split_by_user(mixed, 7)
    assert mixed_parts is not None
    for channel in ("web", "whatsapp"):
        on_channel = [m for m in mixed if m.channel == channel]
        part = mixed_parts[_part_of("ana", 7, channel)]
        assert [m for m in part if m.channel == channel] == on_channel


def test_split_keeps_some_batches_whole() -> None:
    messages = [_message(index, f"user{index % 9}") for index in range(SPLIT_MIN)]
    userless = ev.Status(channel="whatsapp", occurred_at=T0, platform_message_id="wamid.1",
                         status="read")
    addressed = dataclasses.replace(userless, user_id="user3")

    raw = ev.RawPayload(channel="messenger", occurred_at=T0, source="webhook",
                        body=b'{"object": "page"}', reason="unknown object")

    assert split_by_user(messages, 1) is None
    assert split_by_user([*messages, userless], 2) is None
    # A raw payload has no key: a batch written again stores it again.
    assert split_by_user([*messages, raw], 2) is None
    # A conversation named by users of two parts, and by users of one part.
    apart = [dataclasses.replace(_message(index, user), conversation_id="group")
             for index, user in enumerate(("user0", "user4"))]
    together = [dataclasses.replace(_message(index, user), conversation_id="group")
                for index, user in enumerate(("user5", "user4"))]
    assert _part_of("user0") != _part_of("user4")
    assert _part_of("user5") == _part_of("user4")
    assert split_by_user([*messages, *apart], 2) is None
    assert split_by_user([*messages, *together], 2) is not None
    assert split_by_user([*messages, addressed], 2) is not None


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, DEFAULT_PROCESSES),
    ({"CHATMW_WRITER_PROCESSES": " 3 "}, 3),
    ({"CHATMW_WRITER_PROCESSES": "1"}, 1),
    ({"CHATMW_WRITER_PROCESSES": ""}, DEFAULT_PROCESSES),
])
def test_processes_setting_read(environ: dict[str, str], expected: int) -> None:
    assert writer_processes("postgresql", environ) == expected
    assert writer_processes("sqlite", environ) == 1


@pytest.mark.parametrize(("raw", "message"), [
    ("two", "must be an integer from 1 to 8, got 'two'"),
    ("0", "must be an integer from 1 to 8, got 0"),
    ("9", "must be an integer from 1 to 8, got 9"),
])
def test_processes_setting_invalid(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        writer_processes("postgresql", {"CHATMW_WRITER_PROCESSES": raw})


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_invalid_setting_keeps_default(database_url: str, engine: Engine,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CHATMW_WRITER_PROCESSES", "many")
    with caplog.at_level(logging.WARNING, logger="chatmw"):
        writer = start_process_writer(build_writer(Settings(sentiment=False), engine),
                                      database_url)
    assert writer is not None
    assert writer.processes == DEFAULT_PROCESSES
    assert "CHATMW_WRITER_PROCESSES must be an integer from 1 to 8, got 'many'" in caplog.text


def test_process_count_checked() -> None:
    with pytest.raises(ValueError, match="processes must be from 1 to 8, got 0"):
        ProcessWriter(WriterSnapshot(object()), processes=0)


def _write_in_batches(url: str, engine: Engine, batches: list[list[ev.Event]],
                      processes: int) -> dict[str, list[dict[str, object]]]:
    writer = ProcessWriter(WriterSnapshot(build_writer(Settings(sentiment=True), engine)),
                           processes=processes, split_min_batch=SPLIT_MIN)
    try:
        for batch in batches:
            assert writer.write(batch) == len(batch)
    finally:
        writer.close()
    return stored(engine)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_partners_store_same_rows(database_url: str, engine: Engine) -> None:
    # The reference traffic (duplicates, late messages, sessions, statuses, touches and
    # updates), with each status addressed to the user of its message, in batches large
    # enough to split: two processes store exactly the rows one process stores.
    events = [event for batch in traffic() for event in batch]
    users = {event.platform_message_id: event.user_id for event in events
             if isinstance(event, ev.Message) and event.platform_message_id}
    events = [dataclasses.replace(event, user_id=users[event.platform_message_id])
              if isinstance(event, ev.Status) else event for event in events]
    size = SPLIT_MIN + 50
    batches = [events[start:start + size] for start in range(0, len(events), size)]
    batches = [batch for batch in batches if len(batch) >= SPLIT_MIN]
    assert len(batches) >= 2
    for batch in batches:
        parts = split_by_user(batch, 2)
        assert parts is not None
        assert all(parts)

    single = _write_in_batches(database_url, engine, batches, 1)
    _empty_postgres(database_url)
    split = _write_in_batches(database_url, engine, batches, 2)

    assert sum(len(rows) for rows in single.values()) > 400
    for table in single:
        assert split[table] == single[table], table


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_lost_partner_batch_written_again(database_url: str, engine: Engine,
                                          caplog: pytest.LogCaptureFixture) -> None:
    # A partner killed between batches: the next batch fails as retryable, the recorder
    # writes it again through new processes, and every message is stored and counted once.
    writer = ProcessWriter(WriterSnapshot(build_writer(Settings(sentiment=False), engine)),
                           processes=2, split_min_batch=SPLIT_MIN)
    # A batch closes at its size, so that each one is large enough to split.
    recorder = Recorder(writer, RecorderSettings(batch_size=SPLIT_MIN + 100,
                                                 batch_interval_s=2.0,
                                                 retry_backoff_s=0.05))
    users = _users(30)
    first = [_message(index, users[index % 30]) for index in range(SPLIT_MIN + 100)]
    second = [_message(index + 10_000, users[index % 30])
              for index in range(SPLIT_MIN + 100)]
    recorder.start()
    try:
        for message in first:
            assert recorder.submit(message)
        assert recorder.flush(60)
        caplog.set_level(logging.WARNING, logger="chatmw")
        partner = writer._partners[0]
        partner.kill()
        partner.join()
        for message in second:
            assert recorder.submit(message)
        assert recorder.flush(60)
        stats = recorder.stats()
        restarted = writer._partners[0]
    finally:
        recorder.stop()
        writer.close()

    assert restarted is not partner
    # The writer process ended after its reply, and was started again with new partners.
    assert "writer process stopped" in caplog.text
    assert stats.written == len(first) + len(second)
    assert stats.dropped == {}
    assert _stored_keys(engine) == sorted(message.key for message in first + second)


def _record_with_rejecting_partner(engine: Engine, batch: list[ev.Event]) -> RecorderStats:
    # Records ``batch`` as one batch through two writer processes whose writers reject
    # a message saying "boom", and returns the recorder's counters once it is flushed.
    local = build_writer(Settings(sentiment=False), engine)
    local.enrichers.append(_boom_enricher)
    writer = ProcessWriter(WriterSnapshot(local), processes=2, split_min_batch=SPLIT_MIN)
    recorder = Recorder(writer, RecorderSettings(batch_size=len(batch), batch_interval_s=2.0))
    recorder.start()
    try:
        for event in batch:
            assert recorder.submit(event)
        assert recorder.flush(120)
        return recorder.stats()
    finally:
        recorder.stop()
        writer.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_rejected_event_in_partner_isolated(database_url: str, engine: Engine) -> None:
    # An event that the partner's writer rejects fails the whole batch as not retryable:
    # the recorder isolates that event, and every other event is stored once.
    users = _users(30)
    batch: list[ev.Event] = [_message(index, users[index % 30])
                             for index in range(SPLIT_MIN + 100)]
    bad = _message(99_999, next(user for user in users if _part_of(user) == 1), text="boom")
    batch.insert(17, bad)

    stats = _record_with_rejecting_partner(engine, batch)

    assert stats.written == len(batch) - 1
    assert sum(stats.dropped.values()) == 1
    assert _stored_keys(engine) == sorted(m.key for m in batch if m is not bad)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_close_stops_partners(database_url: str, engine: Engine) -> None:
    writer = ProcessWriter(WriterSnapshot(build_writer(Settings(sentiment=False), engine)),
                           processes=3, split_min_batch=SPLIT_MIN)
    batch = [_message(index, f"user{index % 50}") for index in range(SPLIT_MIN)]
    assert writer.write(batch) == len(batch)
    partners = list(writer._partners)
    child = writer._process
    assert len(partners) == 2
    assert all(partner.is_alive() for partner in partners)

    writer.close()

    assert not child.is_alive()
    assert not any(partner.is_alive() for partner in partners)
    assert writer._partners == []
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Message)).scalar_one() \
            == len(batch)


class _Decoded:
    # A writer whose batches contain no chat exchange to decode.
    def expand(self, batch: list[ev.Event]) -> list[ev.Event]:
        return batch


class _UnsendableLink:
    # A partner link whose part cannot be pickled.
    def send(self, part: object) -> None:
        raise TypeError("cannot pickle 'generator' object")


def test_unsendable_part_stays_with_writer(caplog: pytest.LogCaptureFixture) -> None:
    batch = [_message(index, f"user{index % 20}") for index in range(SPLIT_MIN)]
    preparer = _Preparer(_Decoded(), [_UnsendableLink()], SPLIT_MIN)  # type: ignore[list-item]

    with caplog.at_level(logging.WARNING, logger="chatmw"):
        received = preparer.prepare(list(batch))

    assert received.sent == []
    assert received.lost == ""
    assert received.own is not None
    assert sorted(m.key for m in received.own) == sorted(m.key for m in batch)  # type: ignore[attr-defined]
    assert "could not send to a partner" in caplog.text


class _RecordingLink:
    # A partner link that keeps the parts it is sent.
    def __init__(self) -> None:
        self.parts: list[list[ev.Event]] = []

    def send(self, part: list[ev.Event]) -> None:
        self.parts.append(part)


def test_small_batch_stays_with_writer() -> None:
    # Batches are split from SPLIT_MIN_BATCH items on, counted as the recorder sent them.
    link = _RecordingLink()
    preparer = _Preparer(_Decoded(), [link])  # type: ignore[list-item]
    users = [f"user{index % 20}" for index in range(SPLIT_MIN_BATCH)]
    small = [_message(index, user) for index, user in enumerate(users[:-1])]
    full = [_message(index, user) for index, user in enumerate(users)]

    whole = preparer.prepare(small)
    split = preparer.prepare(full)

    assert whole.own is None
    assert whole.sent == []
    assert split.own is not None
    assert split.sent == [link]
    assert len(link.parts) == 1
    assert len(split.own) + len(link.parts[0]) == SPLIT_MIN_BATCH


def _raw_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(RawPayload)).scalar_one()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_raw_payload_stored_once(database_url: str, engine: Engine) -> None:
    # A raw payload has no key, so a second write of it stores it again. The batch is
    # written again when any part fails: the part that contains the raw payload must not
    # have been stored on its own before.
    users = _users(30)
    partner_user = next(user for user in users if _part_of(user) == 1)
    batch: list[ev.Event] = [_message(index, users[index % 30])
                             for index in range(SPLIT_MIN + 98)]
    batch.insert(17, _message(99_999, partner_user, text="boom"))
    batch.insert(3, ev.RawPayload(channel="web", occurred_at=T0, source="webhook",
                                  body=b"not json", reason="unparseable"))

    stats = _record_with_rejecting_partner(engine, batch)

    assert sum(stats.dropped.values()) == 1
    assert stats.written == len(batch) - 1
    assert _raw_count(engine) == 1


def _slow_preprocessor(session: object, messages: list[ev.Message]) -> list[ev.Message]:
    # Delays the process whose batch contains a message saying "wait", before it writes.
    if any(message.text == "wait" for message in messages):
        time.sleep(1.5)
    return messages


def _group_owner(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return connection.execute(
            select(Contact.external_id).join(Conversation, Conversation.contact_id == Contact.id)
            .where(Conversation.external_id == "group")).scalar_one_or_none()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_shared_conversation_same_owner(database_url: str, engine: Engine) -> None:
    # A conversation that the source names and two users write in belongs to the first
    # user who wrote, as with one writer process, even when the process that writes the
    # other user's events gets to the conversation first.
    users = _users(40)
    first_user = next(user for user in users if _part_of(user) == 0)
    second_user = next(user for user in users if _part_of(user) == 1)
    batch: list[ev.Event] = [_message(index, users[index % 40]) for index in range(SPLIT_MIN)]
    batch[0] = dataclasses.replace(batch[0], user_id=first_user, text="wait")
    batch.append(ev.Message(channel="web", occurred_at=T0 + timedelta(hours=2), key="g1",
                            role="user", user_id=first_user, text="hi all",
                            conversation_id="group"))
    batch.append(ev.Message(channel="web", occurred_at=T0 + timedelta(hours=2, seconds=5),
                            key="g2", role="user", user_id=second_user, text="hello",
                            conversation_id="group"))
    owners = []
    for processes in (1, 2):
        _empty_postgres(database_url)
        local = build_writer(Settings(sentiment=False), engine)
        local.preprocessors.append(_slow_preprocessor)
        writer = ProcessWriter(WriterSnapshot(local), processes=processes,
                               split_min_batch=SPLIT_MIN)
        try:
            assert writer.write(batch) == len(batch)
        finally:
            writer.close()
        owners.append(_group_owner(engine))
    assert owners[0] == first_user
    assert owners[1] == first_user
