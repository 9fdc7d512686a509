"""Events submitted while or after a recorder stops: spooled or counted, never left queued.

Once the writer thread has ended, nothing takes events from the queue, and an event left
there is lost with the process although ``submit`` accepted it. These tests drive a real
``Recorder`` with the store ``Writer`` on an SQLite file under ``tmp_path``, and a
``FileSpool`` under ``tmp_path`` where a spool is used. A second recorder on the same
spool directory plays the next start of the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Message
from chatmw.store.writer import Writer

FAST = RecorderSettings(batch_size=10, batch_interval_s=0.01)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on a new migrated SQLite file under ``tmp_path``."""
    engine = make_engine(f"sqlite:///{tmp_path / 'chatmw.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def message(key: str) -> ev.Message:
    return ev.Message(channel="web", occurred_at=ev.now_utc(), key=key, role="user",
                      user_id="u1", text=f"text of {key}")


def stored_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(select(Message.key)).scalars())


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


class HoldWriter:
    """A transform that blocks the writer thread on its first event until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, event: ev.Event) -> ev.Event:
        if threading.current_thread().name == "chatmw-recorder" and not self.opened.is_set():
            self.entered.set()
            assert self.opened.wait(30)
        return event


def test_stopped_without_spool_drops(engine: Engine) -> None:
    recorder = Recorder(Writer(engine), FAST)
    recorder.start()
    assert all(recorder.submit(message(f"a{index}")) for index in range(3))
    assert recorder.stop(10)

    late = [recorder.submit(message(f"late{index}")) for index in range(2)]
    stats = recorder.stats()

    assert late == [False, False]
    assert stats.submitted == 3
    assert stats.written == 3
    assert stats.dropped == {"recorder_stopped": 2}
    assert stats.queue_depth == 0
    assert stored_keys(engine) == ["a0", "a1", "a2"]

    # A restart does not bring the dropped events back, and takes new ones as before.
    recorder.start()
    try:
        assert recorder.submit(message("b0"))
        assert recorder.flush(10)
    finally:
        assert recorder.stop(10)
    assert stored_keys(engine) == ["a0", "a1", "a2", "b0"]
    assert recorder.stats().submitted == 4


def test_stopped_with_spool_spools(
        tmp_path: Path, engine: Engine) -> None:
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    assert recorder.submit(message("a0"))
    assert recorder.stop(10)

    accepted = recorder.submit(message("late0"))
    stats = recorder.stats()
    pending = spool.pending_events()
    spool.close()

    assert accepted is True
    assert (stats.submitted, stats.written, stats.spooled, stats.dropped) == (2, 1, 1, {})
    assert stats.queue_depth == 0
    assert pending == 1
    assert stored_keys(engine) == ["a0"]

    # The process exits here. The next one replays the spool.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    successor = Recorder(Writer(engine), FAST, spool=spool)
    successor.start()
    try:
        assert successor.flush(10)
    finally:
        assert successor.stop(10)
        spool.close()
    assert stored_keys(engine) == ["a0", "late0"]


@pytest.mark.parametrize("with_spool", [False, True])
def test_events_behind_stop_marker_handled(
        tmp_path: Path, engine: Engine, with_spool: bool) -> None:
    # The writer thread is held on w0 while stop() queues its marker. Events submitted
    # then are queued behind the marker, which ends the thread before it reaches them.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool")) if with_spool else None
    hold = HoldWriter()
    recorder = Recorder(Writer(engine), FAST, spool=spool, transform=hold)
    recorder.start()
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(recorder.stop(10)))
    try:
        assert recorder.submit(message("w0"))
        assert hold.entered.wait(10)
        stopper.start()
        # The stop marker is the only item queued once stop() has put it.
        assert wait_for(lambda: recorder.stats().queue_depth == 1)
        behind = [recorder.submit(message(f"behind{index}")) for index in range(3)]
    finally:
        hold.opened.set()
        stopper.join(15)
    stats = recorder.stats()
    keys = stored_keys(engine)
    pending = spool.pending_events() if spool is not None else 0
    if spool is not None:
        spool.close()

    assert stopped == [True]
    assert behind == [True, True, True]  # queued while the queue was still open
    assert keys == ["w0"]
    assert stats.queue_depth == 0
    assert stats.submitted == 4
    if with_spool:
        assert (stats.spooled, pending, stats.dropped) == (3, 3, {})
    else:
        assert (stats.spooled, stats.dropped) == (0, {"recorder_stopped": 3})


def test_stopped_durable_full_spool_drops(tmp_path: Path,
                                                                engine: Engine) -> None:
    # The spool rejects the append (one byte allowed), so submit_durable falls back to the
    # queue, which is closed after stop: the events are counted as dropped, not queued.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool", max_bytes=1))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    assert recorder.stop(10)
    try:
        durable = recorder.submit_durable([message("d0"), message("d1")])
        stats = recorder.stats()
    finally:
        spool.close()

    assert durable is False
    assert stats.queue_depth == 0
    assert stats.submitted == 0
    assert stats.dropped == {"recorder_stopped": 2}


def test_submit_before_start_waits(engine: Engine) -> None:
    recorder = Recorder(Writer(engine), FAST)
    assert recorder.submit(message("early"))
    assert recorder.stats().queue_depth == 1
    recorder.start()
    try:
        assert recorder.flush(10)
    finally:
        assert recorder.stop(10)
    assert stored_keys(engine) == ["early"]
    assert recorder.stats().dropped == {}


def test_flush_after_stop_returns(tmp_path: Path, engine: Engine) -> None:
    # Events spooled after stop wait for the next start, because no thread replays them
    # before it. So flush counts them as handled instead of waiting until its timeout.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    try:
        assert recorder.submit(message("a0"))
        assert recorder.stop(10)
        assert recorder.submit(message("late0"))
        flushed = recorder.flush(1)
        pending = spool.pending_events()
    finally:
        spool.close()

    assert pending == 1
    assert flushed is True


def test_restart_replays_late_events(tmp_path: Path, engine: Engine) -> None:
    # The same recorder started again replays what was spooled while it was stopped.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    try:
        recorder.start()
        assert recorder.stop(10)
        assert recorder.submit(message("late0"))
        recorder.start()
        assert recorder.flush(10)
        assert recorder.stop(10)
        pending = spool.pending_events()
    finally:
        spool.close()

    stats = recorder.stats()
    assert stored_keys(engine) == ["late0"]
    assert pending == 0
    assert (stats.submitted, stats.spooled, stats.replayed, stats.dropped) == (1, 1, 1, {})


@pytest.mark.parametrize("with_spool", [False, True])
def test_submits_racing_stop_add_up(tmp_path: Path, engine: Engine, with_spool: bool) -> None:
    # Four threads submit while another stops the recorder. Every event is stored,
    # spooled or counted as dropped, exactly once, and nothing stays in the queue.
    # Without a spool, events accepted behind the stop marker are dropped too.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool")) if with_spool else None
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    accepted: list[str] = []
    rejected: list[str] = []
    results_lock = threading.Lock()
    go = threading.Barrier(5)

    def submit_many(thread: int) -> None:
        go.wait()
        for index in range(300):
            key = f"t{thread}-{index}"
            result = recorder.submit(message(key))
            with results_lock:
                (accepted if result else rejected).append(key)

    threads = [threading.Thread(target=submit_many, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    go.wait()
    time.sleep(0.01)
    stopped = recorder.stop(30)
    for thread in threads:
        thread.join(30)
    stats = recorder.stats()
    pending = spool.pending_events() if spool is not None else 0
    if spool is not None:
        spool.close()

    assert stopped is True
    assert len(accepted) + len(rejected) == 1200
    assert stats.queue_depth == 0
    assert stats.submitted == len(accepted)
    assert stats.written + stats.spooled + sum(stats.dropped.values()) == 1200
    assert pending == stats.spooled
    stored = stored_keys(engine)
    assert len(stored) == stats.written
    assert set(stored) <= set(accepted)
    if with_spool:
        assert rejected == []
        assert stats.dropped == {}
        # The next start replays the spooled events, so each accepted event is stored once.
        spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
        successor = Recorder(Writer(engine), FAST, spool=spool)
        successor.start()
        try:
            assert successor.flush(30)
        finally:
            assert successor.stop(30)
            spool.close()
        assert stored_keys(engine) == sorted(accepted)
    else:
        assert set(stats.dropped) <= {"recorder_stopped"}


def test_durable_after_stop_queues_nothing(tmp_path: Path, engine: Engine) -> None:
    # A durable submit after stop appends to the spool and leaves the queue empty, because
    # no writer thread would take a wake-up marker. Flush does not wait for one either.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    try:
        assert recorder.stop(10)
        durable = [recorder.submit_durable([message(f"d{index}")]) for index in range(3)]
        stats = recorder.stats()
        flushed = recorder.flush(1)
        pending = spool.pending_events()
    finally:
        spool.close()

    assert durable == [True, True, True]
    assert pending == 3
    assert (stats.submitted, stats.spooled) == (3, 3)
    assert stats.queue_depth == 0
    assert flushed is True


@pytest.mark.parametrize("with_spool", [False, True])
def test_submit_after_timed_out_stop(tmp_path: Path, engine: Engine, with_spool: bool) -> None:
    # The writer thread is held on w0 past the stop's deadline. Events submitted after
    # that stop are spooled or dropped at once, the abandoned thread still stores w0, and
    # a restart takes new events.
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool")) if with_spool else None
    hold = HoldWriter()
    recorder = Recorder(Writer(engine), FAST, spool=spool, transform=hold)
    recorder.start()
    try:
        assert recorder.submit(message("w0"))
        assert hold.entered.wait(10)
        stopped = recorder.stop(0.2)
        late = [recorder.submit(message(f"late{index}")) for index in range(3)]
    finally:
        hold.opened.set()
    assert wait_for(lambda: "w0" in stored_keys(engine))
    recorder.start()
    try:
        assert recorder.submit(message("b0"))
        assert recorder.flush(10)
    finally:
        assert recorder.stop(10)
        if spool is not None:
            spool.close()
    stats = recorder.stats()

    assert stopped is False
    assert late == [with_spool] * 3
    assert stats.written + stats.spooled - stats.replayed + sum(stats.dropped.values()) == 5
    if with_spool:
        assert stored_keys(engine) == ["b0", "late0", "late1", "late2", "w0"]
        assert stats.dropped == {}
    else:
        assert stored_keys(engine) == ["b0", "w0"]
        assert stats.dropped == {"recorder_stopped": 3}


def test_start_racing_stop_runs(engine: Engine) -> None:
    # A start in another thread comes in after the stop's writer thread has ended and
    # before the queue closes. Whichever goes first, the recorder ends up running with
    # an open queue, so it stores what is submitted next.
    recorder = Recorder(Writer(engine), FAST)
    recorder.start()
    queue = recorder._queue
    close = queue.close
    starter = threading.Thread(target=recorder.start)

    def close_during_start() -> None:
        starter.start()
        # Gives the start time to run here, when nothing keeps it from doing so.
        starter.join(0.5)
        close()

    queue.close = close_during_start  # type: ignore[method-assign]
    try:
        assert recorder.stop(10)
    finally:
        queue.close = close  # type: ignore[method-assign]
    starter.join(10)
    try:
        accepted = recorder.submit(message("after"))
        flushed = recorder.flush(10)
    finally:
        recorder.stop(10)

    assert accepted is True
    assert flushed is True
    assert stored_keys(engine) == ["after"]
    assert recorder.stats().dropped == {}


def stopped_with_closed_spool(tmp_path: Path, engine: Engine) -> tuple[FileSpool, Recorder]:
    """Start and stop a recorder with a spool, then close the spool as Runtime.stop does."""
    spool = FileSpool(SpoolSettings(directory=tmp_path / "spool"))
    recorder = Recorder(Writer(engine), FAST, spool=spool)
    recorder.start()
    assert recorder.stop(10)
    spool.close()
    return spool, recorder


def test_closed_spool_counts_as_closed(tmp_path: Path, engine: Engine) -> None:
    # Runtime.stop closes the spool after the recorder's stop: a later event is dropped as
    # spool_closed, apart from the spool_full of a spool that ran out of room.
    spool, recorder = stopped_with_closed_spool(tmp_path, engine)

    accepted = recorder.submit(message("late0"))
    stats = recorder.stats()

    assert spool.closed is True
    assert accepted is False
    assert stats.dropped == {"spool_closed": 1}
    assert stats.submitted == 0


def test_durable_submit_closed_spool(tmp_path: Path, engine: Engine) -> None:
    # The closed spool rejects a durable submit's events too, so they are dropped as
    # spool_closed, as submit counts them.
    _, recorder = stopped_with_closed_spool(tmp_path, engine)

    durable = recorder.submit_durable([message("late-durable")])
    queued = recorder.submit(message("late-queued"))
    stats = recorder.stats()

    assert durable is False
    assert queued is False
    assert stats.dropped == {"spool_closed": 2}
    assert stats.submitted == 0
