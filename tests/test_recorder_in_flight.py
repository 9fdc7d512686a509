"""A timed-out stop spools the batch its writer thread is writing, and counts it once."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings
from tests.test_attack5 import _wait_until

T0 = ev.now_utc()


class _HeldWriter:
    """A writer in the recorder's thread whose writes wait until ``release`` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.error = error
        self.stored: list[str] = []

    def write(self, batch: Sequence[ev.Event]) -> int:
        self.started.set()
        assert self.release.wait(30), "the test never released the write"
        if self.error is not None:
            raise self.error
        self.stored.extend(event.key for event in batch)  # type: ignore[attr-defined]
        return len(batch)


def _messages(count: int) -> list[ev.Message]:
    return [ev.Message(channel="web", occurred_at=T0, key=f"k{i}", role="user", user_id="u1",
                       text="hello") for i in range(count)]


def _stop_during_write(writer: _HeldWriter, tmp_path) -> tuple[Recorder, FileSpool]:  # type: ignore[no-untyped-def]
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(writer, RecorderSettings(batch_size=5, batch_interval_s=0.01),
                        spool=spool)
    recorder.start()
    for message in _messages(5):
        assert recorder.submit(message)
    assert writer.started.wait(30)
    thread = recorder._thread
    assert recorder.stop(timeout=0.2) is False
    writer.release.set()
    thread.join(30)
    assert not thread.is_alive()
    return recorder, spool


def test_in_flight_stored_after_stop_counted_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    writer = _HeldWriter()
    recorder, spool = _stop_during_write(writer, tmp_path)
    stats = recorder.stats()
    # The write went through after stop() had spooled the batch: stored and spooled, and
    # counted once, as spooled (replaying the spool skips the stored copy).
    assert writer.stored == [f"k{i}" for i in range(5)]
    assert stats.spooled == 5
    assert stats.written == 0
    assert sum(stats.dropped.values()) == 0
    assert spool.pending_events() == 5
    spool.close()


@pytest.mark.parametrize("error", [
    OperationalError("INSERT", {}, Exception("database is locked")),  # retryable
    ValueError("bad event"),  # rejected: isolated event by event, when not stopping
])
def test_in_flight_failed_after_stop_counted_once(tmp_path,  # type: ignore[no-untyped-def]
                                                  error: Exception) -> None:
    writer = _HeldWriter(error)
    recorder, spool = _stop_during_write(writer, tmp_path)
    _wait_until(lambda: recorder.stats().spooled == 5, "the batch was never spooled")
    stats = recorder.stats()
    assert writer.stored == []
    assert stats.spooled == 5
    assert stats.written == 0
    assert sum(stats.dropped.values()) == 0
    spool.close()
