"""Transcript import: files of past conversations written as Message events.

Formats: ``csv`` and ``jsonl`` (one row per message, see :mod:`chatmw.importers.transcript`)
and ``twcs``, the "Customer Support on Twitter" dataset (:mod:`chatmw.importers.twcs`).
Rows go through the same :class:`~chatmw.store.writer.Writer` as live traffic, in batches,
and every message has a key derived from the row, so importing a file twice stores it once.
"""

from __future__ import annotations

from datetime import tzinfo
from pathlib import Path

from chatmw.importers.pipeline import (
    DEFAULT_BATCH_SIZE,
    ImportAborted,
    ImportReport,
    MessageSource,
    run_import,
)
from chatmw.importers.source import ImportFileError, Skipped, TextFile
from chatmw.importers.transcript import TranscriptSource
from chatmw.importers.twcs import TwcsSource

__all__ = [
    "FORMATS",
    "DEFAULT_BATCH_SIZE",
    "ImportAborted",
    "ImportFileError",
    "ImportReport",
    "MessageSource",
    "Skipped",
    "TextFile",
    "detect_format",
    "open_source",
    "run_import",
]

FORMATS = ("csv", "jsonl", "twcs")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def detect_format(path: Path) -> str:
    """Return the format named by the file's extension; raises ValueError for another one."""
    file_format = EXTENSIONS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(f"cannot tell the format of {path.name} from its extension: "
                         f"pass --format ({', '.join(FORMATS)})")
    return file_format


def open_source(file: TextFile, file_format: str, channel: str | None = None,
                naive_timezone: tzinfo | None = None) -> MessageSource:
    """Return the reader of ``file_format``; ``channel`` overrides the format's default."""
    if file_format == "twcs":
        return TwcsSource(file, channel=channel or "twitter")
    if file_format in ("csv", "jsonl"):
        return TranscriptSource(file, file_format, default_channel=channel or "import",
                                naive_timezone=naive_timezone)
    raise ValueError(f"unknown format {file_format!r}: use one of {', '.join(FORMATS)}")
