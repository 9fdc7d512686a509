"""A batch writer that runs the store writer in a child process.

The recorder's writer thread shares the interpreter lock with the host application. With
the writer in the same process, its Python work (building rows, scoring sentiment,
reading results back) competes with the application's event loop for the lock and for one
CPU, and the loop's requests wait behind it. :class:`ProcessWriter` keeps the recorder as
it is (queue, batches, retries, spool) and only moves ``write(batch)`` into a child
process: the writer thread pickles the batch, sends it down a pipe and waits, with the
lock released, for the child's reply. With :meth:`ProcessWriter.submit` the recorder sends
the next batch before it reads that reply, so the child receives the next batch while it
writes the current one and does not wait for the writer thread between batches.

The child builds its own writer by calling ``factory`` (a picklable callable, such as
``functools.partial(build_writer, url)``), because engines and connections cannot cross a
process boundary. A feature that registers handlers, enrichers or preprocessors on the
writer must do so inside the factory.

On PostgreSQL :class:`ProcessWriter` starts partner processes beside the child
(``CHATMW_WRITER_PROCESSES``, 2 writer processes in all by default). The child splits each
large batch among itself and its partners by user: each process writes the events of its
users in its own transaction, at the same time as the others, and the child replies once
all of them are done.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import pickle
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, NoReturn

from sqlalchemy.exc import OperationalError

from chatmw import collector
from chatmw.config import DEFAULT_PROCESSES, MAX_PROCESSES, writer_processes
from chatmw.events import Event, field_reader
from chatmw.events import _rebuild as rebuild_event
from chatmw.events_business import Spend
from chatmw.exchange import EXCHANGE_PARTS, Exchange
from chatmw.recorder import BatchWriter, _describe, is_retryable
from chatmw.writer_priority import (
    StarvationWatch,
    WriterPriority,
    enter_idle_policy,
    runs_idle,
    start_priority,
)

__all__ = ["PartnerFactory", "ProcessWriter", "SPLIT_MIN_BATCH", "WriteRejected",
           "WriterSnapshot", "build_writer", "settle_collector", "split_by_user",
           "start_process_writer", "sum_results", "writer_factory"]

logger = logging.getLogger("chatmw")

# Events pickled per message to the writer process: about a quarter of a millisecond each.
SEND_CHUNK = 100
# Bytes of pickled chunks written at once, and read at once. A batch of 2,000 FAQ-bot
# exchanges (about 460 KB pickled) then takes eight writes, and the child reads one group
# while the next is pickled.
_WRITE_BYTES = 64 * 1024
# The tag of a chunk sent as rows of event classes and field values.
_EVENT_ROWS = "event-rows"
# Batches of fewer items (events and undecoded exchanges, as the recorder sent them) are
# written by the child alone. The recorder closes a batch at 2,000 items or after 0.2 s by
# default, so its batches reach 1,000 items when events arrive faster than 5,000 a second
# or the writer falls behind, which is when the partners are needed. Below that, one
# process keeps up, and the partners would only compete with the application for CPU.
SPLIT_MIN_BATCH = 1000
# Events that belong to no user. They go to the child's own part.
_USERLESS_EVENTS = (Spend,)


class WriteRejected(Exception):
    """The child's writer rejected the batch with an error that a retry would not fix."""


def build_writer(database_url: str, session_gap_ms: int = 30 * 60 * 1000,
                 sentiment: bool = True) -> BatchWriter:
    """Build the standard store writer (with the sentiment enricher when asked)."""
    from chatmw.store.engine import make_engine
    from chatmw.store.writer import Writer, WriterSettings

    writer = Writer(make_engine(database_url), WriterSettings(session_gap_ms=session_gap_ms))
    if sentiment:
        from chatmw.sentiment import sentiment_enricher

        writer.enrichers.append(sentiment_enricher)
    return writer


def writer_factory(database_url: str, session_gap_ms: int = 30 * 60 * 1000,
                   sentiment: bool = True) -> Callable[[], BatchWriter]:
    """Return a picklable factory of :func:`build_writer` for :class:`ProcessWriter`."""
    return functools.partial(build_writer, database_url, session_gap_ms, sentiment)


class WriterSnapshot:
    """A factory that returns a copy of ``writer`` in the child process.

    The writer is pickled when the child starts (see :meth:`chatmw.store.writer.Writer.__getstate__`),
    so handlers, enrichers, preprocessors and the transform installed on it until then are
    all in the copy. Everything on the writer must therefore be picklable: module-level
    functions and instances of module-level classes, not closures.
    """

    def __init__(self, writer: Any, rollup_interval_s: float | None = None) -> None:
        self.writer = writer
        # The rollup refresher (chatmw.metrics.rollup_refresh) runs in the child too, when
        # set, so that its reads and recounts stay off the application's interpreter.
        self.rollup_interval_s = rollup_interval_s
        self._refresher: Any = None

    def __call__(self) -> Any:
        if self.rollup_interval_s is not None:
            from chatmw.metrics.rollup_refresh import Refresher

            self._refresher = Refresher(self.writer.engine, self.rollup_interval_s)
            self._refresher.start()
        return self.writer

    def stop(self) -> None:
        """Stop the rollup refresher, if this copy started one."""
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None


class PartnerFactory:
    """Builds the writer of a partner process from the factory of the writer process.

    A partner writes the parts of batches that the writer process sends it. It runs no
    rollup refresher: the writer process runs the one its factory sets up.
    """

    def __init__(self, factory: Callable[[], BatchWriter]) -> None:
        self.factory = factory

    def __call__(self) -> Any:
        if isinstance(self.factory, WriterSnapshot):
            return self.factory.writer
        return self.factory()


def start_process_writer(writer: Any, database_url: str,
                         rollup_interval_s: float | None = None) -> ProcessWriter | None:
    """Return a :class:`ProcessWriter` running a copy of ``writer``, or ``None`` when it cannot.

    An in-memory SQLite database exists in one process only, and a writer with something
    that cannot be pickled cannot be copied: both keep the writer in the recorder's thread,
    with a warning for the second. With ``rollup_interval_s`` the child also runs the rollup
    refresher at that interval. The number of writer processes is read from
    ``CHATMW_WRITER_PROCESSES`` (see :func:`writer_processes`).
    """
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    if multiprocessing.current_process().daemon:
        # A daemonic process (some process managers' workers) may not start children.
        logger.info("the store writer stays in this process: daemonic processes cannot "
                    "start a writer process")
        return None
    try:
        pickle.dumps(writer)
    except Exception as error:  # noqa: BLE001 - any pickling failure keeps the thread writer
        logger.warning("the store writer stays in this process: it cannot be copied to a "
                       "writer process (%s: %s)", type(error).__name__, error)
        return None
    try:
        processes = writer_processes(url.get_backend_name())
    except ValueError as error:
        logger.warning("%s; the store writer uses %d processes", error, DEFAULT_PROCESSES)
        processes = DEFAULT_PROCESSES
    return ProcessWriter(WriterSnapshot(writer, rollup_interval_s), local_writer=writer,
                         processes=processes)


def _serve(connection: Connection, factory: Callable[[], BatchWriter],
           partner_connections: Sequence[Connection] = (),
           split_min_batch: int = SPLIT_MIN_BATCH,
           priority: tuple[int, float | None] = (0, None)) -> None:
    # The loop of the child and of each partner: receive one batch, send one (ok,
    # retryable, description, written, decoder counts) reply. The child writes parts of
    # its batches of at least ``split_min_batch`` items through ``partner_connections``.
    # ``priority`` is WriterPriority.start_argument's niceness and time until idle.
    idle_at = start_priority(priority)
    writer = factory()
    settle_collector()
    partners = [_PartnerLink(partner) for partner in partner_connections]
    try:
        _write_batches(connection, writer, partners, split_min_batch, idle_at)
    finally:
        for partner in partners:
            partner.close()
        stop = getattr(factory, "stop", None)
        if stop is not None:
            stop()


def _write_batches(connection: Connection, writer: BatchWriter,
                   partners: Sequence[_PartnerLink] = (),
                   split_min_batch: int = SPLIT_MIN_BATCH,
                   idle_at: float | None = None) -> None:
    # ``idle_at``: the time.monotonic() after which the process enters the idle policy,
    # checked between batches.
    inbox = _Inbox(connection, _Preparer(writer, partners, split_min_batch))
    while True:
        if idle_at is not None and time.monotonic() >= idle_at:
            enter_idle_policy()
            idle_at = None
        received = inbox.next()
        if received is None:
            return
        if received.unreadable:
            connection.send((False, False, received.unreadable, 0, {}))
            continue
        try:
            written = _write_received(writer, received)
        except _PartnerLost as error:
            logger.error("writer partner process failed: %s; the writer process ends, and its "
                         "processes start again on the next write", error)
            connection.send((False, True, str(error), 0, {}))
            return
        except Exception as error:  # noqa: BLE001 - sent back to the parent, which decides
            connection.send((False, is_retryable(error), _describe(error), 0, {}))
            continue
        written = written if isinstance(written, int) else len(received.events)
        connection.send((True, False, "", written, _decoder_counts(received.batch)))


def _write_received(writer: BatchWriter, received: _Received) -> int:
    # Writes this process's part of the batch while the partners write theirs. Every part
    # is waited for, and the first error is raised: the recorder then writes the whole
    # batch again, and the parts already stored are stored once (writes are idempotent).
    if received.lost:
        raise _PartnerLost(received.lost)
    if received.own is None:
        return writer.write(received.events)
    failure: Exception | None = None
    written = 0
    try:
        if received.own:
            written = writer.write(received.own)
    except Exception as error:  # noqa: BLE001 - raised once the partners have replied
        failure = error
    return sum_results([partner.result for partner in received.sent], written, failure,
                       immediate=(_PartnerLost,))


def sum_results(results: Iterable[Callable[[], int]], total: int = 0,
                failure: Exception | None = None,
                immediate: tuple[type[BaseException], ...] = ()) -> int:
    """Call each of ``results`` and return ``total`` plus what they returned.

    Every call is made even after one raised, and then the first error (``failure`` when
    given) is raised. An error of an ``immediate`` type is raised at once.
    """
    for result in results:
        try:
            total += result()
        except immediate:
            raise
        except Exception as error:  # noqa: BLE001 - raised once every call has returned
            if failure is None:
                failure = error
    if failure is not None:
        raise failure
    return total


class _PartnerLost(Exception):
    """The pipe to a partner process failed: the partner ended or stopped reading."""


class _PartnerLink:
    """The writer process's end of the pipe to one partner process."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def send(self, part: Sequence[Event]) -> None:
        """Send ``part`` to the partner, which writes it and replies."""
        try:
            _send_in_chunks(self.connection, part)
        except OSError as error:
            raise _PartnerLost(f"sending to the partner failed: {type(error).__name__}") from error

    def result(self) -> int:
        """Wait for the partner's reply and return the events it wrote; raise its error."""
        try:
            ok, retryable, description, written, _ = self.connection.recv()
        except (EOFError, OSError) as error:
            raise _PartnerLost(f"the partner's pipe failed: {type(error).__name__}") from error
        if ok:
            return int(written)
        if retryable:
            raise _unavailable(description)
        raise WriteRejected(description)

    def close(self) -> None:
        """Tell the partner to stop, and close the pipe."""
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()


def split_by_user(events: Sequence[Event], count: int) -> list[list[Event]] | None:
    """Return ``events`` split into ``count`` parts by user, or ``None`` to keep them whole.

    An event with a ``user_id`` goes to the part given by a hash of its channel and user,
    so a user's events always go to the same part, in their order. Spend belongs to no
    user and goes to the first part. A batch with any other event (a status without a
    user, an event type of an extension) is kept whole, because its order against the
    other events may matter. So is a batch with a raw payload: it has no key, so a part
    that contains it must not be stored on its own before a failure of another part makes
    the recorder write the whole batch again. And so is a batch in which users of two
    parts name one conversation (a group chat): the part that reaches the conversation
    first would create it, with its user as the owner, whatever the batch order.
    """
    if count < 2:
        return None
    parts: list[list[Event]] = [[] for _ in range(count)]
    crc32 = zlib.crc32
    # The part of each conversation named in the batch.
    named: dict[tuple[str, str], int] = {}
    for event in events:
        user = getattr(event, "user_id", None)
        if user.__class__ is str and user:
            identity = f"{event.channel}\x00{user}".encode("utf-8", "surrogatepass")
            index = crc32(identity) % count
            conversation = getattr(event, "conversation_id", None)
            if conversation is not None and named.setdefault(
                    (event.channel, conversation), index) != index:
                return None
            parts[index].append(event)
        elif isinstance(event, _USERLESS_EVENTS):
            parts[0].append(event)
        else:
            return None
    return parts


DecoderCounts = dict[str, dict[str, int]]
# The position of an exchange's decoder in its parts.
_DECODER = EXCHANGE_PARTS.index("decoder")


def _decoder_counts(batch: Sequence[Event]) -> DecoderCounts:
    # The counters of the batch's exchange decoders that keep them (a ``token`` and a
    # ``stats`` with ``snapshot``, like adapters.webhook.WebhookDecoder), summed per token.
    # Each unpickled chunk has its own copy of a decoder, so copies are kept apart by id.
    counts: DecoderCounts = {}
    seen: set[int] = set()
    for event in batch:
        if event.__class__ is not Exchange:
            continue
        decoder = event.parts[_DECODER]  # type: ignore[attr-defined]
        token = getattr(decoder, "token", None)
        if token is None or id(decoder) in seen:
            continue
        seen.add(id(decoder))
        totals = counts.setdefault(token, {})
        for name, count in decoder.stats.snapshot().items():
            totals[name] = totals.get(name, 0) + count
    return counts


def _add_decoder_counts(batch: Sequence[Event], counts: DecoderCounts) -> None:
    # Adds the counts the child sent to the decoders of the parent's batch, once per token.
    left = dict(counts)
    for event in batch:
        if not left:
            return
        if event.__class__ is not Exchange:
            continue
        decoder = event.parts[_DECODER]  # type: ignore[attr-defined]
        totals = left.pop(getattr(decoder, "token", None), None)
        if totals:
            for name, count in totals.items():
                decoder.stats.add(name, count)


def _send_in_chunks(connection: Connection, batch: Sequence[Event]) -> None:
    # Chunks are pickled one by one, because pickle holds the interpreter lock for a whole
    # call and a chunk bounds how long the application's threads wait.
    # Their frames are written in groups of about _WRITE_BYTES. Each write releases
    # the lock. While the application's event loop is busy, this thread then waits long to
    # take it back, and each release by the event loop wakes it for nothing. So fewer writes
    # cost the application less, and the child still reads a group while the next is pickled.
    descriptor = connection.fileno()
    frames: list[bytes] = []
    pending = 0
    written = False
    for start in range(0, len(batch), SEND_CHUNK):
        chunk = batch[start:start + SEND_CHUNK]
        rows = _event_rows(chunk)
        try:
            message = list(chunk) if rows is None else (_EVENT_ROWS, rows)
            frame = _frame(ForkingPickler.dumps(message))
        except Exception:
            # The child drops the chunks of this batch it has received, instead of writing
            # them with the next batch.
            if written:
                _write_all(descriptor, _DISCARD_BATCH)
            raise
        frames.append(frame)
        pending += len(frame)
        if pending >= _WRITE_BYTES:
            _write_all(descriptor, b"".join(frames))
            frames, pending, written = [], 0, True
    frames.append(_END_OF_BATCH)
    _write_all(descriptor, b"".join(frames))


def _frame(payload: bytes) -> bytes:
    # The framing of multiprocessing.connection.Connection, which the receiving end reads.
    size = len(payload)
    if size > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, size) + payload
    return struct.pack("!i", size) + payload


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


# The frame that ends a batch: an empty list.
_END_OF_BATCH = _frame(ForkingPickler.dumps([]))
# The frame sent instead of the end of a batch whose sending failed, so that the child drops
# the part it received.
_DISCARD_BATCH = _frame(ForkingPickler.dumps("discard"))


def _event_rows(chunk: Sequence[Event]) -> list[tuple[type, tuple[Any, ...]]] | None:
    # Returns each event as its class and field values, so that pickle skips the reduce
    # call per event (Event.__reduce__), about half of its instructions. Returns None when
    # an event's class pickles differently, and the chunk then goes as events.
    rows: list[tuple[type, tuple[Any, ...]]] = []
    readers: dict[type, Callable[[Event], tuple[Any, ...]]] = {}
    for event in chunk:
        cls = event.__class__
        read = readers.get(cls)
        if read is None:
            if cls.__reduce__ is not Event.__reduce__:
                return None
            read = readers[cls] = field_reader(cls)
        rows.append((cls, read(event)))
    return rows


class _FrameReader:
    """A reader of a connection's messages that takes several per read when they arrived together.

    The receiving twin of :func:`_send_in_chunks`. ``Connection.recv`` reads each message's
    header and body with a call each, and every read releases the interpreter lock. This
    reads up to _WRITE_BYTES at once and keeps what follows the message for the next
    call. Only this reader may read from the connection once it has begun.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._descriptor = connection.fileno()
        self._buffer = bytearray()

    def poll(self, timeout: float) -> bool:
        """Return whether a message, or its start, has arrived; wait at most ``timeout`` s."""
        return bool(self._buffer) or self._connection.poll(timeout)

    def recv(self) -> Any:
        """Read and return the next message; raise EOFError once the pipe is closed."""
        size, start = self._header()
        while len(self._buffer) < start + size:
            self._fill()
        # The slice is the only copy: pickle reads a bytearray as it reads bytes.
        payload = self._buffer[start:start + size]
        del self._buffer[:start + size]
        return ForkingPickler.loads(payload)

    def _header(self) -> tuple[int, int]:
        # Returns the size of the next message and where its body starts in the buffer.
        while len(self._buffer) < 4:
            self._fill()
        (size,) = struct.unpack_from("!i", self._buffer)
        if size != -1:
            return size, 4
        while len(self._buffer) < 12:
            self._fill()
        (size,) = struct.unpack_from("!Q", self._buffer, 4)
        return size, 12

    def _fill(self) -> None:
        data = os.read(self._descriptor, _WRITE_BYTES)
        if not data:
            raise EOFError
        self._buffer += data


class _Unreadable(Exception):
    """A chunk of the batch could not be unpickled; the rest of the batch was read."""


def _receive_batch(connection: Connection | _FrameReader) -> list[Event] | None:
    # Reads the chunks of one batch sent by _send_in_chunks. Returns None when the parent
    # closed the pipe or asked the child to stop. Raises _Unreadable, once the whole batch
    # was read, when a chunk could not be unpickled (an event class the child lacks).
    batch: list[Event] = []
    unreadable: Exception | None = None
    while True:
        try:
            chunk = connection.recv()
            if not chunk:
                break
            if chunk.__class__ is tuple:
                batch.extend(rebuild_event(cls, values) for cls, values in chunk[1])
            elif chunk.__class__ is str:
                batch, unreadable = [], None
            else:
                batch.extend(chunk)
        except EOFError:
            return None
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - the message was read whole: the pipe works
            unreadable = error
    if chunk is None:
        return None
    if unreadable is not None:
        raise _Unreadable(_describe(unreadable)) from unreadable
    return batch


class _Received:
    """A batch as received, with its decoded events."""

    def __init__(self, batch: list[Event], events: Sequence[Event],
                 unreadable: str = "") -> None:
        self.batch = batch
        self.events = events
        # Why the batch could not be read, when it could not.
        self.unreadable = unreadable
        # When the batch was split: this process's part, and the partners that were sent one.
        self.own: list[Event] | None = None
        self.sent: list[_PartnerLink] = []
        # Why a part could not be sent, when a partner was lost.
        self.lost = ""


class _Preparer:
    """Decodes a batch ahead of the write.

    Decoding the chat exchanges (with the writer's transform) depends on the events alone,
    not on the store, so the inbox thread does it while the writer writes the batch before.
    The enrichers (such as sentiment) run in the write itself. Run ahead in the inbox
    thread, they lowered the SQLite ingest rate by 5 to 7 %, because the two threads then
    take turns with the interpreter lock, and they did not raise the PostgreSQL rate.
    A writer without ``expand`` gets its batches as received. With partners, the decoded
    events are split by user (:func:`split_by_user`) and the partners' parts sent at once,
    so the partners receive them while this process still writes the batch before.
    """

    def __init__(self, writer: Any, partners: Sequence[_PartnerLink] = (),
                 split_min_batch: int = SPLIT_MIN_BATCH) -> None:
        self._expand = getattr(writer, "expand", None)
        self._partners = partners
        self._split_min_batch = split_min_batch

    def prepare(self, batch: list[Event]) -> _Received:
        """Return ``batch`` with its decoded events, and send the partners their parts."""
        events: Sequence[Event] = batch
        if self._expand is not None:
            try:
                events = self._expand(batch)
            except Exception:  # noqa: BLE001 - the writer decodes the batch itself and raises
                return _Received(batch, batch)
        received = _Received(batch, events)
        parts = None
        if self._partners and len(batch) >= self._split_min_batch:
            parts = split_by_user(events, len(self._partners) + 1)
        if parts is None:
            return received
        received.own = parts[0]
        for partner, part in zip(self._partners, parts[1:], strict=True):
            if not part:
                continue
            try:
                partner.send(part)
            except _PartnerLost as error:
                received.lost = str(error)
                return received
            except Exception as error:  # noqa: BLE001 - this process writes the part itself
                # A part that cannot be pickled: the partner discards what it received of
                # it and does not reply, and this process writes it with its own part.
                logger.warning("writer process kept a part of %d events it could not send to "
                               "a partner: %s", len(part), _describe(error))
                received.own.extend(part)
                continue
            received.sent.append(partner)
        return received


class _Inbox:
    """Receives the batches the parent sends, in a thread, while the writer writes.

    The parent hands the next batch over before it reads the result of the current one
    (see :meth:`ProcessWriter.submit`). So the next batch is received, unpickled and
    decoded (:class:`_Preparer`) while the current one is written, partly while the
    writer waits for the database. The parent has at most one batch waiting besides the
    one being written, which bounds what this holds.
    """

    def __init__(self, connection: Connection, preparer: _Preparer) -> None:
        self._batches: queue.SimpleQueue[_Received | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._receive, args=(connection, preparer),
                                        name="chatmw-writer-inbox", daemon=True)
        self._thread.start()

    def _receive(self, connection: Connection, preparer: _Preparer) -> None:
        reader = _FrameReader(connection)
        while True:
            try:
                batch = _receive_batch(reader)
            except _Unreadable as error:
                # Sent back as a rejected write, so the parent isolates the event.
                self._batches.put(_Received([], [], f"batch not readable: {error}"))
                continue
            except Exception:
                # An undecodable message means the pipe is broken, so the child ends.
                logger.exception("writer process could not read a batch")
                batch = None
            if batch is None:
                self._batches.put(None)
                return
            try:
                received = preparer.prepare(batch)
            except Exception:
                # The writer decodes the batch itself, and reports any error.
                logger.exception("writer process could not prepare a batch ahead of its write")
                received = _Received(batch, batch)
            self._batches.put(received)

    def next(self) -> _Received | None:
        """Return the next batch, waiting for it; ``None`` once the parent stopped."""
        return self._batches.get()


# Allocations between two collections of the youngest generation in a writer process.
WRITER_GC_THRESHOLD = 20_000


def settle_collector() -> None:
    """Tune the garbage collector of a process that only writes batches, once it is set up.

    The objects of the process so far (modules, the writer) are moved out of the
    collector's sight, and the youngest generation is collected less often. A batch
    allocates hundreds of thousands of short-lived objects, and the default threshold of
    700 allocations would run the collector hundreds of times per batch.
    """
    _, middle, oldest = gc.get_threshold()
    collector.settle_collector((WRITER_GC_THRESHOLD, middle, oldest))


class ProcessWriter:
    """Writes batches through a writer that runs in a child process.

    ``factory`` builds the writer in the child. ``timeout_s`` bounds one write: a child that
    has not answered by then is killed and the write fails as retryable (the batch may then
    be stored twice, which the idempotent writer stores once). A child that died is started
    again on the next write. Retryable errors in the child are raised here as
    :class:`sqlalchemy.exc.OperationalError`, so the recorder retries them as usual; other
    errors are raised as :class:`WriteRejected`, so the recorder isolates the bad events.

    ``priority`` sets how the processes are scheduled (:mod:`chatmw.writer_priority`; read
    from the environment by default). Processes under the idle policy that starve while a
    reply is due are stopped, and the write fails as retryable. The next write starts them
    under the batch policy, and ``priority_raises`` counts those restarts.
    """

    # Chat exchanges (chatmw.exchange) are decoded in the child, by the store writer there.
    expands_exchanges = True

    def __init__(self, factory: Callable[[], BatchWriter], *, timeout_s: float = 120.0,
                 start_method: str = "spawn", local_writer: Any = None,
                 processes: int = 1, split_min_batch: int = SPLIT_MIN_BATCH,
                 priority: WriterPriority | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not 1 <= processes <= MAX_PROCESSES:
            raise ValueError(f"processes must be from 1 to {MAX_PROCESSES}, got {processes}")
        self.factory = factory
        # The child and its partners (see split_by_user), and the smallest batch split.
        self.processes = processes
        self.split_min_batch = split_min_batch
        self._partners: list[Any] = []
        # The writer the child copies, when there is one: code that registers handlers
        # registers them here, then calls refresh().
        self.local_writer = local_writer
        self.timeout_s = timeout_s
        self.priority = WriterPriority.from_environ() if priority is None else priority
        # True once idle processes starved: new processes start under the batch policy.
        self._raised = False
        self.priority_raises = 0
        self._context = multiprocessing.get_context(start_method)
        self._process: Any = None
        self._connection: Connection | None = None
        # Reads the child's replies from the connection.
        self._reader: _FrameReader | None = None
        self._lock = threading.Lock()
        # Batches are numbered as they are sent, and the child replies to them in order.
        # _waiting contains the batches sent to the current child whose reply was not read
        # yet, and _replies the replies read ahead of their turn.
        self._sent = 0
        self._replied = 0
        self._waiting: dict[int, Sequence[Event]] = {}
        self._replies: dict[int, tuple[Any, ...]] = {}

    def start(self) -> None:
        """Start the child process now rather than on the first write."""
        with self._lock:
            self._ensure_started()

    def write(self, batch: Sequence[Event]) -> int:
        """Write ``batch`` in the child and return the number of events written there.

        Raises as described in the class documentation.
        """
        return self.result(self.submit(batch))

    def submit(self, batch: Sequence[Event]) -> int:
        """Send ``batch`` to the child and return its ticket for :meth:`result`.

        The child takes the batch in while it writes the batches sent before, and writes
        the batches in the order they were sent. Raises a retryable error when the child
        cannot be started or the pipe fails.
        """
        with self._lock:
            connection = self._ensure_started()
            try:
                _send_in_chunks(connection, batch)
            except OSError as error:
                self._kill(f"pipe failed: {type(error).__name__}")
                description = f"child writer process failed: {type(error).__name__}"
                raise _unavailable(description) from error
            ticket = self._sent
            self._sent += 1
            self._waiting[ticket] = batch
            return ticket

    def result(self, ticket: int) -> int:
        """Wait for the batch of ``ticket`` and return the number of events written.

        Raises as described in the class documentation, and as a retryable error when
        the child that had the batch stopped before its reply.
        """
        with self._lock:
            batch = self._waiting.pop(ticket, None)
            if batch is None:
                raise _unavailable("child writer process stopped before writing the batch")
            reply = self._replies.pop(ticket, None)
            while reply is None:
                reply = self._read_reply(ticket)
        ok, retryable, description, written, counts = reply
        if ok:
            _add_decoder_counts(batch, counts)
            return int(written)
        if retryable:
            raise _unavailable(description)
        raise WriteRejected(description)

    def _read_reply(self, ticket: int) -> tuple[Any, ...] | None:
        # Reads the child's next reply. Returns it when it is the reply to ``ticket``,
        # otherwise keeps it for its own ticket and returns None.
        reader = self._reader
        if reader is None:
            raise _unavailable("child writer process stopped before writing the batch")
        try:
            if not self._wait_for_reply(reader):
                self._kill(f"write timed out after {self.timeout_s:.0f} s")
                raise _unavailable(f"child writer did not reply in {self.timeout_s:.0f} s")
            reply = reader.recv()
        except (EOFError, OSError) as error:
            self._kill(f"pipe failed: {type(error).__name__}")
            description = f"child writer process failed: {type(error).__name__}"
            raise _unavailable(description) from error
        number = self._replied
        self._replied += 1
        if number == ticket:
            return reply
        self._replies[number] = reply
        return None

    def _wait_for_reply(self, reader: _FrameReader) -> bool:
        # Waits up to timeout_s for the next reply. Under the idle policy the processes are
        # sampled every quarter of starved_after_s and stopped once they starve.
        process = self._process
        if not self.priority.uses_idle or process is None:
            return reader.poll(self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        step = self.priority.starved_after_s / 4
        watch: StarvationWatch | None = None
        while True:
            remaining = deadline - time.monotonic()
            if reader.poll(max(0.0, min(step, remaining))):
                return True
            if remaining <= step:
                return False
            if watch is None:
                pids = [process.pid, *(partner.pid for partner in self._partners)]
                watch = StarvationWatch(pids, self.priority)
            elif watch.starved() and runs_idle(process.pid):
                # Processes already under the batch policy would gain nothing by a restart.
                self._raise_priority(watch)

    def _raise_priority(self, watch: StarvationWatch) -> NoReturn:
        self._raised = True
        self.priority_raises += 1
        self._kill(f"it waited for a CPU {watch.share:.0%} of the time under the idle "
                   f"scheduling policy; it starts again under the batch policy with niceness "
                   f"{self.priority.niceness} for {self.priority.calm_s:.0f} s")
        raise _unavailable("child writer process starved of CPU under the idle policy")

    def refresh(self) -> None:
        """Stop the child after the write in progress, so the next write starts a new copy.

        Call it after changing the local writer (new handlers, say) once writes have begun.
        """
        self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (and its partners) after the write in progress, if any."""
        with self._lock:
            process, connection = self._process, self._connection
            partners, self._partners = self._partners, []
            self._process = self._connection = self._reader = None
            self._forget_batches()
            if process is not None and connection is not None:
                with contextlib.suppress(OSError):
                    connection.send(None)
                process.join(timeout_s)
                if process.is_alive():
                    process.kill()
                    process.join()
                connection.close()
            # The child sent its partners the stop message as it ended.
            _stop_processes(partners, timeout_s)

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._connection is not None:
            return self._connection
        if self._process is not None:
            self._kill("child writer process exited")
        parent, child = self._context.Pipe()
        links: list[Connection] = []
        try:
            self._partners = []
            start = self.priority.start_argument(self._raised)
            for _ in range(self.processes - 1):
                link, partner_end = self._context.Pipe()
                links.append(link)
                partner = self._context.Process(
                    target=_serve, args=(partner_end, PartnerFactory(self.factory), (),
                                         self.split_min_batch, start),
                    name="chatmw-writer-partner", daemon=True)
                try:
                    partner.start()
                finally:
                    partner_end.close()
                self._partners.append(partner)
            process = self._context.Process(target=_serve,
                                            args=(child, self.factory, links,
                                                  self.split_min_batch, start),
                                            name="chatmw-writer", daemon=True)
            process.start()
        except Exception as error:  # noqa: BLE001 - reported as a retryable write failure
            parent.close()
            _stop_processes(self._partners, 0)
            self._partners = []
            logger.error("writer process could not start: %s", _describe(error))
            raise _unavailable(f"writer process could not start: {_describe(error)}") from error
        finally:
            # The child has its own copies of these ends now.
            child.close()
            for link in links:
                link.close()
        self._process, self._connection = process, parent
        self._reader = _FrameReader(parent)
        if self._partners:
            logger.info("writer process started: pid=%s, partners: pids=%s", process.pid,
                        ",".join(str(partner.pid) for partner in self._partners))
        else:
            logger.info("writer process started: pid=%s", process.pid)
        return parent

    def _forget_batches(self) -> None:
        # The batches the child had are lost with it: their results raise a retryable error.
        self._waiting.clear()
        self._replies.clear()
        self._replied = self._sent

    def _kill(self, reason: str) -> None:
        process, connection = self._process, self._connection
        partners, self._partners = self._partners, []
        self._process = self._connection = self._reader = None
        self._forget_batches()
        logger.warning("writer process stopped: %s", reason)
        if process is not None and process.is_alive():
            process.kill()
            process.join()
        if connection is not None:
            connection.close()
        _stop_processes(partners, 0)


def _stop_processes(processes: Sequence[Any], timeout_s: float) -> None:
    # Waits up to ``timeout_s`` for each process to end, then kills those left.
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()


def _unavailable(description: str) -> OperationalError:
    return OperationalError(None, None, Exception(description))
