"""A durable local spool: events the store could not take yet, kept on disk until replayed.

Layout of the spool directory (created with mode 0700; files are 0600 because they hold
message text):

- ``segment-<seq>.log``: append-only segment files. Each line is one batch, written as
  ``<crc32 hex> <json>\\n`` and fsynced before :meth:`FileSpool.append` returns. The JSON
  contains the append time and the batch's events. Datetimes and bytes are tagged, so
  they decode to equal values (see :func:`encode_event`).
- ``segment-<seq>.offset``: how far replay has got in that segment, in bytes. It is written
  after each replayed chunk without fsync: after a crash replay may repeat a chunk, which
  the idempotent writer stores once.
- ``rejected.log``: batches that could not be decoded and events the writer rejected
  with a non-retryable error, in the same line format, kept for inspection and never
  replayed. It does not count towards ``max_bytes``.
- ``LOCK``: held with ``flock`` by the one process that uses the spool.

An incomplete last line (a write cut short by a crash) is ignored: that batch was never
acknowledged, because its fsync had not returned. A complete line whose checksum does not
match is moved to ``rejected.log`` by replay, and the lines after it are replayed.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from chatmw.events import Event

__all__ = [
    "FileSpool",
    "SpoolChunk",
    "SpoolSettings",
    "SpoolStats",
    "SpoolLockedError",
    "encode_event",
    "decode_event",
    "register_event_type",
]

logger = logging.getLogger("chatmw")

SEGMENT_PATTERN = re.compile(r"^segment-(\d{12})\.log$")
# Modules whose event classes the decoder may import by name. Classes defined elsewhere
# must be passed to :func:`register_event_type` before a spool holding them is replayed.
IMPORTABLE_PREFIXES = ("chatmw.", "adapters.")


# The spool directory; without it chatmw runs without a spool.
SPOOL_DIR_ENV = "CHATMW_SPOOL_DIR"
# The bound on the spool's total size in bytes (default 256 MiB).
SPOOL_MAX_BYTES_ENV = "CHATMW_SPOOL_MAX_BYTES"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class SpoolLockedError(RuntimeError):
    """Another process has the spool directory open."""


@dataclass(slots=True)
class SpoolSettings:
    """Settings of the file spool.

    ``directory`` contains the segment files. ``max_bytes`` bounds their total size: an
    append that would pass it is rejected and counted as ``spool_full``. ``segment_bytes``
    is the size after which a new segment file is started.
    """

    directory: str | os.PathLike[str]
    max_bytes: int = DEFAULT_MAX_BYTES
    segment_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.segment_bytes < 1:
            raise ValueError(f"segment_bytes must be at least 1, got {self.segment_bytes}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SpoolSettings | None:
        """Read ``CHATMW_SPOOL_DIR`` and ``CHATMW_SPOOL_MAX_BYTES``; ``None`` without a dir."""
        environ = os.environ if environ is None else environ
        directory = environ.get(SPOOL_DIR_ENV, "").strip()
        if not directory:
            return None
        raw_max = environ.get(SPOOL_MAX_BYTES_ENV, "").strip()
        try:
            max_bytes = int(raw_max) if raw_max else DEFAULT_MAX_BYTES
        except ValueError as error:
            raise ValueError(f"{SPOOL_MAX_BYTES_ENV} must be a whole number of bytes, "
                             f"got {raw_max!r}") from error
        return cls(directory=directory, max_bytes=max_bytes)


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """Consecutive batches read from one segment for replay."""

    segment: int
    start: int
    end: int
    events: list[Event]
    batches: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of the spool: what waits on disk and how far replay has got."""

    pending_events: int
    pending_bytes: int
    segments: int
    oldest_age_seconds: float | None
    appended_events: int
    replayed_events: int
    rejected_events: int
    full_rejections: int


@dataclass(slots=True)
class _Segment:
    seq: int
    size: int
    offset: int
    pending_events: int
    oldest_at: float | None


# Event encoding


_event_types: dict[str, type[Event]] = {}


def register_event_type(event_type: type[Event]) -> None:
    """Let the spool decode ``event_type``, an event class defined outside chatmw."""
    if not (isinstance(event_type, type) and issubclass(event_type, Event)):
        raise ValueError(f"{event_type!r} is not a subclass of chatmw.events.Event")
    _event_types[_type_name(event_type)] = event_type


def _type_name(event_type: type) -> str:
    return f"{event_type.__module__}:{event_type.__qualname__}"


def _resolve_event_type(name: str) -> type[Event]:
    if name in _event_types:
        return _event_types[name]
    module_name, _, qualname = name.partition(":")
    # Look the class up by name rather than through Event.__subclasses__(): a slots
    # dataclass leaves its first, replaced class object among the subclasses.
    module = sys.modules.get(module_name)
    if module is None and module_name.startswith(IMPORTABLE_PREFIXES):
        module = importlib.import_module(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Event):
        return found
    raise ValueError(f"unknown event type {name!r} in spool: register it with register_event_type")


def _encode_value(value: Any) -> Any:
    # Special values become {"$": tag, "v": ...}; a mapping that has its own "$" key is
    # wrapped as {"$": "map"} so that it never reads as a tag.
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        encoded: dict[str, Any] = {"$": "dt", "v": value.isoformat()}
        if isinstance(value.tzinfo, ZoneInfo):
            encoded["tz"] = value.tzinfo.key
        return encoded
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$": "b", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"$": "tuple", "v": [_encode_value(item) for item in value]}
    if isinstance(value, list):
        return [_encode_value(item) for item in value]
    if isinstance(value, Mapping):
        items = {str(key): _encode_value(item) for key, item in value.items()}
        return {"$": "map", "v": items} if "$" in items else items
    raise TypeError(f"cannot spool a value of type {type(value).__name__}")


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if not isinstance(value, dict):
        return value
    tag = value.get("$")
    if tag is None:
        return {key: _decode_value(item) for key, item in value.items()}
    if tag == "dt":
        moment = datetime.fromisoformat(value["v"])
        return moment.astimezone(ZoneInfo(value["tz"])) if "tz" in value else moment
    if tag == "b":
        return base64.b64decode(value["v"])
    if tag == "tuple":
        return tuple(_decode_value(item) for item in value["v"])
    if tag == "map":
        return {key: _decode_value(item) for key, item in value["v"].items()}
    raise ValueError(f"unknown value tag {tag!r} in spool")


def encode_event(event: Event) -> dict[str, Any]:
    """Encode ``event`` as JSON-ready data: its type name and every field."""
    fields = {f.name: _encode_value(getattr(event, f.name)) for f in dataclasses.fields(event)}
    return {"type": _type_name(type(event)), "fields": fields}


def decode_event(data: Mapping[str, Any]) -> Event:
    """Rebuild the event that :func:`encode_event` encoded."""
    event_type = _resolve_event_type(data["type"])
    fields = {name: _decode_value(value) for name, value in data["fields"].items()}
    return event_type(**fields)


def _encode_record(batch: Sequence[Event], at: float) -> bytes:
    body = json.dumps({"at": at, "events": [encode_event(e) for e in batch]},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_record(line: bytes) -> dict[str, Any] | None:
    # None for a torn or corrupt line.
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# The spool


class FileSpool:
    """Append-only segment files with fsync per append, bounded in total size.

    Thread-safe. :meth:`append` and :meth:`append_now` store a batch durably;
    :meth:`read_next`, :meth:`commit` and :meth:`reject` drive replay (the recorder does
    that). Only one process may open a directory at a time.
    """

    def __init__(self, settings: SpoolSettings) -> None:
        self.settings = settings
        self.directory = Path(settings.directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._lock_file = self._acquire_directory()
        self._segments: dict[int, _Segment] = {}
        self._active: int | None = None
        self._active_file: Any = None
        self._appended_events = 0
        self._replayed_events = 0
        self._rejected_events = 0
        self._full_rejections = 0
        # The sum of the segments' pending events, read by pending_events without the lock.
        self._pending_total = 0
        self._closed = False
        self._load()

    def __repr__(self) -> str:
        return f"FileSpool(directory={str(self.directory)!r}, max_bytes={self.settings.max_bytes})"

    def _acquire_directory(self) -> Any:
        handle = open(self.directory / "LOCK", "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.close()
            raise SpoolLockedError(
                f"spool directory {self.directory} is in use by another process: "
                "give each process its own spool directory") from error
        return handle

    def _load(self) -> None:
        for path in sorted(self.directory.iterdir()):
            match = SEGMENT_PATTERN.match(path.name)
            if not match:
                continue
            segment = self._scan(int(match.group(1)), path)
            self._segments[segment.seq] = segment
            if segment.offset >= segment.size:
                self._delete(segment)
        self._recount()
        if self._segments:
            stats = self.stats()
            logger.info("spool opened at %s: %d events pending in %d segments",
                        self.directory, stats.pending_events, stats.segments)

    def _scan(self, seq: int, path: Path) -> _Segment:
        offset = self._read_offset(seq)
        valid_end, events, oldest = 0, 0, None
        with open(path, "rb") as handle:
            position = 0
            for line in handle:
                record = _decode_record(line)
                if record is None and not line.endswith(b"\n"):
                    logger.warning("spool segment %s: incomplete record at byte %d ignored "
                                   "(a write cut short by a crash)", path.name, position)
                    break
                position += len(line)
                valid_end = position
                if record is None:
                    # A complete line that fails its checksum: replay moves it to rejected.log.
                    logger.error("spool segment %s: corrupt record at byte %d",
                                 path.name, position - len(line))
                    continue
                if position > offset:
                    events += len(record.get("events", []))
                    if oldest is None:
                        oldest = float(record.get("at", time.time()))
        return _Segment(seq=seq, size=valid_end, offset=min(offset, valid_end),
                        pending_events=events, oldest_at=oldest)

    def _segment_path(self, seq: int) -> Path:
        return self.directory / f"segment-{seq:012d}.log"

    def _offset_path(self, seq: int) -> Path:
        return self.directory / f"segment-{seq:012d}.offset"

    def _read_offset(self, seq: int) -> int:
        try:
            return int(self._offset_path(seq).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    # Appending

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: appends then return ``False``."""
        return self._closed

    def append(self, batch: Sequence[Event]) -> bool:
        """Store ``batch`` durably (fsync); ``False`` when the spool is full or closed."""
        if not batch:
            return True
        record = _encode_record(batch, time.time())
        with self._lock:
            if self._closed:
                return False
            if self._total_bytes() + len(record) > self.settings.max_bytes:
                self._full_rejections += 1
                return False
            self._write(record)
            segment = self._segments[self._active]  # type: ignore[index]
            segment.size += len(record)
            segment.pending_events += len(batch)
            self._recount()
            if segment.oldest_at is None:
                segment.oldest_at = time.time()
            self._appended_events += len(batch)
        return True

    def append_now(self, batch: Sequence[Event]) -> bool:
        """Same as :meth:`append`: the batch is on disk when this returns ``True``."""
        return self.append(batch)

    def _write(self, record: bytes) -> None:
        active = self._segments.get(self._active) if self._active is not None else None
        too_big = active is not None and active.size > 0 and (
            active.size + len(record) > self.settings.segment_bytes)
        if active is None or too_big:
            self._rotate()
        handle = self._active_file
        handle.write(record)
        handle.flush()
        os.fsync(handle.fileno())

    def _rotate(self) -> None:
        if self._active_file is not None:
            self._active_file.close()
        seq = max(self._segments, default=0) + 1
        path = self._segment_path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_file = os.fdopen(fd, "ab")
        self._fsync_directory()
        self._segments[seq] = _Segment(seq=seq, size=0, offset=0, pending_events=0, oldest_at=None)
        self._active = seq

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _total_bytes(self) -> int:
        return sum(segment.size for segment in self._segments.values())

    # Replay

    def pending_events(self) -> int:
        """Return how many spooled events wait for replay.

        It reads a count that every change updates under the lock, without taking the lock,
        so it does not wait for an append's fsync. The recorder calls it while holding its own
        lock, which the bot's request path takes too.
        """
        return self._pending_total

    def _recount(self) -> None:
        # Called under the lock after every change to the segments' pending events.
        self._pending_total = sum(segment.pending_events for segment in self._segments.values())

    def read_next(self, max_events: int) -> SpoolChunk | None:
        """Read the oldest unreplayed batches, up to ``max_events`` (at least one batch)."""
        with self._lock:
            pending = [s for s in sorted(self._segments.values(), key=lambda s: s.seq)
                       if s.offset < s.size]
            if self._closed or not pending:
                return None
            segment = pending[0]
            seq, start, end = segment.seq, segment.offset, segment.size
        events: list[Event] = []
        batches = 0
        position = start
        try:
            handle = open(self._segment_path(seq), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None  # deleted by a concurrent close or by another owner of the directory
        with handle:
            handle.seek(start)
            while position < end and (not events or len(events) < max_events):
                line = handle.readline()
                record = _decode_record(line)
                if record is None:
                    if events or not line.endswith(b"\n"):
                        break
                    # A corrupt line comes back alone, so that only it is rejected.
                    return SpoolChunk(segment=seq, start=start, end=position + len(line),
                                      events=[], batches=1, error="checksum mismatch")
                try:
                    decoded = [decode_event(item) for item in record.get("events", [])]
                except (ValueError, TypeError, KeyError) as error:
                    if events:
                        break
                    # An undecodable batch comes back alone, so that only it is rejected.
                    reason = f"{type(error).__name__}: {error}"
                    return SpoolChunk(segment=seq, start=start, end=position + len(line),
                                      events=[], batches=1, error=reason)
                if events and len(events) + len(decoded) > max_events:
                    break
                events.extend(decoded)
                position += len(line)
                batches += 1
        return SpoolChunk(segment=seq, start=start, end=position, events=events, batches=batches)

    def commit(self, chunk: SpoolChunk) -> None:
        """Mark ``chunk`` as written; a segment replayed to its end is deleted."""
        with self._lock:
            self._replayed_events += len(chunk.events)
            self._advance(chunk)

    def reject(self, chunk: SpoolChunk, reason: str) -> None:
        """Move ``chunk`` aside to ``rejected.log`` (never replayed) and skip it."""
        with open(self._segment_path(chunk.segment), "rb") as source:
            source.seek(chunk.start)
            data = source.read(chunk.end - chunk.start)
        self._append_rejected(data)
        logger.error("spool: %d batches of segment %d moved to rejected.log (%s)",
                     chunk.batches, chunk.segment, reason)
        with self._lock:
            self._rejected_events += len(chunk.events)
            self._advance(chunk)

    def quarantine(self, batch: Sequence[Event], reason: str) -> None:
        """Keep ``batch``, which the store rejected, in ``rejected.log`` for inspection."""
        self._append_rejected(_encode_record(batch, time.time()))
        logger.error("spool: %d events kept in rejected.log (%s)", len(batch), reason)
        with self._lock:
            self._rejected_events += len(batch)

    def _append_rejected(self, data: bytes) -> None:
        fd = os.open(self.directory / "rejected.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _advance(self, chunk: SpoolChunk) -> None:
        segment = self._segments.get(chunk.segment)
        if segment is None or chunk.end <= segment.offset:
            return
        segment.offset = chunk.end
        segment.pending_events = max(0, segment.pending_events - len(chunk.events))
        if segment.offset >= segment.size:
            self._delete(segment)
            self._recount()
            return
        self._recount()
        segment.oldest_at = self._record_time(segment.seq, segment.offset)
        self._write_offset(segment)

    def _record_time(self, seq: int, offset: int) -> float | None:
        with open(self._segment_path(seq), "rb") as handle:
            handle.seek(offset)
            record = _decode_record(handle.readline())
        return None if record is None else float(record.get("at", time.time()))

    def _write_offset(self, segment: _Segment) -> None:
        temporary = self._offset_path(segment.seq).with_suffix(".offset.tmp")
        temporary.write_text(str(segment.offset))
        os.replace(temporary, self._offset_path(segment.seq))

    def _delete(self, segment: _Segment) -> None:
        if segment.seq == self._active:
            self._active_file.close()
            self._active_file = None
            self._active = None
        self._segment_path(segment.seq).unlink(missing_ok=True)
        self._offset_path(segment.seq).unlink(missing_ok=True)
        del self._segments[segment.seq]

    # Observation and lifecycle

    def stats(self) -> SpoolStats:
        """Return a snapshot of sizes, ages and replay counters."""
        with self._lock:
            segments = list(self._segments.values())
            pending = [s for s in segments if s.offset < s.size]
            oldest = min((s.oldest_at for s in pending if s.oldest_at is not None), default=None)
            return SpoolStats(
                pending_events=sum(s.pending_events for s in segments),
                pending_bytes=sum(s.size for s in segments),
                segments=len(segments),
                oldest_age_seconds=None if oldest is None else max(0.0, time.time() - oldest),
                appended_events=self._appended_events,
                replayed_events=self._replayed_events,
                rejected_events=self._rejected_events,
                full_rejections=self._full_rejections,
            )

    def close(self) -> None:
        """Close the files and release the directory lock; later appends return ``False``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active_file is not None:
                self._active_file.close()
                self._active_file = None
            self._active = None
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
