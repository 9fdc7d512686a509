"""Reading transcript files: streamed text, CSV records and JSON lines with line numbers.

Every reader yields one :class:`Record` per record of the file, with the physical line on
which the record starts (the header is line 1), so that a rejected row can be found in an
editor. Files are read as UTF-8, with or without a byte order mark, and never held in
memory whole.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from chatmw import events as ev
from chatmw.codecs import replace_lone_surrogates

__all__ = [
    "ImportFileError",
    "RowError",
    "Record",
    "Skipped",
    "Row",
    "TextFile",
    "read_csv",
    "read_csv_rows",
    "read_jsonl",
    "check_header",
]

# The largest CSV field accepted, in characters. The csv module's default (131,072) is too
# small for long transcripts, while no limit at all would let one unterminated quote read
# the rest of a large file into memory.
MAX_FIELD_CHARS = 16 * 1024 * 1024


class ImportFileError(Exception):
    """The file cannot be imported at all (for example a required column is missing)."""


class RowError(ValueError):
    """One record is invalid; the message is the reason reported for its line."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record of the file: its values by column name, or the reason it is unreadable."""

    line: int
    values: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record that was not imported, with its line number and the reason."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Row:
    """A record turned into a message, with the line it came from."""

    line: int
    message: ev.Message


class _CountingReader(io.RawIOBase):
    def __init__(self, raw: IO[bytes], on_read: Callable[[int], None]) -> None:
        self.raw = raw
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.on_read(count or 0)
        return count  # type: ignore[no-any-return]


class TextFile:
    """A UTF-8 file opened for streaming, which counts the bytes read for a progress bar.

    ``bytes_read`` adds up over every pass; ``on_progress`` (when set) gets it after each
    block read from disk.
    """

    BLOCK_BYTES = 256 * 1024

    def __init__(self, path: Path, on_progress: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.bytes_read = 0
        self.on_progress = on_progress

    def _count(self, count: int) -> None:
        self.bytes_read += count
        if self.on_progress is not None:
            self.on_progress(self.bytes_read)

    def check_utf8(self) -> None:
        """Read the whole file once, as bytes; raises UnicodeDecodeError where it is not UTF-8.

        Only decodes, without parsing, so that an import can refuse a file before storing
        any of it at a small part of the cost of a parse.
        """
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        with open(self.path, "rb", buffering=0) as raw:
            while block := raw.read(self.BLOCK_BYTES):
                self._count(len(block))
                decoder.decode(block)
        decoder.decode(b"", final=True)

    @contextmanager
    def open(self) -> Iterator[io.TextIOWrapper]:
        """Open the file as text; ``utf-8-sig`` drops a byte order mark at the start."""
        with open(self.path, "rb", buffering=0) as raw:
            buffered = io.BufferedReader(_CountingReader(raw, self._count), self.BLOCK_BYTES)
            with io.TextIOWrapper(buffered, encoding="utf-8-sig", newline="") as text:
                yield text


def _csv_rows(stream: io.TextIOWrapper) -> Iterator[tuple[int, list[str] | None, str | None]]:
    # csv.reader.line_num counts the physical lines read so far, so a record starts on the
    # line after the previous record ended, which holds for quoted fields with newlines.
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)
    reader = csv.reader(stream)
    start = 1
    while True:
        try:
            # The reader goes on after a csv.Error, so the loop starts again on the next row.
            for row in reader:
                if row:
                    yield start, row, None
                start = reader.line_num + 1
            return
        except csv.Error as error:
            yield start, None, f"invalid CSV: {error}"
            start = reader.line_num + 1


def read_csv(stream: io.TextIOWrapper) -> tuple[list[str], Iterator[Record]]:
    """Read the header of a CSV file and return it with an iterator over its records.

    A row with more or fewer fields than the header is an invalid record. Raises
    :class:`ImportFileError` for an empty file or a header with a repeated column.
    """
    header, rows = read_csv_rows(stream)
    return header, _csv_records(header, rows)


def read_csv_rows(stream: io.TextIOWrapper
                  ) -> tuple[list[str], Iterator[tuple[int, list[str] | None, str | None]]]:
    """Read the header of a CSV file and return it with the rows as they are read.

    Each row is ``(line, fields, None)``, or ``(line, None, reason)`` when it is not valid
    CSV; the number of fields is not checked. Raises :class:`ImportFileError` as
    :func:`read_csv` does.
    """
    rows = _csv_rows(stream)
    first = next(rows, None)
    if first is None or first[1] is None:
        reason = "the file is empty" if first is None else first[2]
        raise ImportFileError(f"no CSV header found: {reason}")
    header = [name.strip() for name in first[1]]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ImportFileError(f"the CSV header repeats the column {', '.join(repeated)}")
    return header, rows


def _csv_records(header: list[str], rows: Iterator[tuple[int, list[str] | None, str | None]]
                 ) -> Iterator[Record]:
    width = len(header)
    for line, row, error in rows:
        if row is None:
            yield Record(line, None, error)
        elif len(row) != width:
            yield Record(line, None, f"the row has {len(row)} fields but the header has {width}")
        else:
            yield Record(line, dict(zip(header, row, strict=True)))


def read_jsonl(stream: io.TextIOWrapper) -> Iterator[Record]:
    """Yield one record per non-blank line; each line must be one JSON object."""
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if "\\u" in line:
                value = replace_lone_surrogates(value)
        except json.JSONDecodeError as error:
            yield Record(line_number, None, f"invalid JSON: {error.msg} at column {error.colno}")
            continue
        except (ValueError, RecursionError) as error:
            # Integers of more than 4300 digits, and nesting deeper than the recursion limit.
            yield Record(line_number, None, f"invalid JSON: {error}")
            continue
        if not isinstance(value, dict):
            yield Record(line_number, None, f"expected a JSON object, got {type(value).__name__}")
            continue
        yield Record(line_number, value)


def check_header(header: list[str], required: tuple[str, ...]) -> None:
    """Raise :class:`ImportFileError` naming every required column the header lacks."""
    missing = [name for name in required if name not in header]
    if missing:
        names = ", ".join(missing)
        found = ", ".join(header)
        raise ImportFileError(f"missing required column {names} in the header (found: {found})")
