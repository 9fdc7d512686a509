"""Batching imported messages into the writer, with counts and per-row problems."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from chatmw import events as ev
from chatmw.importers.source import Row, Skipped
from chatmw.store import models
from chatmw.store.identity import CHUNK
from chatmw.store.writer import Writer

__all__ = ["ImportReport", "ImportAborted", "MessageSource", "run_import", "DEFAULT_BATCH_SIZE"]

logger = logging.getLogger("chatmw")

DEFAULT_BATCH_SIZE = 5000


class MessageSource(Protocol):
    """A file format: a first pass over the file, then its rows as messages."""

    def scan(self) -> None: ...

    def rows(self) -> Iterator[Row | Skipped]: ...


class ImportAborted(Exception):
    """A batch could not be written; the batches before it are stored."""

    def __init__(self, message: str, first_line: int, last_line: int) -> None:
        super().__init__(message)
        self.first_line = first_line
        self.last_line = last_line


@dataclass
class ImportReport:
    """Counts of one import.

    ``duplicates`` are rows whose message key was already stored, or that repeat a key
    seen earlier in the file; ``imported`` are rows stored as new messages.
    """

    rows: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: int = 0
    conversations: set[tuple[str, str]] = field(default_factory=set, repr=False)
    seconds: float = 0.0

    @property
    def conversation_count(self) -> int:
        return len(self.conversations)

    def rate(self) -> float:
        """Return rows written per second."""
        return (self.rows - self.skipped) / self.seconds if self.seconds > 0 else 0.0


def _stored_keys(engine: Engine, keys: Sequence[str]) -> set[str]:
    found: set[str] = set()
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            # One array parameter: an IN list of thousands of values is slow to send.
            statement = text("SELECT key FROM messages WHERE key = ANY(CAST(:keys AS VARCHAR[]))")
            return set(connection.execute(statement, {"keys": list(keys)}).scalars())
        column = models.Message.key
        for start in range(0, len(keys), CHUNK):
            chunk = list(keys[start:start + CHUNK])
            found.update(connection.execute(select(column).where(column.in_(chunk))).scalars())
    return found


def _write_batch(writer: Writer, batch: list[Row], report: ImportReport) -> None:
    keys = [row.message.key for row in batch]
    # The duplicate count is read before the write, so a concurrent writer of the same keys
    # can make it low; the stored rows are right either way, because keys are unique.
    stored = _stored_keys(writer.engine, sorted(set(keys)))
    new_keys = set(keys) - stored
    try:
        writer.write([row.message for row in batch])
    except SQLAlchemyError as error:
        first, last = batch[0].line, batch[-1].line
        raise ImportAborted(f"writing the rows of lines {first}-{last} failed: {error}",
                            first, last) from error
    report.duplicates += len(keys) - len(new_keys)
    report.imported += len(new_keys)


def _batches(source: MessageSource, batch_size: int, report: ImportReport,
             on_skipped: Callable[[Skipped], None] | None) -> Iterator[list[Row]]:
    batch: list[Row] = []
    batch_keys: set[str] = set()
    for item in source.rows():
        report.rows += 1
        if isinstance(item, Skipped):
            report.skipped += 1
            if on_skipped:
                on_skipped(item)
            continue
        message: ev.Message = item.message
        report.conversations.add((message.channel, message.conversation_id or ""))
        if message.key in batch_keys:
            report.duplicates += 1
            continue
        batch.append(item)
        batch_keys.add(message.key)
        if len(batch) >= batch_size:
            yield batch
            batch, batch_keys = [], set()
    if batch:
        yield batch


def run_import(source: MessageSource, writer: Writer, batch_size: int = DEFAULT_BATCH_SIZE,
               on_skipped: Callable[[Skipped], None] | None = None) -> ImportReport:
    """Import every row of ``source`` through ``writer`` in batches of ``batch_size``.

    One thread writes a batch while this one reads the next, and reading waits until the
    write before it is done, so at most two batches are in memory. ``on_skipped`` is called
    for each invalid row. Raises :class:`ImportAborted` when a batch fails, with the
    batches before it stored; running the import again is safe.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    report = ImportReport()
    started = time.perf_counter()
    source.scan()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatmw-import") as executor:
        pending: Future[None] | None = None
        for batch in _batches(source, batch_size, report, on_skipped):
            if pending is not None:
                pending.result()
            pending = executor.submit(_write_batch, writer, batch, report)
        if pending is not None:
            pending.result()

    report.seconds = time.perf_counter() - started
    logger.info("import: %d rows read, %d imported, %d duplicates, %d skipped in %.1f s",
                report.rows, report.imported, report.duplicates, report.skipped, report.seconds)
    return report
