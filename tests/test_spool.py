"""The file spool, and the recorder's use of it, against real files."""

from __future__ import annotations

import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from spool_helpers import PipelinedWriter, SwitchableWriter, wait_for

from chatmw import events as ev
from chatmw.recorder import HEALTHY, REPLAYING, SPOOLING, Recorder, RecorderSettings
from chatmw.spool import (
    FileSpool,
    SpoolLockedError,
    SpoolSettings,
    decode_event,
    encode_event,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["direct", "pipelined"])
def new_writer(request: pytest.FixtureRequest) -> type[SwitchableWriter]:
    """The in-memory writer: written directly, or pipelined as a writer process is."""
    return PipelinedWriter if request.param == "pipelined" else SwitchableWriter


def message(key: str, seconds: float = 0, **fields) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=seconds), key=key,
                      role="user", user_id="u1", text=f"text {key}", **fields)


def open_spool(directory: Path, **settings) -> FileSpool:
    return FileSpool(SpoolSettings(directory=directory, **settings))


def replay_all(spool: FileSpool) -> list[ev.Event]:
    events: list[ev.Event] = []
    while (chunk := spool.read_next(1000)) is not None:
        events.extend(chunk.events)
        spool.commit(chunk)
    return events


# Encoding


def test_every_event_type_round_trips() -> None:
    berlin = datetime(2024, 3, 31, 1, 59, 59, 123456, tzinfo=ZoneInfo("Europe/Berlin"))
    samples: list[ev.Event] = [
        message("m1", meta={"$": "not a tag", "nested": {"list": [1, 2.5, None, True]}},
                attributes={"plan": "pro"}, latency_ms=12.5),
        ev.Message(channel="web", occurred_at=berlin, key="m2", role="bot", user_id="u1"),
        ev.Status(channel="whatsapp", occurred_at=T0, platform_message_id="wamid.1",
                  status="read", error_code=None),
        ev.Touch(channel="web", occurred_at=T0, key="t1", user_id="u1", campaign="spring",
                 meta={"tuple": (1, "a")}),
        ev.ConversationUpdate(channel="web", occurred_at=T0, user_id="u1", ended=True,
                              resolved=False, attributes={"a": "b"}),
        ev.Exposure(channel="web", occurred_at=T0, key="x1", user_id="u1", kind="open"),
        ev.RawPayload(channel="messenger", occurred_at=T0, source="webhook",
                      body=b"\x00\xff{not json", reason="invalid JSON"),
    ]
    for event in samples:
        decoded = decode_event(encode_event(event))
        assert decoded == event
        assert type(decoded) is type(event)
        assert decoded.occurred_at.utcoffset() == event.occurred_at.utcoffset()
    assert decode_event(encode_event(samples[1])).occurred_at.tzinfo == ZoneInfo("Europe/Berlin")


def test_unknown_value_type_rejected() -> None:
    with pytest.raises(TypeError, match="cannot spool a value of type set"):
        encode_event(message("m1", meta={"tags": {"a"}}))


# Files


def test_batches_replay_in_order_across_segments(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_bytes=600)
    for index in range(20):
        assert spool.append([message(f"m{index:02d}")])
    assert len(list(tmp_path.glob("segment-*.log"))) > 3
    assert spool.pending_events() == 20

    replayed = replay_all(spool)

    assert [e.key for e in replayed] == [f"m{index:02d}" for index in range(20)]  # type: ignore[attr-defined]
    assert spool.pending_events() == 0
    assert list(tmp_path.glob("segment-*")) == []
    assert spool.stats().replayed_events == 20


def test_read_next_respects_max_events(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([message("a"), message("b")])
    spool.append([message("c"), message("d")])
    spool.append([message("e")])
    first = spool.read_next(3)
    assert first is not None
    assert [e.key for e in first.events] == ["a", "b"]  # type: ignore[attr-defined]
    spool.commit(first)
    second = spool.read_next(3)
    assert second is not None
    assert [e.key for e in second.events] == ["c", "d", "e"]  # type: ignore[attr-defined]


def test_reopened_spool_resumes_after_committed_chunk(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([message("a")])
    spool.append([message("b")])
    chunk = spool.read_next(1)
    assert chunk is not None
    spool.commit(chunk)
    spool.close()

    reopened = open_spool(tmp_path)
    assert reopened.pending_events() == 1
    assert [e.key for e in replay_all(reopened)] == ["b"]  # type: ignore[attr-defined]
    reopened.append([message("c")])
    assert [e.key for e in replay_all(reopened)] == ["c"]  # type: ignore[attr-defined]


def test_torn_last_record_ignored(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([message("a")])
    spool.close()
    segment = next(tmp_path.glob("segment-*.log"))
    with open(segment, "ab") as handle:
        handle.write(b"0badc0de {\"at\": 1, \"events\": [")  # a crash in the middle of a write

    reopened = open_spool(tmp_path)

    assert reopened.pending_events() == 1
    assert [e.key for e in replay_all(reopened)] == ["a"]  # type: ignore[attr-defined]


def test_corrupt_record_rejected_alone(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([message("a")])
    spool.append([message("b")])
    spool.append([message("c")])
    spool.close()
    segment = next(tmp_path.glob("segment-*.log"))
    segment.write_bytes(segment.read_bytes().replace(b"text b", b"text X"))

    reopened = open_spool(tmp_path)
    assert reopened.pending_events() == 2
    first = reopened.read_next(10)
    assert first is not None
    assert [e.key for e in first.events] == ["a"]  # type: ignore[attr-defined]
    reopened.commit(first)
    corrupt = reopened.read_next(10)
    assert corrupt is not None
    assert corrupt.error == "checksum mismatch"
    reopened.reject(corrupt, "test")

    assert [e.key for e in replay_all(reopened)] == ["c"]  # type: ignore[attr-defined]
    assert b"text X" in (tmp_path / "rejected.log").read_bytes()


def test_full_spool_rejects_append(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=2000)
    accepted = sum(spool.append([message(f"m{index}")]) for index in range(20))
    stats = spool.stats()
    assert 0 < accepted < 20
    assert stats.full_rejections == 20 - accepted
    assert stats.pending_bytes <= 2000
    assert stats.pending_events == accepted


def test_settings_from_environment() -> None:
    assert SpoolSettings.from_env({}) is None
    settings = SpoolSettings.from_env({"CHATMW_SPOOL_DIR": "/var/spool/chatmw",
                                       "CHATMW_SPOOL_MAX_BYTES": "1000"})
    assert settings is not None
    assert str(settings.directory) == "/var/spool/chatmw"
    assert settings.max_bytes == 1000
    with pytest.raises(ValueError, match="CHATMW_SPOOL_MAX_BYTES must be a whole number"):
        SpoolSettings.from_env({"CHATMW_SPOOL_DIR": "x", "CHATMW_SPOOL_MAX_BYTES": "1G"})


def test_second_process_cannot_open_directory(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    with pytest.raises(SpoolLockedError, match="in use by another process"):
        open_spool(tmp_path)
    spool.close()
    open_spool(tmp_path).close()


def test_files_private_to_owner(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = open_spool(directory)
    spool.append([message("a")])
    assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0
    segment = next(directory.glob("segment-*.log"))
    assert stat.S_IMODE(os.stat(segment).st_mode) == 0o600


def test_undecodable_batch_rejected_alone(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([message("a")])
    spool.append([message("b")])
    spool.close()
    segment = next(tmp_path.glob("segment-*.log"))
    lines = segment.read_bytes().splitlines(keepends=True)
    # Rewrite the first record with a valid checksum but an unknown event type.
    import zlib

    body = lines[0][9:-1].replace(b"chatmw.events:Message", b"chatmw.events:Gone")
    lines[0] = b"%08x %s\n" % (zlib.crc32(body), body)
    segment.write_bytes(b"".join(lines))

    reopened = open_spool(tmp_path)
    bad = reopened.read_next(10)
    assert bad is not None
    assert bad.error is not None
    assert "Gone" in bad.error
    reopened.reject(bad, "test")
    assert [e.key for e in replay_all(reopened)] == ["b"]  # type: ignore[attr-defined]
    assert b"chatmw.events:Gone" in (tmp_path / "rejected.log").read_bytes()
    assert reopened.stats().rejected_events == 0 + len(bad.events)


def test_oldest_age_tracks_first_pending(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    assert spool.stats().oldest_age_seconds is None
    spool.append([message("a")])
    time.sleep(0.05)
    age = spool.stats().oldest_age_seconds
    assert age is not None
    assert age >= 0.05
    replay_all(spool)
    assert spool.stats().oldest_age_seconds is None


# Recorder with a spool, with a writer that can be switched off


FAST = RecorderSettings(batch_interval_s=0.01, retries=1, retry_backoff_s=0.01,
                        probe_interval_s=0.05, flush_timeout_s=5.0)


def test_recorder_spools_while_down_then_replays(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    spool = open_spool(tmp_path)
    recorder = Recorder(writer, FAST, spool=spool)
    recorder.start()
    recorder.submit(message("m0"))
    assert recorder.flush(5)

    writer.down.set()
    for index in range(1, 50):
        recorder.submit(message(f"m{index}"))
    assert recorder.flush(5)
    assert recorder.state == SPOOLING
    assert spool.pending_events() == 49

    writer.down.clear()
    assert wait_for(lambda: recorder.state == HEALTHY)
    assert recorder.flush(5)
    assert writer.keys() == [f"m{index}" for index in range(50)]
    stats = recorder.stats()
    assert stats.written == 50
    assert stats.replayed == 49
    assert stats.dropped == {}
    assert stats.state_changes == {SPOOLING: 1, REPLAYING: 1, HEALTHY: 1}
    assert recorder.stop()


def test_full_queue_overflows_to_spool(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    writer.delay = 0.02
    spool = open_spool(tmp_path)
    settings = RecorderSettings(queue_size=5, batch_size=5, batch_interval_s=0.01,
                                overflow_size=1000)
    recorder = Recorder(writer, settings, spool=spool)
    recorder.start()

    started = time.perf_counter()
    accepted = [recorder.submit(message(f"m{index:03d}")) for index in range(300)]
    elapsed = time.perf_counter() - started

    assert all(accepted)
    assert elapsed < 0.5  # writing them through the queue alone would take 60 x 20 ms
    assert recorder.flush(10)
    assert sorted(writer.keys()) == [f"m{index:03d}" for index in range(300)]
    assert recorder.stats().dropped == {}
    assert recorder.stats().spooled > 0
    assert recorder.stop()


def test_durable_submit_on_disk_before_return(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    writer.down.set()
    spool = open_spool(tmp_path)
    recorder = Recorder(writer, FAST, spool=spool)
    recorder.start()

    assert recorder.submit_durable([message("a"), message("b")])

    # Read the files with a second spool, as a restarted process would.
    spool.close()
    assert [e.key for e in replay_all(open_spool(tmp_path))] == ["a", "b"]  # type: ignore[attr-defined]
    recorder.stop(1)


def test_durable_submit_written_while_healthy(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    spool = open_spool(tmp_path)
    recorder = Recorder(writer, FAST, spool=spool)
    recorder.start()
    for index in range(10):
        assert recorder.submit_durable([message(f"d{index}")])
    assert recorder.flush(5)
    assert writer.keys() == [f"d{index}" for index in range(10)]
    assert spool.pending_events() == 0
    assert recorder.state == HEALTHY
    assert recorder.stats().state_changes == {}
    assert recorder.stop()


def test_durable_submit_without_spool_queues(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    recorder = Recorder(writer, FAST)
    recorder.start()
    assert not recorder.submit_durable([message("a")])
    assert recorder.flush(5)
    assert writer.keys() == ["a"]
    assert recorder.stop()


def test_stop_spools_what_it_cannot_write(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    writer.delay = 0.3
    spool = open_spool(tmp_path)
    recorder = Recorder(writer, RecorderSettings(batch_size=10, batch_interval_s=0.01),
                        spool=spool)
    recorder.start()
    for index in range(100):
        recorder.submit(message(f"m{index:03d}"))

    assert not recorder.stop(timeout=0.2)

    spool.close()
    spooled = {e.key for e in replay_all(open_spool(tmp_path))}  # type: ignore[attr-defined]
    written = set(writer.keys())
    assert spooled | written == {f"m{index:03d}" for index in range(100)}
    assert recorder.stats().dropped == {}


def test_stop_without_spool_counts_drops(new_writer) -> None:
    writer = new_writer()
    writer.delay = 0.3
    recorder = Recorder(writer, RecorderSettings(batch_size=10, batch_interval_s=0.01))
    recorder.start()
    for index in range(100):
        recorder.submit(message(f"m{index:03d}"))
    assert not recorder.stop(timeout=0.1)
    time.sleep(0.35)
    stats = recorder.stats()
    assert stats.dropped["shutdown_timeout"] + len(writer.keys()) == 100


def test_poison_event_isolated_from_batch(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    writer.poison = {"m3"}
    spool = open_spool(tmp_path)
    recorder = Recorder(writer, RecorderSettings(batch_size=10, batch_interval_s=0.05),
                        spool=spool)
    recorder.start()
    for index in range(8):
        recorder.submit(message(f"m{index}"))
    assert recorder.flush(5)
    assert sorted(writer.keys()) == [f"m{index}" for index in range(8) if index != 3]
    assert recorder.stats().dropped == {"write_error": 1}
    assert b'"key":"m3"' in (tmp_path / "rejected.log").read_bytes()
    assert recorder.stop()


def test_transform_applied_once_including_replay(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    spool = open_spool(tmp_path)
    calls: list[str] = []

    def rename(event: ev.Event) -> ev.Event:
        calls.append(event.key)  # type: ignore[attr-defined]
        return message("t-" + event.key)  # type: ignore[attr-defined]

    recorder = Recorder(writer, FAST, spool=spool, transform=rename)
    recorder.start()
    writer.down.set()
    recorder.submit(message("a"))
    recorder.submit_durable([message("b")])
    assert recorder.flush(5)
    writer.down.clear()
    assert wait_for(lambda: len(writer.keys()) == 2)
    assert sorted(writer.keys()) == ["t-a", "t-b"]
    assert sorted(calls) == ["a", "b"]
    assert recorder.stop()


def test_spool_full_counted_as_drop(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    writer.down.set()
    spool = open_spool(tmp_path, max_bytes=1500)
    recorder = Recorder(writer, FAST, spool=spool)
    recorder.start()
    for index in range(40):
        recorder.submit(message(f"m{index:02d}"))
        time.sleep(0.002)
    assert recorder.flush(5)
    stats = recorder.stats()
    assert stats.dropped.get("spool_full", 0) > 0
    assert stats.spooled + stats.dropped["spool_full"] == 40
    writer.down.clear()
    assert wait_for(lambda: recorder.state == HEALTHY)
    assert len(writer.keys()) == stats.spooled
    assert recorder.stop()


def test_refused_durable_submit_queues_transformed(tmp_path: Path, new_writer) -> None:
    writer = new_writer()
    spool = open_spool(tmp_path, max_bytes=10)  # too small for any batch
    calls: list[str] = []

    def rename(event: ev.Event) -> ev.Event:
        calls.append(event.key)  # type: ignore[attr-defined]
        return message("t-" + event.key)  # type: ignore[attr-defined]

    recorder = Recorder(writer, FAST, spool=spool, transform=rename)
    recorder.start()
    recorder.submit(message("a"))
    stored = recorder.submit_durable([message("b"), message("c")])
    recorder.submit(message("d"))
    assert recorder.flush(5)
    assert recorder.stop()

    assert not stored
    assert writer.keys() == ["t-a", "t-b", "t-c", "t-d"]
    assert sorted(calls) == ["a", "b", "c", "d"]  # each event transformed exactly once


def test_pipelined_writer_gets_next_batch_before_result() -> None:
    # With a slow writer and a full queue, each batch is handed over while the previous
    # one is written. Every event is written once and counted once.
    writer = PipelinedWriter()
    writer.delay = 0.02
    settings = RecorderSettings(queue_size=1000, batch_size=10, batch_interval_s=0.01)
    recorder = Recorder(writer, settings)
    recorder.start()
    for index in range(200):
        assert recorder.submit(message(f"m{index:03d}"))
    assert recorder.flush(10)

    assert writer.overlapped()
    assert writer.keys() == [f"m{index:03d}" for index in range(200)]
    stats = recorder.stats()
    assert stats.written == 200
    assert stats.write_batches == len(writer.batches)
    assert stats.dropped == {}
    assert recorder.stop()


def test_pipelined_batch_failing_is_written_again() -> None:
    # A pending batch whose write fails retryably goes through the retries: written once.
    writer = PipelinedWriter()
    writer.delay = 0.01
    settings = RecorderSettings(queue_size=1000, batch_size=5, batch_interval_s=0.01,
                                retries=5, retry_backoff_s=0.01)
    recorder = Recorder(writer, settings)
    recorder.start()
    for index in range(20):
        recorder.submit(message(f"a{index:02d}"))
    assert recorder.flush(10)
    writer.down.set()
    for index in range(20):
        recorder.submit(message(f"b{index:02d}"))
    time.sleep(0.05)
    writer.down.clear()
    assert recorder.flush(10)

    keys = writer.keys()
    assert sorted(keys) == sorted([f"a{index:02d}" for index in range(20)]
                                  + [f"b{index:02d}" for index in range(20)])
    assert recorder.stats().written == 40
    assert recorder.stats().dropped == {}
    assert recorder.stop()
