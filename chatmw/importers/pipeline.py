"""Batching imported messages into the writer, with counts and per-row problems."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from chatmw import events as ev
from chatmw.importers.source import Row, Skipped
from chatmw.importers.writers import BatchWriter, ThreadBatchWriter, WriteFailed

if TYPE_CHECKING:
    from chatmw.store.writer import Writer

__all__ = ["ImportReport", "ImportAborted", "MessageSource", "run_import", "DEFAULT_BATCH_SIZE"]

logger = logging.getLogger("chatmw")

DEFAULT_BATCH_SIZE = 5000


class MessageSource(Protocol):
    """A file format: a first pass over the file (a check, or a scan for ids), then its rows."""

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


def run_import(source: MessageSource, writer: Writer | BatchWriter,
               batch_size: int = DEFAULT_BATCH_SIZE,
               on_skipped: Callable[[Skipped], None] | None = None,
               transform: Callable[[ev.Message], ev.Message] | None = None) -> ImportReport:
    """Import every row of ``source`` through ``writer`` in batches of ``batch_size``.

    A :class:`~chatmw.store.writer.Writer` writes in a thread of this process; a
    :class:`~chatmw.importers.writers.BatchWriter` (such as a child process) is used as it
    is and left open. Either writes one batch while this thread reads the next, and reading
    waits until the write before it is done, so at most two batches are in memory.
    ``transform`` (for example pseudonymisation) is applied to each message before it is
    written. ``on_skipped`` is called for each invalid row. Raises :class:`ImportAborted`
    when a batch fails, with the batches before it stored; running the import again is safe.
    """
    from chatmw.store.writer import Writer

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    report = ImportReport()
    started = time.perf_counter()
    source.scan()

    batches = ThreadBatchWriter(writer) if isinstance(writer, Writer) else writer
    try:
        in_flight: list[Row] | None = None
        for batch in _batches(source, batch_size, report, on_skipped):
            messages = [row.message for row in batch]
            if transform is not None:
                messages = [transform(message) for message in messages]
            if in_flight is not None:
                batches.prepare(messages)
                _collect(batches, in_flight, report)
            batches.submit(messages)
            in_flight = batch
        if in_flight is not None:
            _collect(batches, in_flight, report)
    finally:
        if batches is not writer:
            batches.close()

    report.seconds = time.perf_counter() - started
    logger.info("import: %d rows read, %d imported, %d duplicates, %d skipped in %.1f s",
                report.rows, report.imported, report.duplicates, report.skipped, report.seconds)
    return report


def _collect(batches: BatchWriter, batch: list[Row], report: ImportReport) -> None:
    # Waits for the write of ``batch`` and counts its new and repeated keys.
    try:
        new = batches.result()
    except WriteFailed as error:
        # Rows that waited for their conversation's user may come after later lines.
        first = min(row.line for row in batch)
        last = max(row.line for row in batch)
        raise ImportAborted(f"writing the rows of lines {first}-{last} failed: {error}",
                            first, last) from error.__cause__
    report.duplicates += len(batch) - new
    report.imported += new
