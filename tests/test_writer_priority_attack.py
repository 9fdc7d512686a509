"""Attacks on the writer processes' idle policy and their restart when they starve.

Starvation is real here, as in tests/test_writer_priority.py: a busy process at the test's
own priority is pinned to the CPU the writer processes are pinned to. The tests that
need no competing process pin the writer processes to one CPU and let them compete with
each other.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from chatmw import events as ev
from chatmw import writer_priority
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.store.engine import make_engine
from chatmw.store.models import Message
from chatmw.writer_priority import WriterPriority
from chatmw.writer_process import ProcessWriter, build_writer
from tests.test_writer_priority import _pin, _sqlite, linux_only

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

def _messages(count: int, prefix: str, users: int = 3) -> list[ev.Event]:
    return [ev.Message(channel="web", occurred_at=T0 + timedelta(seconds=index),
                       key=f"{prefix}{index:05d}", role="user", user_id=f"u{index % users}",
                       text="hello there", conversation_id=f"c{index % users}")
            for index in range(count)]


def _count_keys(url: str, prefix: str) -> tuple[int, int]:
    """Return the rows and the distinct keys of the messages whose key starts with ``prefix``."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(func.count()).select_from(Message)
                                      .where(Message.key.like(f"{prefix}%"))).scalar_one()
            keys = connection.execute(select(func.count(func.distinct(Message.key)))
                                      .where(Message.key.like(f"{prefix}%"))).scalar_one()
            return int(rows), int(keys)
    finally:
        engine.dispose()


def _writer_pids(writer: ProcessWriter) -> list[int]:
    return [writer._process.pid, *(partner.pid for partner in writer._partners)]


class BurnWriter:
    """A writer that sleeps ``sleep_s`` (as if it waited for the database), then spends
    ``cpu_per_event_s`` of CPU time on each event, as decoding and enrichment do. A batch
    of one event (to warm the process up) does not sleep."""

    def __init__(self, sleep_s: float, cpu_per_event_s: float) -> None:
        self.sleep_s = sleep_s
        self.cpu_per_event_s = cpu_per_event_s

    def write(self, batch: Sequence[ev.Event]) -> int:
        if len(batch) > 1:
            time.sleep(self.sleep_s)
        deadline = time.process_time() + self.cpu_per_event_s * len(batch)
        while time.process_time() < deadline:
            pass
        return len(batch)


class BurnFactory:
    """Builds a :class:`BurnWriter` in the writer processes (picklable for spawn)."""

    def __init__(self, sleep_s: float, cpu_per_event_s: float) -> None:
        self.sleep_s = sleep_s
        self.cpu_per_event_s = cpu_per_event_s

    def __call__(self) -> BurnWriter:
        return BurnWriter(self.sleep_s, self.cpu_per_event_s)


# False negatives


@linux_only
def test_starved_after_database_wait_raised(hog: int) -> None:
    # The writer waits for the database (sleeping) when the watch takes its first look,
    # then needs the CPU for the rest of the batch and gets almost none of it. The watch
    # follows a thread from the first look at which it is runnable, so it raises the
    # processes well before timeout_s.
    writer = ProcessWriter(BurnFactory(sleep_s=1.0, cpu_per_event_s=0.3), timeout_s=12.0,
                           priority=WriterPriority(starved_after_s=0.6))
    try:
        # Warmed up first, so the process is not busy importing when the batch arrives.
        assert writer.write(_messages(1, "warm")) == 1
        _pin(writer._process.pid, hog)
        began = time.monotonic()
        outcome = "written"
        try:
            writer.write(_messages(5, "fn"))
        except OperationalError as error:
            outcome = str(error.orig)
        took = time.monotonic() - began
        assert writer.priority_raises == 1, f"after {took:.1f} s: {outcome}"
        assert "starved" in outcome
        assert took < 6.0
    finally:
        writer.close()


# False positives


@linux_only
def test_processes_sharing_cpu_not_restarted() -> None:
    # Three writer processes on a host with one free CPU (or a container limited to one)
    # share it: each runs a third of the time, runnable throughout. Nothing starves them,
    # and processes under the batch policy would share the CPU the same way, so killing
    # them only throws their batch away.
    cpu = min(os.sched_getaffinity(0))
    writer = ProcessWriter(BurnFactory(sleep_s=0.0, cpu_per_event_s=0.03), processes=3,
                           split_min_batch=10, timeout_s=30.0,
                           priority=WriterPriority(starved_after_s=0.6))
    try:
        writer.start()
        for pid in _writer_pids(writer):
            _pin(pid, cpu)
        batch = _messages(90, "fp", users=90)
        outcome = "written"
        try:
            assert writer.write(batch) == 90
        except OperationalError as error:
            outcome = str(error.orig)
        assert writer.priority_raises == 0, outcome
        assert outcome == "written"
    finally:
        writer.close()


# Exactly once across a raise


@linux_only
def test_raise_postgresql_partner_stores_once(hog: int, postgres_url: str) -> None:
    # Pipelined batches split between the child and its partner, both starved: the raise
    # kills both while batches are in flight, and the recorder writes them again.
    writer = ProcessWriter(functools.partial(build_writer, postgres_url, sentiment=True),
                           processes=2, split_min_batch=20, timeout_s=60.0,
                           priority=WriterPriority(starved_after_s=0.6, calm_s=60.0))
    recorder = Recorder(writer, RecorderSettings(batch_size=100, batch_interval_s=0.05))
    try:
        writer.start()
        starved = _writer_pids(writer)
        for pid in starved:
            _pin(pid, hog)
        recorder.start()
        events = _messages(400, "once", users=40)
        for event in events:
            assert recorder.submit(event)
        assert recorder.flush(60)
        assert writer.priority_raises >= 1
        assert writer._process.pid not in starved
        assert not recorder.stats().dropped
    finally:
        recorder.stop()
        writer.close()
    assert _count_keys(postgres_url, "once") == (400, 400)


@linux_only
def test_pipelined_tickets_across_raise(hog: int, tmp_path: Path) -> None:
    # Two submits, then the first result starves. Both tickets fail as retryable, the next
    # submit goes to a new process under the batch policy, and a write again stores each
    # event once.
    url = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=True),
                           priority=WriterPriority(starved_after_s=0.6, calm_s=60.0))
    try:
        writer.start()
        _pin(writer._process.pid, hog)
        first, second = _messages(300, "t1"), _messages(300, "t2")
        tickets = [writer.submit(first), writer.submit(second)]
        for ticket in tickets:
            with pytest.raises(OperationalError):
                writer.result(ticket)
        assert writer.priority_raises == 1
        with pytest.raises(OperationalError, match="stopped before writing"):
            writer.result(tickets[0])
        assert writer.write(first) == 300
        assert writer.write(second) == 300
        assert os.sched_getscheduler(writer._process.pid) == os.SCHED_BATCH
    finally:
        writer.close()
    assert _count_keys(url, "t1") == (300, 300)
    assert _count_keys(url, "t2") == (300, 300)


# Waits that are not starvation


@linux_only
def test_postgresql_lock_wait_not_restarted(postgres_url: str) -> None:
    writer = ProcessWriter(functools.partial(build_writer, postgres_url, sentiment=False),
                           timeout_s=30.0, priority=WriterPriority(starved_after_s=0.4))
    locker = make_engine(postgres_url)
    try:
        writer.start()
        assert writer.write(_messages(2, "lockwarm")) == 2
        with locker.connect() as connection:
            connection.execute(text(f"LOCK TABLE {Message.__tablename__} "
                                    "IN ACCESS EXCLUSIVE MODE"))
            result: list[object] = []
            worker = threading.Thread(
                target=lambda: result.append(_write_or_error(writer, _messages(5, "lock"))))
            worker.start()
            time.sleep(2.5)
            connection.rollback()
            worker.join(30)
        assert result == [5]
        assert writer.priority_raises == 0
    finally:
        writer.close()
        locker.dispose()
    assert _count_keys(postgres_url, "lock0") == (5, 5)


def _write_or_error(writer: ProcessWriter, batch: Sequence[ev.Event]) -> object:
    try:
        return writer.write(batch)
    except OperationalError as error:
        return str(error.orig)


# Settings


def test_bad_policy_message_quotes_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatmw"):
        priority = WriterPriority.from_environ({"CHATMW_WRITER_POLICY": "Realtime"})
    assert priority.idle
    assert "got 'Realtime'" in caplog.text, caplog.text


# Systems without the idle policy


def test_no_idle_support_waits_plainly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(writer_priority, "IDLE_SUPPORTED", False)
    priority = WriterPriority(starved_after_s=0.2)
    assert not priority.uses_idle
    assert priority.start_argument(raised=True) == (5, None)
    url = _sqlite(tmp_path)
    writer = ProcessWriter(functools.partial(build_writer, url, sentiment=False),
                           priority=priority)
    watched: list[object] = []
    monkeypatch.setattr("chatmw.writer_process.StarvationWatch",
                        lambda *args: watched.append(args))
    try:
        assert writer.write(_messages(4, "nl")) == 4
        if hasattr(os, "SCHED_BATCH"):
            assert os.sched_getscheduler(writer._process.pid) == os.SCHED_BATCH
    finally:
        writer.close()
    assert watched == []
    assert writer.priority_raises == 0
    assert _count_keys(url, "nl") == (4, 4)
