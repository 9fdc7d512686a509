"""Each event of a batch written by the recorder's thread is counted exactly once.

An event is counted as written, spooled or dropped, whenever a retryable failure, the
isolation of a bad event or a timed-out stop comes. A recorder started again after a
timed-out stop does not count the abandoned thread's batch a second time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw.recorder import Recorder, RecorderSettings, RecorderStats
from chatmw.spool import FileSpool, SpoolSettings

T0 = ev.now_utc()


def _locked() -> OperationalError:
    return OperationalError("INSERT", {}, Exception("database is locked"))


class _ScriptedWriter:
    """A writer in the recorder's thread that rejects every batch containing the key ``bad``.

    ``before[n]`` runs before the n-th write (counted from 1); it may raise or wait.
    """

    def __init__(self, bad: str | None = None,
                 before: dict[int, Callable[[], None]] | None = None) -> None:
        self.bad = bad
        self.before = before or {}
        self.calls: list[list[str]] = []
        self.stored: list[str] = []

    def write(self, batch: Sequence[ev.Event]) -> int:
        keys = [event.key for event in batch]  # type: ignore[attr-defined]
        self.calls.append(keys)
        hook = self.before.get(len(self.calls))
        if hook is not None:
            hook()
        if self.bad in keys:
            raise ValueError("bad event")
        self.stored.extend(keys)
        return len(batch)


class _Gate:
    """A barrier that stops the calling thread until the test opens it.

    ``entered`` is set once a thread reached it.
    """

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.then = then

    def __call__(self) -> None:
        self.entered.set()
        assert self.opened.wait(30), "the test never opened the gate"
        if self.then is not None:
            self.then()


def _raise_locked() -> None:
    raise _locked()


def _messages(count: int, prefix: str = "k") -> list[ev.Message]:
    return [ev.Message(channel="web", occurred_at=T0, key=f"{prefix}{i}", role="user",
                       user_id="u1", text="hello") for i in range(count)]


def _recorder(writer: _ScriptedWriter, spool: FileSpool | None = None,
              **settings: float) -> Recorder:
    settings.setdefault("batch_size", 4)
    settings.setdefault("batch_interval_s", 0.01)
    return Recorder(writer, RecorderSettings(**settings),  # type: ignore[arg-type]
                    spool=spool, sleep=lambda _seconds: None)


def _accounted(stats: RecorderStats) -> int:
    return stats.written - stats.replayed + stats.spooled + sum(stats.dropped.values())


def _stop_timed_out(recorder: Recorder, gate: _Gate) -> threading.Thread:
    # Stops the recorder while its thread waits at ``gate``, then lets the thread end.
    assert gate.entered.wait(30)
    thread = recorder._thread
    assert thread is not None
    assert recorder.stop(timeout=0.2) is False
    gate.opened.set()
    thread.join(30)
    assert not thread.is_alive()
    return thread


@pytest.mark.parametrize("retries", [0, 1])
def test_retry_while_isolating_counts_once(retries: int) -> None:
    # The batch is rejected, so it is split; its first half is stored, then the second half
    # meets a lock. Only the events not stored yet are written again or given up.
    writer = _ScriptedWriter(bad="k3", before={3: _raise_locked})
    recorder = _recorder(writer, retries=retries)
    recorder.start()
    for message in _messages(4):
        assert recorder.submit(message)
    assert recorder.flush(30)
    recorder.stop(5)
    stats = recorder.stats()
    assert stats.submitted == 4
    assert _accounted(stats) == 4
    if retries:
        assert stats.written == 3
        assert stats.dropped == {"write_error": 1}
        assert sorted(writer.stored) == ["k0", "k1", "k2"]
    else:
        assert stats.written == 2
        assert stats.dropped == {"store_unavailable": 2}


def test_stop_while_isolating_spools_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The first half of the rejected batch is stored and counted as written when the stop
    # times out during the write of the second half: only that half is spooled.
    gate = _Gate()
    writer = _ScriptedWriter(bad="k3", before={3: gate})
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = _recorder(writer, spool)
    recorder.start()
    for message in _messages(4):
        assert recorder.submit(message)
    _stop_timed_out(recorder, gate)
    stats = recorder.stats()
    assert writer.stored == ["k0", "k1"]
    assert stats.written == 2
    assert stats.spooled == 2
    assert sum(stats.dropped.values()) == 0
    assert spool.pending_events() == 2
    spool.close()


class _GatedSpool(FileSpool):
    """A spool whose first append from the recorder's thread waits at ``gate``."""

    def __init__(self, settings: SpoolSettings, gate: _Gate) -> None:
        super().__init__(settings)
        self.gate = gate
        self.gated = False

    def append(self, batch: Sequence[ev.Event]) -> bool:
        if threading.current_thread().name == "chatmw-recorder" and not self.gated:
            self.gated = True
            self.gate()
        return super().append(batch)


def test_stop_during_spool_append_counts_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The writes failed after every retry and the thread is appending the batch to the spool
    # when the stop times out: the stop does not append it a second time.
    gate = _Gate()
    writer = _ScriptedWriter(before={1: _raise_locked})
    spool = _GatedSpool(SpoolSettings(directory=tmp_path / "spool"), gate)
    recorder = _recorder(writer, spool, retries=0)
    recorder.start()
    for message in _messages(4):
        assert recorder.submit(message)
    _stop_timed_out(recorder, gate)
    stats = recorder.stats()
    assert stats.spooled == 4
    assert stats.written == 0
    assert sum(stats.dropped.values()) == 0
    assert spool.pending_events() == 4
    spool.close()


def test_stop_after_counted_write_counts_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The batch is stored and counted as written, and the stop times out before the thread
    # leaves the write: the stop does not spool the batch too.
    gate = _Gate()
    writer = _ScriptedWriter()
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = _recorder(writer, spool)
    count_written = recorder._count_written

    def count_then_wait(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        count_written(*args, **kwargs)
        gate()

    recorder._count_written = count_then_wait  # type: ignore[method-assign]
    recorder.start()
    for message in _messages(4):
        assert recorder.submit(message)
    _stop_timed_out(recorder, gate)
    stats = recorder.stats()
    assert writer.stored == ["k0", "k1", "k2", "k3"]
    assert stats.written == 4
    assert stats.spooled == 0
    assert spool.pending_events() == 0
    spool.close()


@pytest.mark.parametrize("spooled", [True, False])
def test_restart_after_stop_counts_once(tmp_path, spooled: bool) -> None:  # type: ignore[no-untyped-def]
    # The recorder is started again while the thread of the timed-out stop is still in its
    # write. That thread ends once the write returns, without counting the batch the stop
    # took, and the new thread writes the events submitted after the start.
    gate = _Gate()
    writer = _ScriptedWriter(before={1: gate})
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool")) if spooled else None
    recorder = _recorder(writer, spool)
    recorder.start()
    for message in _messages(4):
        assert recorder.submit(message)
    assert gate.entered.wait(30)
    old = recorder._thread
    assert old is not None
    assert recorder.stop(timeout=0.2) is False
    recorder.start()
    gate.opened.set()
    old.join(30)
    assert not old.is_alive()
    new = recorder._thread
    assert new is not None
    assert new is not old
    assert new.is_alive()
    for message in _messages(3, prefix="n"):
        assert recorder.submit(message)
    assert recorder.flush(30)
    assert recorder.stop(30) is True
    stats = recorder.stats()
    assert stats.submitted == 7
    assert _accounted(stats) == 7
    assert {"n0", "n1", "n2"} <= set(writer.stored)
    if spooled:
        # The 4 events the stop spooled are replayed by the new thread.
        assert stats.spooled == 4
        assert stats.written == 7
        assert stats.replayed == 4
        spool.close()  # type: ignore[union-attr]
    else:
        # Without a spool the stop leaves the batch to its thread, which stored it.
        assert stats.written == 7
        assert sum(stats.dropped.values()) == 0


def test_restart_ends_old_spill_thread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The spill thread of the timed-out stop has not seen the stop yet when the recorder is
    # started again (the test keeps the overflow buffer's lock). It still ends, and the
    # next stop ends the new spill thread too.
    gate = _Gate()
    writer = _ScriptedWriter(before={1: gate})
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = _recorder(writer, spool)
    recorder.start()
    old_spill = recorder._spill_thread
    assert old_spill is not None
    for message in _messages(4):
        assert recorder.submit(message)
    assert gate.entered.wait(30)
    with recorder._overflow_ready:
        assert recorder.stop(timeout=0.2) is False
        recorder.start()
    gate.opened.set()
    new_spill = recorder._spill_thread
    assert new_spill is not None
    assert recorder.flush(30)
    assert recorder.stop(30) is True
    old_spill.join(30)
    assert not old_spill.is_alive()
    assert not new_spill.is_alive()
    spool.close()


def test_replay_retry_while_isolating_counts_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A spooled chunk k0-k3 with a bad k3: its replay stores k0 and k1, then k2+k3 meets a
    # lock error. The next replay of the chunk writes k2 and k3 only.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    assert spool.append(_messages(4))
    writer = _ScriptedWriter(bad="k3", before={3: _raise_locked})
    recorder = _recorder(writer, spool, probe_interval_s=0.01)
    recorder.start()
    deadline = time.monotonic() + 30
    while spool.pending_events():
        assert time.monotonic() < deadline, "the spool was never replayed"
        time.sleep(0.01)
    assert recorder.stop(timeout=10)
    stats = recorder.stats()
    assert writer.calls == [["k0", "k1", "k2", "k3"], ["k0", "k1"], ["k2", "k3"],
                            ["k2", "k3"], ["k2"], ["k3"]]
    assert writer.stored == ["k0", "k1", "k2"]
    assert stats.written == 3
    assert stats.replayed == 3
    assert stats.dropped == {"write_error": 1}
    assert spool.stats().rejected_events == 1
    spool.close()


def test_restart_with_writer_process_counts_once(engine, database_url,  # type: ignore[no-untyped-def]
                                                 tmp_path) -> None:
    # A timed-out stop abandons a thread that waits for the writer process's reply. The
    # recorder started again hands the same process its next batch, and replays the spool.
    from tests.test_attack5 import _messages as _timed_messages
    from tests.test_attack5 import _slow_writer, _spooling_recorder, _stored, _wait_pending

    recorder, writer, spool = _spooling_recorder(
        functools.partial(_slow_writer, database_url, 0.6), tmp_path)
    recorder.start()
    for event in _timed_messages(5, "a"):
        assert recorder.submit(event)
    _wait_pending(recorder)
    abandoned = recorder._thread
    assert abandoned is not None
    assert recorder.stop(timeout=0.1) is False
    recorder.start()
    for event in _timed_messages(5, "b"):
        assert recorder.submit(event)
    assert recorder.flush(60)
    abandoned.join(30)
    assert not abandoned.is_alive()
    assert recorder.stop(timeout=30)
    writer.close()
    stats = recorder.stats()
    assert stats.submitted == 10
    assert _accounted(stats) == 10
    assert stats.spooled == 5
    assert sum(stats.dropped.values()) == 0
    assert spool.pending_events() == 0
    assert _stored(engine) == 10
    spool.close()
