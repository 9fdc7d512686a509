"""The recorder: the only path from sources to the store.

Sources call :meth:`Recorder.submit` on the request path. It puts the event on a bounded
in-memory queue and returns at once; it never blocks, never touches the database and
never raises. A background thread drains the queue in batches (closed by count or by
time), runs the writer, retries retryable failures with backoff, and hands what it could
not write to the optional spool. Every loss is counted by reason and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.exc import DBAPIError, OperationalError

from chatmw.events import Event

__all__ = ["Recorder", "RecorderSettings", "Spool", "BatchWriter", "RecorderStats"]

logger = logging.getLogger("chatmw")


class BatchWriter(Protocol):
    """Anything that writes a batch of events in one transaction."""

    def write(self, batch: Sequence[Event]) -> None: ...


class Spool(Protocol):
    """Durable storage for batches the store could not take; replayed when it returns."""

    def append(self, batch: Sequence[Event]) -> bool: ...


@dataclass(slots=True)
class RecorderSettings:
    """Settings of the recorder.

    ``queue_size`` bounds the events waiting in memory; ``batch_size`` and
    ``batch_interval_s`` close a batch by count or by age; ``retries`` and
    ``retry_backoff_s`` govern retries of a failing write (backoff doubles each time);
    ``flush_timeout_s`` bounds the flush on shutdown.
    """

    queue_size: int = 10_000
    batch_size: int = 500
    batch_interval_s: float = 0.2
    retries: int = 3
    retry_backoff_s: float = 0.2
    flush_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("queue_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_interval_s", "retry_backoff_s", "flush_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """A snapshot of the recorder's counters."""

    submitted: int
    written: int
    queue_depth: int
    dropped: dict[str, int]
    spooled: int
    failed_batches: int
    last_write_seconds: float | None


_STOP = object()


def is_retryable(error: BaseException) -> bool:
    """Return whether a failed write may succeed if tried again (connection or lock errors)."""
    if isinstance(error, OperationalError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class Recorder:
    """Bounded queue plus background writer thread. Start it before submitting events."""

    def __init__(self, writer: BatchWriter, settings: RecorderSettings | None = None,
                 spool: Spool | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.writer = writer
        self.settings = settings or RecorderSettings()
        self.spool = spool
        self._sleep = sleep
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.settings.queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._submitted = 0
        self._written = 0
        self._spooled = 0
        self._failed_batches = 0
        self._dropped: Counter[str] = Counter()
        self._last_write_s: float | None = None
        self._idle = threading.Event()
        self._idle.set()

    # Request path

    def submit(self, event: Event) -> bool:
        """Queue ``event`` for writing. Returns ``False`` (and counts it) when it was dropped."""
        # Cleared before the put, so that a flush can never miss an event the writer has not seen.
        self._idle.clear()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count_drop("queue_full", 1)
            return False
        except Exception:  # noqa: BLE001 - the bot's request path must never see our errors
            self._count_drop("submit_error", 1)
            if self._queue.empty():
                self._idle.set()
            return False
        with self._lock:
            self._submitted += 1
        return True

    # Lifecycle

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="chatmw-recorder", daemon=True)
        self._thread.start()
        logger.info("recorder started: queue_size=%d batch_size=%d",
                    self.settings.queue_size, self.settings.batch_size)

    def stop(self, timeout: float | None = None) -> bool:
        """Flush queued events and stop the thread within ``timeout`` seconds.

        Returns ``True`` when everything queued was written or spooled in time. Events still
        queued at the deadline are spooled if a spool is set, otherwise counted as dropped.
        """
        timeout = self.settings.flush_timeout_s if timeout is None else timeout
        thread = self._thread
        if thread is None:
            return self._queue.empty()
        deadline = time.monotonic() + timeout
        self._put_stop(deadline)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        if thread.is_alive():
            leftover = self._drain_nowait()
            self._give_up(leftover, "shutdown_timeout")
            logger.warning("recorder stop timed out after %.1fs: %d events not written",
                           timeout, len(leftover))
            return False
        logger.info("recorder stopped: written=%d", self._written)
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event submitted so far was handled; ``False`` on timeout."""
        return self._idle.wait(timeout)

    def stats(self) -> RecorderStats:
        """Return a snapshot of the counters."""
        with self._lock:
            return RecorderStats(
                submitted=self._submitted, written=self._written, queue_depth=self._queue.qsize(),
                dropped=dict(self._dropped), spooled=self._spooled,
                failed_batches=self._failed_batches, last_write_seconds=self._last_write_s,
            )

    # Writer thread

    def _put_stop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.05)
                return
            except queue.Full:
                continue

    def _drain_nowait(self) -> list[Event]:
        items: list[Event] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not _STOP:
                items.append(item)  # type: ignore[arg-type]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if batch:
                self._write_with_retries(batch)
            if self._queue.empty():
                self._idle.set()

    def _next_batch(self) -> tuple[list[Event], bool]:
        item = self._queue.get()
        if item is _STOP:
            return [], True
        batch: list[Event] = [item]  # type: ignore[list-item]
        closes_at = time.monotonic() + self.settings.batch_interval_s
        while len(batch) < self.settings.batch_size:
            remaining = closes_at - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
        return batch, False

    def _write_with_retries(self, batch: list[Event]) -> None:
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.retries + 1):
            started = time.perf_counter()
            try:
                self.writer.write(batch)
            except Exception as error:  # noqa: BLE001 - counted, logged, then retried or given up
                retryable = is_retryable(error)
                logger.warning("recorder write failed (attempt %d, %d events, retryable=%s): %s",
                               attempt + 1, len(batch), retryable, _describe(error))
                if not retryable:
                    self._failed(batch, "write_error")
                    return
                if attempt < self.settings.retries:
                    self._sleep(delay)
                    delay *= 2
                continue
            with self._lock:
                self._written += len(batch)
                self._last_write_s = time.perf_counter() - started
            return
        self._failed(batch, "store_unavailable")

    def _failed(self, batch: list[Event], reason: str) -> None:
        with self._lock:
            self._failed_batches += 1
        self._give_up(batch, reason)

    def _give_up(self, batch: list[Event], reason: str) -> None:
        if not batch:
            return
        if self.spool is not None:
            try:
                if self.spool.append(batch):
                    with self._lock:
                        self._spooled += len(batch)
                    return
            except Exception as error:  # noqa: BLE001 - a failing spool must not stop the writer
                logger.error("spool append failed for %d events: %s", len(batch), _describe(error))
        self._count_drop(reason, len(batch))

    def _count_drop(self, reason: str, count: int) -> None:
        with self._lock:
            self._dropped[reason] += count
            total = self._dropped[reason]
        # Log the first drop of a reason and then every thousandth, so a storm stays readable.
        if total == count or total // 1000 != (total - count) // 1000:
            logger.error("recorder dropped %d events (%s); %d dropped for this reason so far",
                         count, reason, total)


def _describe(error: BaseException) -> str:
    # Database errors can carry statement parameters (message text): log the type and the
    # driver's first line only.
    if isinstance(error, DBAPIError) and error.orig is not None:
        first_line = str(error.orig).splitlines()[0] if str(error.orig) else ""
        return f"{type(error.orig).__name__}: {first_line}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
