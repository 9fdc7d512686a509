"""Where the batches of an import are written: a thread of this process, or a child process.

Both write one batch at a time, through a :class:`~chatmw.store.writer.Writer`, while the
caller reads the next batch. The writer's transaction reads which keys of the batch are
stored already, so that the import can count duplicates. The batch before is committed
by then, so a key repeated across batches of one file is counted once.

In a thread, the writer's Python work shares the interpreter lock with the reading. In a
child process (:class:`ProcessBatchWriter`) the two run on two CPUs. The child builds its
own writer with a picklable factory, because engines and connections cannot cross a
process boundary, and receives each batch as one list of values per field.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import operator
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol

from chatmw import events as ev

if TYPE_CHECKING:
    from chatmw.config import Settings
    from chatmw.security.privacy import Privacy, PrivacySettings
    from chatmw.store.writer import Enricher, Writer

# The store (SQLAlchemy, the writer, the enrichers) is imported where it is used, so that
# the import command starts its child process before this process loads it.

__all__ = ["BatchWriter", "ThreadBatchWriter", "ProcessBatchWriter", "SplitBatchWriter",
           "WriteFailed", "build_import_writer", "pseudonymise_messages"]

logger = logging.getLogger("chatmw")

# A batch travels to the child as one list per field, in this order, and its messages are
# rebuilt there through the slots of the fields.
_FIELDS = tuple(field.name for field in dataclasses.fields(ev.Message))
_VALUES = operator.attrgetter(*_FIELDS)
_GETTERS = tuple(operator.attrgetter(name) for name in _FIELDS)
_SLOTS = tuple(getattr(ev.Message, name) for name in _FIELDS)
# The slots' bound setters, looked up once instead of once per message and field.
_SETTERS = tuple(slot.__set__ for slot in _SLOTS)


class WriteFailed(Exception):
    """The database rejected a batch; the message is the database error."""


class BatchWriter(Protocol):
    """Writes one batch at a time: :meth:`submit` starts a write, :meth:`result` waits for it.

    :meth:`prepare` gets the next batch while a write is in progress, before
    :meth:`result`, and may do part of its work in the meantime.
    """

    def prepare(self, messages: list[ev.Message]) -> None: ...

    def submit(self, messages: list[ev.Message]) -> None: ...

    def result(self) -> int: ...

    def close(self) -> None: ...


def write_batch(writer: Writer, messages: list[ev.Message]) -> int:
    """Write ``messages``; return how many distinct keys of them were not stored before.

    The writer counts the keys its transaction did not find stored, so a key that a
    concurrent writer stores at the same time may count in both. Raises
    :class:`WriteFailed` when the write fails, with the database error as cause.
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return writer.write_counted(messages)[1]
    except SQLAlchemyError as error:
        raise WriteFailed(str(error)) from error


class ThreadBatchWriter:
    """Writes batches through ``writer`` in one thread of this process."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatmw-import")
        self._pending: Future[int] | None = None

    def prepare(self, messages: list[ev.Message]) -> None:
        """Do nothing: the thread shares this process's CPU, so there is nothing to gain."""

    def submit(self, messages: list[ev.Message]) -> None:
        """Start writing ``messages``; the write before must be collected with :meth:`result`."""
        self._pending = self._executor.submit(write_batch, self.writer, messages)

    def result(self) -> int:
        """Wait for the write in progress; return the new messages or raise as it raised."""
        if self._pending is None:
            raise RuntimeError("no batch was submitted")
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        """Wait for the write in progress, if any, and stop the thread."""
        self._executor.shutdown(wait=True)


def _pack(messages: list[ev.Message]) -> list[list[Any]]:
    # One list per field: a batch of columns pickles and unpickles faster than a list of
    # one tuple per message.
    return [list(map(getter, messages)) for getter in _GETTERS]


def _unpack(columns: list[list[Any]]) -> list[ev.Message]:
    # The values were checked when the messages were built in the parent, so the slots are
    # set as they are: Message.__init__ would check them again, at a few times the cost.
    count = len(columns[0]) if columns else 0
    if len(columns) != len(_SLOTS) or any(len(column) != count for column in columns):
        lengths = [len(column) for column in columns]
        raise ValueError(f"invalid batch: expected {len(_SLOTS)} columns of equal length, "
                         f"got columns of {lengths} values")
    new = object.__new__
    messages = [new(ev.Message) for _ in range(count)]
    for slot, column in zip(_SLOTS, columns, strict=True):
        # The deque of no length runs the map in C and keeps none of its results.
        collections.deque(map(slot.__set__, messages, column), maxlen=0)
    return messages


class _Enrichments:
    """The child's one enricher: the parent's results for the messages it enriched.

    The parent runs the same enrichers (built by the same factory) on part of each batch,
    while it waits for the write before. A message that a preprocessor replaced, or that
    the parent did not get to, is enriched here as the writer would have done it.
    """

    def __init__(self, enrichers: list[Enricher]) -> None:
        self.enrichers = enrichers
        self.results: dict[int, Mapping[str, Any]] = {}

    def __call__(self, message: ev.Message) -> Mapping[str, Any]:
        result = self.results.get(id(message))
        if result is not None:
            return result
        return _enrich(self.enrichers, message)


def _enrich(enrichers: list[Enricher], message: ev.Message) -> dict[str, Any]:
    # One mapping with the values the writer sets from each enricher in turn.
    values: dict[str, Any] = {}
    for enrich in enrichers:
        values.update(enrich(message))
    return values


def _serve(connection: Connection, factory: Callable[[], Writer]) -> None:
    # The child: one reply per batch, ("ok", new), ("failed", database error) or ("error",
    # exception). Ctrl-C goes to the parent, which stops the child.
    from chatmw.writer_process import settle_collector

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer = factory()
    enrichments = _Enrichments(writer.enrichers)
    writer.enrichers = [enrichments]
    settle_collector()
    try:
        while True:
            try:
                sent = connection.recv()
            except EOFError:
                return
            if sent is None:
                return
            columns, results = sent
            messages = _unpack(columns)
            # The messages stay referenced until the write ends, so their ids are unique.
            enrichments.results = {id(message): result for message, result
                                   in zip(messages, results, strict=True) if result is not None}
            try:
                reply: tuple[str, Any] = ("ok", write_batch(writer, messages))
            except WriteFailed as error:
                reply = ("failed", str(error))
            except Exception as error:  # noqa: BLE001 - raised again in the parent
                reply = ("error", _sendable(error))
            finally:
                enrichments.results = {}
            connection.send(reply)
    finally:
        # An analysis of the tables still running would end with the connections.
        writer.statistics.wait(60)
        writer.engine.dispose()


def _sendable(error: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any error that does not survive pickling
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class ProcessBatchWriter:
    """Writes batches in a child process, through the writer that ``factory`` builds there.

    ``factory`` must be picklable (a module-level function or a ``functools.partial`` of
    one). The child starts at once, so that its imports overlap the parent's first batch.
    A child that exits makes the write in progress fail with :class:`WriteFailed`.

    While the child writes a batch, :meth:`prepare` runs the writer's enrichers (sentiment,
    text redaction) on the next one here, until the child answers; the child enriches the
    rest. The two processes then share that work as their speeds allow.
    """

    # Messages enriched between two checks for the child's answer.
    ENRICH_CHUNK = 64

    def __init__(self, factory: Callable[[], Writer], start_method: str = "spawn") -> None:
        context: Any = multiprocessing.get_context(start_method)
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory),
                                        name="chatmw-import-writer", daemon=True)
        self._process.start()
        child.close()
        self._waiting = False
        # The child's enrichers, from a writer built here by the same factory.
        self._enrichers = list(factory().enrichers)
        self._prepared: tuple[list[ev.Message], list[Mapping[str, Any] | None]] | None = None

    def prepare(self, messages: list[ev.Message]) -> None:
        """Enrich the first ``messages`` of the next batch until the write in progress ends."""
        results: list[Mapping[str, Any] | None] = [None] * len(messages)
        self._prepared = (messages, results)
        if not self._enrichers:
            return
        for start in range(0, len(messages), self.ENRICH_CHUNK):
            if self._connection.poll(0):
                return
            for index in range(start, min(start + self.ENRICH_CHUNK, len(messages))):
                try:
                    results[index] = _enrich(self._enrichers, messages[index])
                except Exception:  # noqa: BLE001 - the child's writer raises it as usual
                    continue

    def submit(self, messages: list[ev.Message]) -> None:
        """Send ``messages`` to the child; the write before must be collected first."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is messages:
            results = prepared[1]
        else:
            results = [None] * len(messages)
        with contextlib.suppress(OSError):  # the child has exited: result() says so
            self._connection.send((_pack(messages), results))
        self._waiting = True

    def result(self) -> int:
        """Wait for the child's reply; return the new messages or raise as the write failed."""
        if not self._waiting:
            raise RuntimeError("no batch was submitted")
        try:
            status, value = self._connection.recv()
        except (EOFError, OSError):
            self._waiting = False
            self._process.join(5)
            raise WriteFailed(f"the writer process exited with status "
                              f"{self._process.exitcode}") from None
        self._waiting = False
        if status == "ok":
            return int(value)
        if status == "failed":
            raise WriteFailed(value)
        raise value

    def close(self) -> None:
        """Stop the child: at once when a write is in progress, else after it exits."""
        if self._process.is_alive() and not self._waiting:
            with contextlib.suppress(OSError):
                self._connection.send(None)
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()


class SplitBatchWriter:
    """Writes each batch through several batch writers at once, split by user.

    Each message goes to the writer given by its channel and user
    (:func:`chatmw.writer_process.split_by_user`), so a user's messages always go to the
    same writer, in their order. Every part is waited for, and the first error is raised
    once all have returned. The parts already stored then stay stored, and importing the
    file again stores them once.
    """

    def __init__(self, writers: Sequence[BatchWriter]) -> None:
        if len(writers) < 2:
            raise ValueError(f"a split batch writer needs 2 writers or more, got {len(writers)}")
        self.writers = list(writers)
        self._prepared: tuple[list[ev.Message], list[list[ev.Message]]] | None = None
        self._submitted: list[BatchWriter] = []

    def _parts(self, messages: list[ev.Message]) -> list[list[ev.Message]]:
        from chatmw.writer_process import split_by_user

        prepared = self._prepared
        if prepared is not None and prepared[0] is messages:
            return prepared[1]
        parts = split_by_user(messages, len(self.writers))
        if parts is None:
            return [messages] + [[] for _ in self.writers[1:]]
        return parts  # type: ignore[return-value]

    def prepare(self, messages: list[ev.Message]) -> None:
        """Split the next batch and let each writer prepare its part."""
        parts = self._parts(messages)
        self._prepared = (messages, parts)
        for writer, part in zip(self.writers, parts, strict=True):
            if part:
                writer.prepare(part)

    def submit(self, messages: list[ev.Message]) -> None:
        """Send each writer its part of ``messages``."""
        parts = self._parts(messages)
        self._prepared = None
        self._submitted = []
        for writer, part in zip(self.writers, parts, strict=True):
            if part:
                writer.submit(part)
                self._submitted.append(writer)

    def result(self) -> int:
        """Wait for every part; return the new messages of all, or raise the first error."""
        from chatmw.writer_process import sum_results

        submitted, self._submitted = self._submitted, []
        return sum_results([writer.result for writer in submitted])

    def close(self) -> None:
        """Close every writer."""
        for writer in self.writers:
            writer.close()


def build_import_writer(settings: Settings, privacy: PrivacySettings | None = None) -> Writer:
    """Build the writer of live traffic (see :func:`chatmw.runtime.build_writer`) on its own
    engine, with the text rule of ``privacy`` installed, as a child's writer factory.

    Pseudonyms are made before the batches are sent, so the pseudonym key is not needed.
    """
    from chatmw.runtime import build_writer
    from chatmw.security.privacy import Privacy
    from chatmw.store.engine import make_engine

    writer = build_writer(settings, make_engine(settings.database_url), privacy)
    if privacy is not None:
        Privacy(privacy, None).install(writer)
    return writer


def pseudonymise_messages(privacy: Privacy) -> Callable[[ev.Message], ev.Message] | None:
    """Return ``privacy.transform`` for messages, with each id's pseudonym computed once.

    The result equals the runtime's (:meth:`~chatmw.security.privacy.Privacy.transform`),
    which pseudonymises the id fields that hold a non-empty string; a copy of the message
    gets the pseudonyms without a second run of the checks of ``Message.__init__``, which
    a pseudonym (``ps_`` and hex digits) always passes. ``None`` when ids are kept.
    """
    pseudonymiser = privacy.pseudonymiser
    if pseudonymiser is None:
        return None
    from chatmw.security.pseudonyms import PSEUDONYMISED_FIELDS

    fields = [(getattr(ev.Message, name), PSEUDONYMISED_FIELDS[name])
              for name in pseudonymiser.fields]
    known: dict[tuple[str, str], str] = {}

    def transform(message: ev.Message) -> ev.Message:
        copy = object.__new__(ev.Message)
        for setter, value in zip(_SETTERS, _VALUES(message), strict=True):
            setter(copy, value)
        for slot, kind in fields:
            value = slot.__get__(message)
            if isinstance(value, str) and value:
                pseudonym = known.get((kind, value))
                if pseudonym is None:
                    if len(known) >= _MAX_KNOWN_PSEUDONYMS:
                        known.clear()
                    pseudonym = known[(kind, value)] = pseudonymiser.pseudonymise(value, kind)
                slot.__set__(copy, pseudonym)
        return copy

    return transform


# Pseudonyms remembered by pseudonymise_messages, at about 200 bytes each.
_MAX_KNOWN_PSEUDONYMS = 100_000
