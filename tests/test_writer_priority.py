"""The writer processes' scheduling priority: the idle policy, and the restart under the
batch policy when idle processes starve.

Starvation is real here: a busy process at the test's own priority is pinned to the CPU
that the idle writer process is pinned to, so the writer gets almost none of it.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from chatmw import events as ev
from chatmw.config import Settings
from chatmw.health import render_metrics
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.runtime import Runtime
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models import Message
from chatmw.writer_priority import (
    IDLE_SUPPORTED,
    StarvationWatch,
    WriterPriority,
    enter_idle_policy,
    runs_idle,
    start_priority,
    thread_samples,
    writer_policy,
)
from chatmw.writer_process import ProcessWriter, build_writer

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

linux_only = pytest.mark.skipif(not IDLE_SUPPORTED, reason="needs Linux's SCHED_IDLE and /proc")


def _messages(count: int, prefix: str = "m") -> list[ev.Event]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index),
                       key=f"{prefix}{index}", role="user", user_id=f"u{index % 3}",
                       text="hello there", conversation_id=f"c{index % 3}")
            for index in range(count)]


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def _stored_keys(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(select(Message.key).order_by(Message.key)).scalars())
    finally:
        engine.dispose()


def _thread_policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(thread)) for thread in os.listdir(f"/proc/{pid}/task")}


def _pin(pid: int, cpu: int) -> None:
    # Every thread of the process; threads it starts later inherit the main thread's set.
    for _ in range(2):
        for thread in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(thread), {cpu})


# Settings


@pytest.mark.parametrize(("raw", "policy"), [("", "idle"), ("idle", "idle"), (" Batch ", "batch")])
def test_writer_policy_reads_setting(raw: str, policy: str) -> None:
    assert writer_policy({"CHATMW_WRITER_POLICY": raw}) == policy


@pytest.mark.parametrize("raw", ["low", "realtime", "0"])
def test_writer_policy_rejects_bad_values(raw: str) -> None:
    with pytest.raises(ValueError, match=f"CHATMW_WRITER_POLICY must be 'idle' or 'batch', "
                                         f"got '{raw}'"):
        writer_policy({"CHATMW_WRITER_POLICY": raw})


def test_priority_bad_values_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatmw"):
        priority = WriterPriority.from_environ({"CHATMW_WRITER_POLICY": "fast",
                                                "CHATMW_WRITER_NICE": "30"})
    assert (priority.niceness, priority.idle) == (5, True)
    assert "CHATMW_WRITER_POLICY must be 'idle' or 'batch', got 'fast'" in caplog.text
    assert "CHATMW_WRITER_NICE must be an integer from 0 to 19, got 30" in caplog.text


def test_priority_from_environ() -> None:
    assert WriterPriority.from_environ({}) == WriterPriority(niceness=5, idle=True)
    assert WriterPriority.from_environ({"CHATMW_WRITER_POLICY": "batch"}) == WriterPriority(
        niceness=5, idle=False)
    # Niceness 0 leaves the processes as the parent is, so no idle policy either.
    assert WriterPriority.from_environ({"CHATMW_WRITER_NICE": "0"}) == WriterPriority(
        niceness=0, idle=False)


@pytest.mark.parametrize(("changes", "message"), [
    ({"niceness": 20}, "niceness must be from 0 to 19, got 20"),
    ({"calm_s": 0}, "calm_s must be positive, got 0"),
    ({"starved_after_s": -1.0}, "starved_after_s must be positive, got -1.0"),
    ({"starved_share": 0.0}, "starved_share must be above 0 and at most 1, got 0.0"),
    ({"starved_share": 1.5}, "starved_share must be above 0 and at most 1, got 1.5"),
])
def test_priority_rejects_bad_values(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WriterPriority(**changes)  # type: ignore[arg-type]


def test_start_argument() -> None:
    idle = WriterPriority(niceness=7, calm_s=42.0)
    if IDLE_SUPPORTED:
        assert idle.start_argument(raised=False) == (7, 0.0)
        assert idle.start_argument(raised=True) == (7, 42.0)
    else:
        assert idle.start_argument(raised=False) == (7, None)
    assert WriterPriority(niceness=7, idle=False).start_argument(raised=False) == (7, None)


# The policy in a process


def _report_priority(priority: tuple[int, float | None], wait_s: float, queue: object) -> None:
    idle_at = start_priority(priority)
    time.sleep(wait_s)
    if idle_at is not None and time.monotonic() >= idle_at:
        enter_idle_policy()
    queue.put((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)))  # type: ignore[attr-defined]


def _priority_in_child(priority: tuple[int, float | None], wait_s: float = 0.0) -> tuple[int, int]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_report_priority, args=(priority, wait_s, queue))
    process.start()
    try:
        return queue.get(timeout=60)  # type: ignore[no-any-return]
    finally:
        process.join(60)


@linux_only
def test_start_priority_in_a_process() -> None:
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    assert _priority_in_child((5, None)) == (min(19, parent + 5), os.SCHED_BATCH)
    assert _priority_in_child((5, 0.0))[1] == os.SCHED_IDLE
    # Raised: the batch policy until the calm period ends, then the idle policy.
    assert _priority_in_child((5, 30.0))[1] == os.SCHED_BATCH
    assert _priority_in_child((5, 0.2), wait_s=0.4)[1] == os.SCHED_IDLE
    assert _priority_in_child((0, None)) == (parent, os.sched_getscheduler(0))


@linux_only
def test_thread_samples_of_this_process() -> None:
    before = thread_samples(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = thread_samples(os.getpid())
    # This thread is running, so runnable, and it ran for the busy loop in between.
    runnable, ran = after[threading.get_native_id()]
    assert runnable
    assert ran - before[threading.get_native_id()][1] >= 40_000_000
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)"])
    try:
        time.sleep(0.5)
        assert thread_samples(sleeper.pid)[sleeper.pid][0] is False
    finally:
        sleeper.kill()
        sleeper.wait()
    assert thread_samples(sleeper.pid) == {}


@linux_only
def test_watch_sees_a_starved_process(hog: int) -> None:
    starved = subprocess.Popen([sys.executable, "-c",
                                "import os\n"
                                f"os.sched_setaffinity(0, {{{hog}}})\n"
                                "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
                                "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)"])
    try:
        time.sleep(0.3)
        priority = WriterPriority(starved_after_s=1.0)
        watches = [StarvationWatch([starved.pid], priority),
                   StarvationWatch([sleeper.pid], priority)]
        # Too early to tell.
        assert not watches[0].starved()
        time.sleep(1.2)
        assert watches[0].starved()
        assert watches[0].share > 0.8
        assert not watches[1].starved()
        assert watches[1].share == 0.0
        assert runs_idle(starved.pid)
        assert not runs_idle(sleeper.pid)
    finally:
        for process in (starved, sleeper):
            process.kill()
            process.wait()


# The writer processes


@linux_only
def test_runtime_writer_runs_idle_or_batch(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    for policy, expected in (("", os.SCHED_IDLE), ("batch", os.SCHED_BATCH)):
        monkeypatch.setenv("CHATMW_WRITER_POLICY", policy)
        folder = tmp_path / (policy or "default")
        folder.mkdir()
        runtime = Runtime.from_settings(
            Settings(database_url=_sqlite(folder), writer_process=True), privacy=None)
        runtime.start()
        try:
            for event in _messages(3):
                assert runtime.recorder.submit(event)
            assert runtime.recorder.flush(60)
            writer = runtime.recorder.writer
            assert isinstance(writer, ProcessWriter)
            assert _thread_policies(writer._process.pid) == {expected}
            assert writer.priority_raises == 0
        finally:
            runtime.stop()


@linux_only
def test_starved_writer_restarts_under_batch(hog: int, tmp_path: Path) -> None:
    url = _sqlite(tmp_path)
    priority = WriterPriority(starved_after_s=0.6, calm_s=1.5)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=True),
                           priority=priority)
    recorder = Recorder(writer, RecorderSettings(batch_interval_s=0.05))
    try:
        writer.start()
        starved = writer._process.pid
        _pin(starved, hog)
        recorder.start()
        first = _messages(20, "a")
        for event in first:
            assert recorder.submit(event)
        # The recorder retries the failed write, and the new process stores the batch.
        assert recorder.flush(60)
        assert writer.priority_raises == 1
        assert writer._process.pid != starved
        assert _thread_policies(writer._process.pid) == {os.SCHED_BATCH}
        assert "chatmw_writer_priority_raises_total 1" in render_metrics(recorder)

        # After the calm period, the process returns to the idle policy between batches.
        time.sleep(1.6)
        second = _messages(4, "b")
        for batch in ([second[0], second[1]], [second[2], second[3]]):
            for event in batch:
                assert recorder.submit(event)
            assert recorder.flush(60)
        assert _thread_policies(writer._process.pid) == {os.SCHED_IDLE}
        stats = recorder.stats()
        assert stats.written == 24
        assert not stats.dropped
    finally:
        recorder.stop()
        writer.close()
    # Every event once, none lost to the stopped process.
    assert _stored_keys(url) == sorted(event.key for event in first + second)  # type: ignore[attr-defined]


@linux_only
def test_batch_writer_not_restarted(hog: int, tmp_path: Path) -> None:
    # Starved under the batch policy too (niceness 10 against a busy process), a restart
    # would gain nothing: the write waits for its reply.
    url = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False),
                           priority=WriterPriority(niceness=10, idle=False,
                                                   starved_after_s=0.2))
    try:
        writer.start()
        child = writer._process.pid
        _pin(child, hog)
        assert writer.write(_messages(5)) == 5
        assert writer._process.pid == child
        assert writer.priority_raises == 0
    finally:
        writer.close()
    assert len(_stored_keys(url)) == 5


def test_health_metrics_without_process_writer() -> None:
    class _Plain:
        def write(self, batch: object) -> int:
            return 0

    recorder = Recorder(_Plain(), RecorderSettings())
    assert "chatmw_writer_priority_raises_total" not in render_metrics(recorder)
