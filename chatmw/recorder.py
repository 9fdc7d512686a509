"""The recorder: the only path from sources to the store.

Sources call :meth:`Recorder.submit` on the request path. It puts the event on a bounded
in-memory queue and returns at once; it never blocks, never touches the database and
never raises. A background thread drains the queue in batches (closed by count or by
time), runs the writer, retries retryable failures with backoff, and hands what it could
not write to the optional spool. Every loss is counted by reason and logged.

With a replayable spool (:class:`chatmw.spool.FileSpool`) the recorder has three states:

- ``healthy``: batches are written directly; events that reached the spool by another
  path (durable submits, queue overflow) are replayed as they come.
- ``spooling``: a batch failed after every retry, so every new batch goes to the spool
  and the store is probed every ``probe_interval_s`` by replaying the oldest spooled
  batch.
- ``replaying``: the store works again; new batches still go to the spool, so that they
  are stored after the older ones, until replay has emptied it.

When the queue is full, :meth:`Recorder.submit` hands the event to a bounded overflow
buffer instead of dropping it. A separate spill thread appends that buffer to the spool,
so the fsync of a spool append never runs on the request path. Only
:meth:`Recorder.submit_durable` fsyncs on the caller's thread, because its caller waits
for exactly that guarantee.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sqlalchemy.exc import DBAPIError, OperationalError

from chatmw.events import Event
from chatmw.exchange import Exchange, expand_all

__all__ = [
    "Recorder",
    "RecorderSettings",
    "Spool",
    "ReplayableSpool",
    "BatchWriter",
    "RecorderStats",
    "HEALTHY",
    "SPOOLING",
    "REPLAYING",
]

logger = logging.getLogger("chatmw")

HEALTHY = "healthy"
SPOOLING = "spooling"
REPLAYING = "replaying"


class BatchWriter(Protocol):
    """Anything that writes a batch of events in one transaction.

    A writer whose ``expands_exchanges`` attribute is true takes chat exchanges
    (:class:`chatmw.exchange.Exchange`) as they are, decodes them itself, and returns the
    number of events written; other writers get the decoded events.

    A writer may also offer ``submit(batch)``, which hands a batch over and returns a
    ticket, and ``result(ticket)``, which waits for that batch and returns what ``write``
    would have returned or raises what it would have raised. The recorder then hands the
    next batch over before it reads the result of the previous one.
    """

    def write(self, batch: Sequence[Event]) -> int | None: ...


class Spool(Protocol):
    """Durable storage for batches the store could not take; replayed when it returns."""

    def append(self, batch: Sequence[Event]) -> bool: ...


@runtime_checkable
class ReplayableSpool(Protocol):
    """A spool the recorder can replay: read the oldest batches, then commit or reject them.

    :class:`chatmw.spool.FileSpool` is the implementation; ``read_next`` returns an object
    with ``events`` and ``error`` attributes, or ``None`` when nothing is pending.
    """

    def append(self, batch: Sequence[Event]) -> bool: ...

    def read_next(self, max_events: int) -> object | None: ...

    def commit(self, chunk: object) -> None: ...

    def reject(self, chunk: object, reason: str) -> None: ...

    def pending_events(self) -> int: ...


@dataclass(slots=True)
class RecorderSettings:
    """Settings of the recorder.

    - ``queue_size``: the maximum number of events waiting in memory.
    - ``batch_size``, ``batch_interval_s``: a batch closes at this count or age.
    - ``retries``, ``retry_backoff_s``: retries of a failing write; the backoff doubles.
    - ``flush_timeout_s``: the time limit of the flush on shutdown.
    - ``overflow_size``: with a spool, the events that may wait for the spill thread
      when the queue is full.
    - ``probe_interval_s``: the time between attempts to reach a failing store.
    - ``replay_budget_s``: how long one replay turn may run before new events are taken in.
    """

    queue_size: int = 10_000
    batch_size: int = 2000
    batch_interval_s: float = 0.2
    retries: int = 3
    retry_backoff_s: float = 0.2
    flush_timeout_s: float = 10.0
    overflow_size: int = 10_000
    probe_interval_s: float = 1.0
    replay_budget_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("queue_size", "batch_size", "overflow_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_interval_s", "retry_backoff_s", "flush_timeout_s",
                     "probe_interval_s", "replay_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """A snapshot of the recorder's counters.

    ``spooled`` counts events handed to the spool, ``replayed`` events written from it;
    ``write_seconds_sum`` and ``write_batches`` add up the successful writes.
    """

    submitted: int
    written: int
    queue_depth: int
    dropped: dict[str, int]
    spooled: int
    failed_batches: int
    last_write_seconds: float | None
    state: str = HEALTHY
    replayed: int = 0
    overflow_depth: int = 0
    write_seconds_sum: float = 0.0
    write_batches: int = 0
    state_changes: dict[str, int] = field(default_factory=dict)


_STOP = object()
_WAKE = object()


class _EventQueue(queue.Queue[object]):
    """A :class:`queue.Queue` with cheaper calls for the request path and the writer thread.

    ``put_nowait`` and ``get_nowait`` cost several Python calls per item (two conditions,
    notifications). :meth:`offer` appends under the queue's lock and notifies only on the
    change from empty, when a consumer can be waiting. :meth:`take` removes many items
    under one lock. Both assume a single consumer thread, as the recorder has.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        # The length at which offer rejects items: maxsize while open, 0 once closed.
        self.limit = maxsize

    def close(self) -> None:
        """Make every later :meth:`offer` return 0. Items already queued stay."""
        with self.mutex:
            self.limit = 0

    def reopen(self) -> None:
        """Accept items again, up to ``maxsize``."""
        with self.mutex:
            self.limit = self.maxsize

    def offer(self, item: object) -> int:
        """Append ``item`` unless the queue is full or closed; return the new length, or 0."""
        with self.mutex:
            items = self.queue
            if len(items) >= self.limit:
                return 0
            items.append(item)
            self.unfinished_tasks += 1
            depth = len(items)
            if depth == 1:
                self.not_empty.notify()
            return depth

    def take(self, limit: int) -> list[object]:
        """Remove and return up to ``limit`` items in order, ending after a stop marker."""
        batch: list[object] = []
        with self.mutex:
            items = self.queue
            while items and len(batch) < limit:
                item = items.popleft()
                batch.append(item)
                if item is _STOP:
                    break
            if batch:
                self.not_full.notify(len(batch))
        return batch


def is_retryable(error: BaseException) -> bool:
    """Return whether a failed write may succeed if tried again (connection or lock errors)."""
    if isinstance(error, OperationalError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class _WriteFailed(Exception):
    """A write failed with a retryable error; the batch was not stored."""


class Recorder:
    """Bounded queue plus background writer thread. Start it before submitting events.

    ``transform`` (for example pseudonymisation) is applied to every event exactly once,
    before it is written or spooled. Events replayed from the spool are not transformed
    again. An event whose transform raises is dropped (reason ``transform_error``) rather
    than stored untransformed.
    """

    def __init__(self, writer: BatchWriter, settings: RecorderSettings | None = None,
                 spool: Spool | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 transform: Callable[[Event], Event] | None = None) -> None:
        self.writer = writer
        self.settings = settings or RecorderSettings()
        self.spool = spool
        self._replayable_for: object = object()
        self._replayable = False
        self.transform = transform
        self._sleep = sleep
        self._queue = _EventQueue(maxsize=self.settings.queue_size)
        # Set when a full batch is queued (or on stop and wake): the writer thread waits on it
        # once per batch, because waking it on every submitted event costs the host
        # application a thread switch and an interpreter-lock handover per event.
        self._batch_ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._spill_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._submitted = 0
        self._written = 0
        self._spooled = 0
        self._replayed = 0
        self._failed_batches = 0
        self._dropped: Counter[str] = Counter()
        self._state_changes: Counter[str] = Counter()
        self._last_write_s: float | None = None
        self._write_seconds_sum = 0.0
        self._write_batches = 0
        # Events taken by submit and not yet written, spooled or dropped, guarded by _lock.
        # _idle is set or cleared only under _lock too, so that flush never misses one.
        self._outstanding = 0
        self._idle = threading.Event()
        self._idle.set()
        self._state = HEALTHY
        self._next_probe = 0.0
        # The state of the current writer thread. A thread that a timed-out stop abandoned
        # keeps its own (through _local), so a recorder started again gets a fresh one.
        self._writer_run = _WriterRun()
        self._local = threading.local()
        # Where a failed replay of a spool chunk stopped: the chunk's segment and start, and
        # how many of its first events were counted (stored, or rejected as bad events).
        self._replay_progress: tuple[tuple[int, int], int] | None = None
        self._overflow: collections.deque[Event] = collections.deque()
        self._overflow_ready = threading.Condition()
        # Set by stop for the current spill thread. Each spill thread has its own, so a
        # recorder started again never lets the previous one run on.
        self._spill_stop = threading.Event()
        # Held by stop and start, so that they run one after the other.
        self._stop_lock = threading.Lock()
        # Set by stop once the writer thread has ended, before the queue closes. Cleared by
        # start after the queue opens again (see _submit_stopped).
        self._stopped = False

    def _current(self) -> _WriterRun:
        # The state of the calling writer thread, or of the current one for other threads.
        run: _WriterRun | None = getattr(self._local, "run", None)
        return self._writer_run if run is None else run

    @property
    def state(self) -> str:
        """``healthy``, ``spooling`` or ``replaying`` (see the module documentation)."""
        return self._state

    @property
    def replayable(self) -> bool:
        """Whether the spool can be replayed (it is a :class:`ReplayableSpool`)."""
        # A protocol isinstance check inspects every method, and this runs for every event:
        # the result is kept until the spool is replaced.
        spool = self.spool
        if spool is not self._replayable_for:
            self._replayable = isinstance(spool, ReplayableSpool)
            self._replayable_for = spool
        return self._replayable

    # Request path

    def submit(self, event: Event) -> bool:
        """Queue ``event`` for writing. Returns ``False`` (and counts it) when it was dropped.

        When the queue is full and a spool is set, the event goes to the overflow buffer,
        which the spill thread appends to the spool. It is dropped (reason ``queue_full``)
        only when that buffer is full too. After :meth:`stop`, no thread writes queued
        events, so the event is appended to the spool at once, for the next start to
        replay, or dropped (reason ``recorder_stopped``) when there is no spool. Events
        submitted before the first :meth:`start` wait in the queue for it.
        """
        # Runs on the bot's event loop for every exchange, so it takes one lock: the event is
        # counted as outstanding before the put (a flush never misses it) and as submitted
        # only once queued (the Prometheus counter never goes down). stats() also takes the
        # queue's mutex inside _lock. _idle is set only while nothing is outstanding.
        with self._lock:
            self._outstanding += 1
            if self._outstanding <= 1:
                self._idle.clear()
            try:
                depth = self._queue.offer(event)
            except Exception:  # noqa: BLE001 - the bot's request path must never see our errors
                depth = -1
            if depth > 0:
                self._submitted += 1
        if depth < 0:
            self._reject("submit_error")
            return False
        if not depth:
            return self._overflow_put(event)
        if depth == self.settings.batch_size:
            # The writer thread waits for this only after it found the queue empty, so the
            # queue passes this length again before the next wait.
            self._batch_ready.set()
        return True

    def _reject(self, reason: str) -> None:
        # Counts an event that submit could not queue as dropped, and no longer outstanding.
        self._count_drop(reason, 1)
        self._finish(1)

    def _begin(self, count: int) -> None:
        with self._lock:
            self._outstanding += count
            if self._idle.is_set():
                self._idle.clear()

    def _finish(self, count: int) -> None:
        with self._lock:
            self._outstanding -= count
            if self._outstanding <= 0 and not self._spool_work_pending():
                self._idle.set()

    def _spool_work_pending(self) -> bool:
        # Spooled events count as handled while the store is down, and after stop because no
        # thread replays them before the next start. Otherwise they count as pending.
        if not self.replayable or self._state == SPOOLING or self._stopped:
            return False
        return bool(self.spool.pending_events())  # type: ignore[union-attr]

    def submit_durable(self, events: Sequence[Event]) -> bool:
        """Store ``events`` in the spool (fsync) before returning; the writer stores them later.

        Call it before acknowledging a webhook: once it returns ``True`` the events survive
        a crash or SIGKILL of this process and are replayed on the next start. It blocks
        for one append and fsync of the spool file (typically a few milliseconds on local
        disk). Returns ``False`` when there is no replayable spool, the spool is full or
        the append failed. The events were then queued as by :meth:`submit` (when there
        was room), and the caller should respond to the platform with an error status so
        that it retries. Never raises.
        """
        if not events:
            return True
        if not self.replayable:
            for event in events:
                self.submit(event)
            return False
        try:
            batch = self._transform(list(events))
            stored = self.spool.append(batch)  # type: ignore[union-attr]
        except Exception as error:  # noqa: BLE001 - the request path must never see our errors
            logger.error("durable submit failed for %d events: %s", len(events), _describe(error))
            stored = False
            batch = []
        if not stored:
            for event in batch:
                self._enqueue_transformed(event)
            return False
        with self._lock:
            self._submitted += len(batch)
            self._spooled += len(batch)
            # After stop no thread replays the spool before the next start, which clears
            # _idle itself when the spool has events.
            stopped = self._stopped
            if not stopped:
                self._idle.clear()
        if not stopped:
            self._wake()
        return True

    def _enqueue_transformed(self, event: Event) -> None:
        # The event was transformed already: the marker keeps the writer from doing it again.
        self._begin(1)
        if not self._queue.offer(_Transformed(event)):
            reason = "queue_full"
            if self._stopped:
                # A durable submit after Runtime.stop closed the spool: the spool rejected
                # the event, as it rejects the events that submit spools then.
                closed = getattr(self.spool, "closed", False)
                reason = "spool_closed" if closed else "recorder_stopped"
            self._count_drop(reason, 1)
            self._finish(1)
            return
        with self._lock:
            self._submitted += 1

    def _overflow_put(self, event: Event) -> bool:
        # The event was counted as outstanding, and not yet as submitted, by submit.
        if self._stopped:
            return self._submit_stopped(event)
        if not self.replayable or self._spill_thread is None:
            self._reject("queue_full")
            return False
        with self._overflow_ready:
            # Once the stop was signalled (under this lock), the spill thread may have ended:
            # an event added now would never reach the spool, and a flush would wait for it.
            if len(self._overflow) >= self.settings.overflow_size or self._spill_stop.is_set():
                full = True
            else:
                full = False
                self._overflow.append(event)
                self._overflow_ready.notify()
        if full:
            self._reject("queue_full")
            return False
        with self._lock:
            self._submitted += 1
        return True

    def _submit_stopped(self, event: Event) -> bool:
        # The queue is closed because no writer thread takes events any more. The event is
        # spooled here (the caller's thread), or counted as dropped.
        batch = self._transform([event])
        spooled = bool(batch) and self._give_up(batch, "recorder_stopped")
        if spooled:
            with self._lock:
                self._submitted += 1
        self._finish(1)
        return spooled

    def _wake(self) -> None:
        # A full queue means the writer is busy and looks at the spool after this batch. A
        # closed one means no writer thread runs, so the marker would only stay queued.
        self._queue.offer(_WAKE)
        self._batch_ready.set()

    # Lifecycle

    def start(self) -> None:
        """Start the writer thread, and the spill thread when there is a spool (idempotent).

        A start called while a stop runs waits for the stop to end.
        """
        # A start that ran inside a stop would have its queue closed by that stop, and its
        # thread forgotten.
        with self._stop_lock:
            self._start()

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        run = self._writer_run = _WriterRun()
        self._queue.reopen()
        self._stopped = False
        if self.replayable:
            self._spill_stop = threading.Event()
            self._spill_thread = threading.Thread(target=self._spill, args=(self._spill_stop,),
                                                  name="chatmw-spill", daemon=True)
            self._spill_thread.start()
            if self.spool.pending_events():  # type: ignore[union-attr]
                with self._lock:
                    self._idle.clear()
        self._thread = threading.Thread(target=self._run, args=(run,), name="chatmw-recorder",
                                        daemon=True)
        self._thread.start()
        spool_kind = "none"
        if self.spool is not None:
            spool_kind = "replayable" if self.replayable else "append-only"
        logger.info("recorder started: queue_size=%d batch_size=%d spool=%s",
                    self.settings.queue_size, self.settings.batch_size, spool_kind)

    def stop(self, timeout: float | None = None) -> bool:
        """Flush queued events and stop the threads within ``timeout`` seconds.

        Returns ``True`` when everything queued was written or spooled in time. Events still
        queued at the deadline, and the batch being written then, are spooled if a spool is
        set, otherwise counted as dropped (reason ``shutdown_timeout``). The batch being
        written may then be stored twice, which the idempotent writer stores once. Events
        submitted while the writer thread finishes, after it took its last batch, are
        spooled or dropped (reason ``recorder_stopped``), and so are those submitted later
        (see :meth:`submit`).
        """
        timeout = self.settings.flush_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        # Concurrent stops run one at a time, and starts wait for them. Each stop would queue
        # a stop marker, and the marker left over would end the writer thread of the next
        # start at once.
        if not self._stop_lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            return self._stop(max(0.0, deadline - time.monotonic()))
        finally:
            self._stop_lock.release()

    def _stop(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None:
            return self._queue.empty()
        deadline = time.monotonic() + timeout
        self._writer_run.stop_deadline = deadline
        self._put_stop(deadline)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        # From here on submit spools or drops events itself: no writer thread takes them
        # from the queue. _stopped is set first, so a submit rejected by the closed queue
        # always finds it set.
        self._stopped = True
        self._queue.close()
        completed = not thread.is_alive()
        if completed:
            # Events queued behind the stop marker, before the queue closed.
            drained = self._drain_nowait()
            if drained:
                self._give_up(self._transform_items(drained), "recorder_stopped")
                self._finish(len(drained))
        else:
            # With a spool the batches being written are spooled too: a duplicate is stored
            # once, a batch lost with the process is not stored at all. Handed-over batches
            # are marked under the lock, so the writer thread settling one either counts
            # it before this or leaves it to the spool (see _settle).
            # Only the events of the batch in flight that the thread has not counted yet are
            # spooled. The thread then counts none of them (see _claim).
            handed_events: list[Event] = []
            run = self._writer_run
            with self._lock:
                run.abandoned = True
                if self.spool is not None:
                    for handed in (run.pending, run.following):
                        if handed is not None:
                            handed.spooled_by_stop = True
                            handed_events.extend(handed.batch)
                    if run.in_flight:
                        run.in_flight_spooled = True
                        handed_events.extend(run.in_flight[run.in_flight_done:])
            drained = self._drain_nowait()
            leftover = handed_events + self._transform_items(drained)
            self._give_up(leftover, "shutdown_timeout")
            self._finish(len(drained))
            # Wakes the thread if it waits for events; it leaves because it was abandoned.
            # A stop marker could end the thread of a recorder started again instead.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_WAKE)
            logger.warning("recorder stop timed out after %.1fs: %d events handed to the %s",
                           timeout, len(leftover), "spool" if self.spool else "void (dropped)")
        completed = self._stop_spill(deadline) and completed
        # Sets _idle when nothing is outstanding, because spooled events no longer count.
        self._finish(0)
        if completed:
            logger.info("recorder stopped: written=%d spooled=%d", self._written, self._spooled)
        return completed

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event submitted so far was written or spooled; ``False`` on timeout.

        While the store works, events waiting in the spool are written before this returns.
        """
        return self._idle.wait(timeout)

    def stats(self) -> RecorderStats:
        """Return a snapshot of the counters."""
        with self._lock:
            return RecorderStats(
                submitted=self._submitted, written=self._written, queue_depth=self._queue.qsize(),
                dropped=dict(self._dropped), spooled=self._spooled,
                failed_batches=self._failed_batches, last_write_seconds=self._last_write_s,
                state=self._state, replayed=self._replayed, overflow_depth=len(self._overflow),
                write_seconds_sum=self._write_seconds_sum, write_batches=self._write_batches,
                state_changes=dict(self._state_changes),
            )

    # Spill thread: overflow buffer -> spool

    def _spill(self, stopping: threading.Event) -> None:
        while True:
            with self._overflow_ready:
                while not self._overflow and not stopping.is_set():
                    self._overflow_ready.wait()
                if not self._overflow and stopping.is_set():
                    return
                count = min(len(self._overflow), self.settings.batch_size)
                batch = [self._overflow.popleft() for _ in range(count)]
            self._give_up(self._transform(batch), "spool_full")
            self._finish(len(batch))
            if not stopping.is_set():
                # The writer thread may wait for the queue without a timeout, because it
                # found the spool empty: it replays these events once woken.
                self._wake()

    def _stop_spill(self, deadline: float) -> bool:
        spill = self._spill_thread
        if spill is None:
            return True
        with self._overflow_ready:
            self._spill_stop.set()
            # A spill thread of a timed-out stop may still wait on the condition too.
            self._overflow_ready.notify_all()
        spill.join(max(0.0, deadline - time.monotonic()))
        self._spill_thread = None
        if not spill.is_alive():
            return True
        with self._overflow_ready:
            leftover = list(self._overflow)
            self._overflow.clear()
        # The spill thread did not end in time, so the events left in the overflow are
        # spooled here, as the queued ones are.
        self._give_up(self._transform(leftover), "shutdown_timeout")
        self._finish(len(leftover))
        return False

    # Writer thread

    def _put_stop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.05)
                self._batch_ready.set()
                return
            except queue.Full:
                self._batch_ready.set()
                continue

    def _drain_nowait(self) -> list[object]:
        items: list[object] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not _STOP and item is not _WAKE:
                items.append(item)

    def _run(self, run: _WriterRun) -> None:
        self._local.run = run
        stopping = False
        while not stopping and not run.abandoned:
            items, stopping = self._next_batch()
            handed_over = False
            try:
                handed_over = self._process(items, stopping)
            except Exception as error:  # noqa: BLE001 - the writer thread must outlive its bugs
                logger.exception("recorder loop failed; %d events counted as dropped: %s",
                                 len(items), _describe(error))
                self._count_drop("internal_error", len(items))
                self._sleep(0.1)
            finally:
                if not handed_over:
                    self._finish(len(items))
        self._settle()

    def _process(self, items: list[object], stopping: bool) -> bool:
        # Returns True when the batch of ``items`` is pending (see _handle): its events are
        # finished once its result is read.
        handed_over = False
        if items:
            batch = self._transform_items(items)
            if not getattr(self.writer, "expands_exchanges", False):
                batch = self._expanded(batch)
            if batch:
                handed_over = self._handle(batch, len(items))
        if not stopping and self._current().stop_deadline is None:
            self._replay_turn()
        return handed_over

    def _wait_seconds(self) -> float | None:
        if not self.replayable:
            return None
        if self._state == SPOOLING:
            return max(0.0, self._next_probe - time.monotonic())
        if self._state == REPLAYING or self.spool.pending_events():  # type: ignore[union-attr]
            return 0.0
        return None

    def _next_batch(self) -> tuple[list[object], bool]:
        # Returns the queued items (events, or events marked as transformed) of one batch.
        run = self._current()
        if run.pending is not None and self._queue.empty():
            # Nothing to hand over meanwhile: the pending batch is settled before waiting.
            self._settle()
        if run.abandoned:
            return [], True
        wait = self._wait_seconds()
        try:
            if wait is None:
                item = self._queue.get()
            elif wait > 0:
                item = self._queue.get(timeout=wait)
            else:
                item = self._queue.get_nowait()
        except queue.Empty:
            return [], False
        if item is _STOP:
            return [], True
        batch: list[object] = [] if item is _WAKE else [item]
        closes_at = time.monotonic() + self.settings.batch_interval_s
        while batch and len(batch) < self.settings.batch_size:
            drained = self._queue.take(self.settings.batch_size - len(batch))
            if not drained:
                # Wait once for a full batch (or the batch's age) rather than once per event.
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._batch_ready.wait(remaining)
                self._batch_ready.clear()
                continue
            stopping = drained[-1] is _STOP
            batch.extend(item for item in drained if item is not _WAKE and item is not _STOP)
            if stopping:
                return batch, True
        return batch, False

    def _transform_items(self, items: list[object]) -> list[Event]:
        # Keeps the order of the items; those marked as transformed pass unchanged.
        if not any(isinstance(item, _Transformed) for item in items):
            return self._transform(items)  # type: ignore[arg-type]
        result: list[Event] = []
        for item in items:
            if isinstance(item, _Transformed):
                result.append(item.event)
            else:
                result.extend(self._transform([item]))  # type: ignore[list-item]
        return result

    def _expanded(self, batch: list[Event]) -> list[Event]:
        # The spool and writers that do not decode chat exchanges get their events,
        # transformed here because the exchange itself carried no ids.
        return list(expand_all(batch, self._transform))

    def _transform(self, batch: list[Event]) -> list[Event]:
        if self.transform is None or not batch:
            return batch
        result: list[Event] = []
        for event in batch:
            if event.__class__ is Exchange:
                # An exchange carries no ids: its events get the transform once decoded.
                result.append(event)
                continue
            try:
                result.append(self.transform(event))
            except Exception as error:  # noqa: BLE001 - never store an event untransformed
                logger.error("recorder transform failed for a %s event: %s",
                             type(event).__name__, _describe(error))
                self._count_drop("transform_error", 1)
        return result

    def _handle(self, batch: list[Event], count: int) -> bool:
        # Writes ``batch`` (``count`` queued items). A writer with ``submit`` and ``result``
        # (chatmw.writer_process.ProcessWriter) gets the batch before the result of the
        # previous one is read, so it takes the next batch in while it writes. The batch
        # is then pending and this returns True. Once its result is read, a failed pending
        # batch goes through the same retries, isolation and spool as any other.
        if self.replayable and self._state != HEALTHY:
            self._settle()
            self._give_up(batch, "spool_full")
            return False
        run = self._current()
        submit = getattr(self.writer, "submit", None)
        if submit is not None and run.stop_deadline is None:
            started = time.perf_counter()
            try:
                ticket = submit(batch)
            except Exception as error:  # noqa: BLE001 - written again below, with retries
                logger.warning("recorder hand-over of %d events failed: %s", len(batch),
                               _describe(error))
            else:
                following = _Pending(batch, ticket, count, started)
                # A stop that times out while the previous batch settles spools this one too.
                with self._lock:
                    run.following = following
                self._settle()
                with self._lock:
                    run.pending = following
                    run.following = None
                return True
        self._settle()
        self._write_in_flight(batch)
        return False

    def _write_in_flight(self, batch: list[Event]) -> None:
        run = self._current()
        with self._lock:
            run.in_flight, run.in_flight_done = batch, 0
        try:
            self._write_with_retries(batch)
        finally:
            with self._lock:
                run.in_flight, run.in_flight_done = [], 0

    def _settle(self) -> None:
        """Read the result of the pending batch, if any, and account for it."""
        run = self._current()
        pending = run.pending
        if pending is None:
            return
        try:
            written = self.writer.result(pending.ticket)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - handled as a failed write of the batch
            with self._lock:
                run.pending = None
                abandoned = run.abandoned
                spooled_by_stop = pending.spooled_by_stop
                if not abandoned:
                    # From here on a stop that times out spools it as the batch in flight.
                    run.in_flight, run.in_flight_done = pending.batch, 0
            if not abandoned:
                logger.warning("recorder write failed (%d events): %s; writing them again",
                               len(pending.batch), _describe(error))
                self._write_in_flight(pending.batch)
            elif not spooled_by_stop:
                # stop() gave up without taking this batch: spooled here, or dropped.
                self._give_up(pending.batch, "shutdown_timeout")
        else:
            with self._lock:
                run.pending = None
                spooled_by_stop = pending.spooled_by_stop
            # The writer began this batch when it had finished the previous one.
            now = time.perf_counter()
            # A batch that a timed-out stop spooled is counted there (see stop).
            if not spooled_by_stop:
                self._count_written(pending.batch, written,
                                    now - max(pending.started, run.settled_at))
        finally:
            run.settled_at = time.perf_counter()
            self._finish(pending.count)

    def _write_with_retries(self, batch: list[Event]) -> None:
        # ``batch`` is the batch in flight. Each attempt writes the events not counted yet:
        # those that an isolation of a bad event stored or rejected before a retryable
        # error are not written or counted again.
        run = self._current()
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.retries + 1):
            rest = batch[run.in_flight_done:]
            try:
                self._write_isolating(rest, tracked=True)
                return
            except _WriteFailed as failure:
                if run.abandoned:
                    # A timed-out stop spooled the rest of the batch, if there is a spool.
                    # Without one the rest is counted here.
                    self._give_up(self._claim(len(batch)), "shutdown_timeout")
                    return
                logger.warning("recorder write failed (attempt %d, %d events, retryable=True): %s",
                               attempt + 1, len(rest), failure)
            if attempt == self.settings.retries or self._past_deadline(delay):
                break
            self._sleep(delay)
            delay *= 2
        rest = self._claim(len(batch))
        if not rest:
            # A timed-out stop spooled the rest of the batch meanwhile.
            return
        self._failed(rest, "store_unavailable")
        if self.replayable:
            self._set_state(SPOOLING, "writes failed after retries")
            self._next_probe = time.monotonic() + self.settings.probe_interval_s

    def _past_deadline(self, delay: float) -> bool:
        deadline = self._current().stop_deadline
        return deadline is not None and time.monotonic() + delay >= deadline

    def _write_isolating(self, batch: list[Event], tracked: bool = False,
                         counted: list[int] | None = None) -> None:
        """Write ``batch``; on a non-retryable error split it to isolate the events that fail.

        Raises :class:`_WriteFailed` on a retryable error. Events that fail alone are
        rejected: spooled aside when the spool can keep them, otherwise dropped.

        ``tracked`` is set for the events of the batch in flight, which a timed-out stop
        may spool: they are counted in order, each part only if the stop did not take it.
        ``counted``, when given, has its first item raised by the events counted here.
        """
        run = self._current()
        if tracked and run.in_flight_spooled:
            # A timed-out stop spooled the rest of the batch: the spool's replay writes it.
            return
        started = time.perf_counter()
        try:
            written = self.writer.write(batch)
        except Exception as error:  # noqa: BLE001 - counted, logged, then retried or isolated
            if is_retryable(error):
                raise _WriteFailed(_describe(error)) from error
            if tracked and run.in_flight_spooled:
                # A timed-out stop spooled this batch: the spool's replay isolates its events.
                return
            if len(batch) > 1:
                middle = len(batch) // 2
                self._write_isolating(batch[:middle], tracked, counted)
                self._write_isolating(batch[middle:], tracked, counted)
                return
            logger.warning("recorder write rejected a %s event (retryable=False): %s",
                           type(batch[0]).__name__, _describe(error))
            with self._lock:
                if tracked:
                    if run.in_flight_spooled:
                        return
                    run.in_flight_done += 1
                self._failed_batches += 1
            self._quarantine(batch, f"write_error: {_describe(error)}")
            self._count_drop("write_error", 1)
            if counted is not None:
                counted[0] += 1
            return
        self._count_written(batch, written, time.perf_counter() - started, tracked)
        if counted is not None:
            counted[0] += len(batch)

    def _claim(self, end: int) -> list[Event]:
        """Return the events of the batch in flight before ``end`` that are not counted yet.

        The caller counts the returned events. The list is empty when a timed-out stop
        spooled them.
        """
        run = self._current()
        with self._lock:
            if run.in_flight_spooled:
                return []
            rest = run.in_flight[run.in_flight_done:end]
            run.in_flight_done = max(run.in_flight_done, end)
            return rest

    def _count_written(self, batch: list[Event], written: object, elapsed: float,
                       tracked: bool = False) -> None:
        run = self._current()
        with self._lock:
            if tracked:
                if run.in_flight_spooled:
                    # A timed-out stop spooled this part of the batch, and counted it there.
                    return
                run.in_flight_done += len(batch)
            # A writer that decodes chat exchanges returns the number of events they became.
            self._written += written if isinstance(written, int) else len(batch)
            self._last_write_s = elapsed
            self._write_seconds_sum += elapsed
            self._write_batches += 1

    def _quarantine(self, batch: list[Event], reason: str) -> None:
        quarantine = getattr(self.spool, "quarantine", None)
        if quarantine is None:
            return
        try:
            quarantine(self._expanded(batch), reason)
        except Exception as error:  # noqa: BLE001 - the event is counted as dropped anyway
            logger.error("spool quarantine failed for %d events: %s", len(batch), _describe(error))

    # Replay

    def _replay_turn(self) -> None:
        if not self.replayable:
            return
        if self._state == SPOOLING and time.monotonic() < self._next_probe:
            return
        spool: ReplayableSpool = self.spool  # type: ignore[assignment]
        ends_at = time.monotonic() + self.settings.replay_budget_s
        while True:
            chunk = spool.read_next(self.settings.batch_size)
            if chunk is not None:
                # Replayed events are counted apart from the pending batch's.
                self._settle()
            if chunk is None:
                if self._state != HEALTHY:
                    self._set_state(HEALTHY, "spool replayed")
                return
            if not self._replay_chunk(spool, chunk):
                return
            if time.monotonic() >= ends_at:
                return
            if self._state == HEALTHY and not self._queue.empty():
                return

    def _replay_chunk(self, spool: ReplayableSpool, chunk: object) -> bool:
        error = getattr(chunk, "error", None)
        events: list[Event] = getattr(chunk, "events", [])
        if error:
            spool.reject(chunk, f"undecodable batch: {error}")
            self._count_drop("undecodable", 1)
            return True
        position = _chunk_position(chunk)
        done = 0
        progress = self._replay_progress
        if position is not None and progress is not None and progress[0] == position:
            # The same chunk again: its first events were counted by the failed replay.
            done = min(progress[1], len(events))
        counted = [0]
        written_before = self._written
        try:
            self._write_isolating(events[done:], counted=counted)
        except _WriteFailed as failure:
            # The isolation of a bad event counts the chunk's events in order, so those
            # counted before the error are its first ones, and the next replay skips them.
            if position is not None and counted[0]:
                self._replay_progress = (position, done + counted[0])
            with self._lock:
                self._replayed += self._written - written_before
            if self._state != SPOOLING:
                self._set_state(SPOOLING, f"replay failed: {failure}")
            else:
                logger.info("recorder probe failed, next in %.1fs: %s",
                            self.settings.probe_interval_s, failure)
            self._next_probe = time.monotonic() + self.settings.probe_interval_s
            return False
        self._replay_progress = None
        spool.commit(chunk)
        with self._lock:
            self._replayed += self._written - written_before
        if self._state == SPOOLING:
            self._set_state(REPLAYING, "store reachable again")
        return True

    def _set_state(self, state: str, reason: str) -> None:
        previous, self._state = self._state, state
        if previous == state:
            return
        with self._lock:
            self._state_changes[state] += 1
        pending = self.spool.pending_events() if self.replayable else 0  # type: ignore[union-attr]
        log = logger.info if state == HEALTHY else logger.warning
        log("recorder state: %s -> %s (%s); %d events in the spool", previous, state, reason,
            pending)

    # Losses

    def _failed(self, batch: list[Event], reason: str) -> None:
        with self._lock:
            self._failed_batches += 1
        self._give_up(batch, reason)

    def _give_up(self, batch: list[Event], reason: str) -> bool:
        """Spool ``batch``; count it as dropped with ``reason`` when there is no spool.

        A spool that rejects the batch counts it as ``spool_full``, or as ``spool_closed``
        when the spool was closed (``Runtime.stop`` closes it after the recorder's stop).
        Returns whether the batch was spooled.
        """
        if not batch:
            return False
        if self.spool is not None:
            try:
                batch = self._expanded(batch)
                if self.spool.append(batch):
                    with self._lock:
                        self._spooled += len(batch)
                    return True
                reason = "spool_closed" if getattr(self.spool, "closed", False) else "spool_full"
            except Exception as error:  # noqa: BLE001 - a failing spool must not stop the writer
                logger.error("spool append failed for %d events: %s", len(batch), _describe(error))
                reason = "spool_error"
        self._count_drop(reason, len(batch))
        return False

    def _count_drop(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            self._dropped[reason] += count
            total = self._dropped[reason]
        # Log the first drop of a reason and then every thousandth, so a storm stays readable.
        if total == count or total // 1000 != (total - count) // 1000:
            logger.error("recorder dropped %d events (%s); %d dropped for this reason so far",
                         count, reason, total)


def _chunk_position(chunk: object) -> tuple[int, int] | None:
    # The segment and start offset of a spool chunk, which a later read of the same
    # unreplayed batches repeats. None for a spool whose chunks have no such position.
    segment = getattr(chunk, "segment", None)
    start = getattr(chunk, "start", None)
    if isinstance(segment, int) and isinstance(start, int):
        return segment, start
    return None


@dataclass(slots=True)
class _WriterRun:
    # The state of one writer thread, which a timed-out stop abandons. Fields that a stop
    # reads or sets are changed under the recorder's lock.
    abandoned: bool = False
    stop_deadline: float | None = None
    # The batch the thread writes itself, and how many of its first events it counted.
    # A timed-out stop spools the others and sets in_flight_spooled, so the thread counts
    # none of them after that.
    in_flight: list[Event] = field(default_factory=list)
    in_flight_done: int = 0
    in_flight_spooled: bool = False
    # A batch handed to a pipelining writer whose result is not read yet (see _handle),
    # and the next batch while the pending one settles.
    pending: _Pending | None = None
    following: _Pending | None = None
    settled_at: float = 0.0


@dataclass(slots=True)
class _Pending:
    # A batch handed to the writer whose result has not been read yet.
    batch: list[Event]
    ticket: object
    count: int  # queued items it came from
    started: float
    # Set by a stop that timed out and spooled the batch, under the recorder's lock.
    spooled_by_stop: bool = False


@dataclass(frozen=True, slots=True)
class _Transformed:
    # An event that was transformed before it was queued (after a failed durable submit).
    event: Event


def _describe(error: BaseException) -> str:
    # Database errors can carry statement parameters (message text): log the type and the
    # driver's first line only.
    if isinstance(error, DBAPIError) and error.orig is not None:
        first_line = str(error.orig).splitlines()[0] if str(error.orig) else ""
        return f"{type(error.orig).__name__}: {first_line}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
