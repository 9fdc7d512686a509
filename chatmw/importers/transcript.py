"""Transcripts as one row per message, from CSV or JSON Lines.

Columns: ``conversation_id``, ``timestamp``, ``role`` and ``text`` are required, and
``message_id``, ``user_id`` and ``channel`` are optional. Every other column becomes a
conversation attribute (``company``, ``plan``, ...). An empty value sets no attribute.
A CSV header without a required column rejects the whole file. JSON Lines has no header,
so there a missing key rejects only its line.

Timestamps are ISO-8601 with a UTC offset (``2024-03-01T09:00:00Z``,
``2024-03-01T09:00:00.250+01:00``). A timestamp without an offset is rejected, unless
the caller names the time zone such timestamps are in (``naive_timezone``), because a
guessed zone would shift every response time and daily bucket without any warning.

The file is read twice: the first pass records each conversation's user (the ``user_id``
of its first user row), so that a bot or agent row with an empty ``user_id`` is stored
with that user as its contact even when the bot spoke first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, tzinfo
from typing import Any

from chatmw import events as ev
from chatmw.importers.source import (
    ImportFileError,
    Record,
    Row,
    RowError,
    Skipped,
    TextFile,
    check_header,
    read_csv,
    read_jsonl,
)

__all__ = ["REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "TranscriptSource", "message_key"]

REQUIRED_COLUMNS = ("conversation_id", "timestamp", "role", "text")
OPTIONAL_COLUMNS = ("message_id", "user_id", "channel")
KNOWN_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)

# Column sizes of the store (chatmw/store/models.py): longer values are rejected per row.
MAX_ID_CHARS = 255
MAX_CHANNEL_CHARS = 32
MAX_ATTRIBUTE_NAME_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 255


def message_key(channel: str, conversation_id: str, message_id: str | None, at_ms: int, role: str,
                text: str | None) -> str:
    """Return the store key of an imported message, the same on every import of the row.

    With a ``message_id`` the key is ``import:{channel}:{conversation_id}:{message_id}``.
    Without one it is derived from the time, the role and a hash of the text, so two rows
    that agree on all of these are one message. A key longer than the store's 255
    characters is replaced by a hash of the same parts.
    """
    if message_id:
        key = f"import:{channel}:{conversation_id}:{message_id}"
    else:
        digest = hashlib.sha256((text or "").encode("utf-8")).hexdigest()[:16]
        key = f"import:{channel}:{conversation_id}:{at_ms}:{role}:{digest}"
    if len(key) <= MAX_ID_CHARS:
        return key
    return f"import:{channel}:sha256:{hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def _as_strings(values: dict[str, Any]) -> dict[str, str | None]:
    # JSON may give numbers or booleans, which are stored as written; null stays None.
    strings: dict[str, str | None] = {}
    for column, value in values.items():
        if value is None or isinstance(value, str):
            strings[column] = value
        elif isinstance(value, bool):
            strings[column] = "true" if value else "false"
        elif isinstance(value, int | float):
            strings[column] = str(value)
        else:
            raise RowError(f"column {column} must be a string or a number, "
                           f"got {type(value).__name__}")
    return strings


def _required(values: dict[str, str | None], column: str) -> str:
    if column not in values:
        raise RowError(f"missing column {column}")
    value = values[column]
    if value is None or not value.strip():
        raise RowError(f"empty {column}")
    return value.strip()


def parse_timestamp(value: str, naive_timezone: tzinfo | None) -> datetime:
    """Parse an ISO-8601 timestamp; one without offset needs ``naive_timezone``."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RowError(f"invalid timestamp {value!r}: expected ISO-8601 such as "
                       "2024-03-01T09:00:00Z") from None
    if moment.tzinfo is not None:
        return moment
    if naive_timezone is None:
        raise RowError(f"timestamp {value!r} has no UTC offset: add one (Z, +01:00) or pass "
                       "--naive-timezone")
    return moment.replace(tzinfo=naive_timezone)


class TranscriptSource:
    """Messages from a CSV or JSON Lines transcript with one row per message."""

    def __init__(self, file: TextFile, file_format: str, default_channel: str = "import",
                 naive_timezone: tzinfo | None = None) -> None:
        if file_format not in ("csv", "jsonl"):
            raise ValueError(f"unknown transcript format {file_format!r}: use csv or jsonl")
        if not default_channel or len(default_channel) > MAX_CHANNEL_CHARS:
            raise ValueError(f"invalid channel {default_channel!r}: use 1 to "
                             f"{MAX_CHANNEL_CHARS} characters")
        self.file = file
        self.file_format = file_format
        self.default_channel = default_channel
        self.naive_timezone = naive_timezone
        # (channel, conversation id) -> user_id of the conversation's first user row.
        self.users: dict[tuple[str, str], str] = {}

    def _records(self, stream: Any) -> Iterator[Record]:
        if self.file_format == "jsonl":
            return read_jsonl(stream)
        header, records = read_csv(stream)
        check_header(header, REQUIRED_COLUMNS)
        too_long = [name for name in header if len(name) > MAX_ATTRIBUTE_NAME_CHARS]
        if too_long:
            raise ImportFileError(f"column name {too_long[0]!r} is longer than "
                                  f"{MAX_ATTRIBUTE_NAME_CHARS} characters")
        return records

    def scan(self) -> None:
        """Read the file once to find each conversation's user; raises ImportFileError."""
        with self.file.open() as stream:
            for record in self._records(stream):
                if record.values is not None:
                    self._note_user(record.values)

    def _note_user(self, values: dict[str, Any]) -> None:
        try:
            if self.file_format == "jsonl":
                values = _as_strings(values)
            if (values.get("role") or "").strip().lower() != "user":
                return
            user_id = (values.get("user_id") or "").strip()
            if not user_id:
                return
            identity = (self._channel(values), _required(values, "conversation_id"))
        except RowError:
            return  # reported with its line number on the second pass
        self.users.setdefault(identity, user_id)

    def _channel(self, values: dict[str, str | None]) -> str:
        channel = values.get("channel")
        if channel is None or not channel.strip():
            return self.default_channel
        channel = channel.strip()
        if len(channel) > MAX_CHANNEL_CHARS:
            raise RowError(f"channel {channel[:40]!r} is longer than {MAX_CHANNEL_CHARS} "
                           "characters")
        return channel

    def rows(self) -> Iterator[Row | Skipped]:
        """Yield each record as a message or as the reason it was skipped."""
        with self.file.open() as stream:
            for record in self._records(stream):
                if record.values is None:
                    yield Skipped(record.line, record.error or "unreadable record")
                    continue
                try:
                    yield Row(record.line, self.to_message(record.values))
                except RowError as error:
                    yield Skipped(record.line, str(error))

    def to_message(self, values: dict[str, Any]) -> ev.Message:
        """Turn one record into a message; raises RowError with the reason it is invalid."""
        if self.file_format == "jsonl":
            values = _as_strings(values)
        conversation_id = _required(values, "conversation_id")
        role = _required(values, "role").lower()
        if role not in ev.ROLES:
            raise RowError(f"unknown role {role!r}: expected user, bot or agent")
        occurred_at = parse_timestamp(_required(values, "timestamp"), self.naive_timezone)
        if "text" not in values:
            raise RowError("missing column text")
        text = values["text"]
        channel = self._channel(values)
        message_id = (values.get("message_id") or "").strip() or None
        user_id = (values.get("user_id") or "").strip()
        if not user_id:
            user_id = self.users.get((channel, conversation_id), conversation_id)
        for column, value in (("conversation_id", conversation_id), ("user_id", user_id),
                              ("message_id", message_id or "")):
            if len(value) > MAX_ID_CHARS:
                raise RowError(f"{column} is longer than {MAX_ID_CHARS} characters")

        key = message_key(channel, conversation_id, message_id, ev.to_ms(occurred_at), role, text)
        return ev.Message(
            channel=channel,
            occurred_at=occurred_at,
            key=key,
            role=role,  # type: ignore[arg-type]
            user_id=user_id,
            text=text,
            conversation_id=conversation_id,
            platform_message_id=message_id,
            attributes=self._attributes(values),
        )

    def _attributes(self, values: dict[str, str | None]) -> dict[str, str]:
        attributes: dict[str, str] = {}
        for name, value in values.items():
            if name in KNOWN_COLUMNS:
                continue
            if value is None or not value.strip():
                continue
            if len(name) > MAX_ATTRIBUTE_NAME_CHARS:
                raise RowError(f"attribute name {name[:40]!r} is longer than "
                               f"{MAX_ATTRIBUTE_NAME_CHARS} characters")
            if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
                raise RowError(f"attribute {name} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} "
                               "characters")
            attributes[name] = value.strip()
        return attributes
