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

A bot or agent row with an empty ``user_id`` is stored with the conversation's user as its
contact: the ``user_id`` of the conversation's first user row, even when the bot spoke
first. The file is parsed once. A row whose conversation has no user yet waits, with the
rows after it, until that user appears or the file ends; when more than
``MAX_WAITING_ROWS`` rows wait, the users of the whole file are read in a second pass.
Before that parse, the whole file is decoded once without parsing, so that a file with
invalid UTF-8 is rejected before anything is stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from collections.abc import Iterator
from datetime import datetime, tzinfo
from typing import Any

from chatmw import events as ev
from chatmw.importers.source import (
    ImportFileError,
    Row,
    RowError,
    Skipped,
    TextFile,
    check_header,
    read_csv_rows,
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
# Rows held back while the first of them waits for its conversation's user. Past this
# many, the users are read from the whole file in a second pass instead.
MAX_WAITING_ROWS = 20_000


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


class _UserRowError(RowError):
    """A row error found after the user id check of a row whose user is not known yet.

    Once the user is known, a user id that is too long is the reason reported instead.
    """

    def __init__(self, reason: str, identity: tuple[str, str]) -> None:
        super().__init__(reason)
        self.identity = identity


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
        # True once ``users`` holds the users of the whole file.
        self.users_complete = False

    def _records(self, stream: Any) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        # (line, values, None) for each record, or (line, None, reason) for an unreadable one.
        if self.file_format == "jsonl":
            return ((record.line, record.values, record.error) for record in read_jsonl(stream))
        header, rows = read_csv_rows(stream)
        check_header(header, REQUIRED_COLUMNS)
        too_long = [name for name in header if len(name) > MAX_ATTRIBUTE_NAME_CHARS]
        if too_long:
            raise ImportFileError(f"column name {too_long[0]!r} is longer than "
                                  f"{MAX_ATTRIBUTE_NAME_CHARS} characters")
        return _csv_values(header, rows)

    def scan(self) -> None:
        """Check that the file is UTF-8 (raises UnicodeDecodeError), before any row is read."""
        self.file.check_utf8()

    def scan_users(self) -> None:
        """Read the whole file to find each conversation's user; raises ImportFileError."""
        with self.file.open() as stream:
            for _, values, _ in self._records(stream):
                if values is None:
                    continue
                try:
                    if self.file_format == "jsonl":
                        values = _as_strings(values)
                except RowError:
                    continue  # reported with its line number when the row is read
                self._note_user(values)
        self.users_complete = True

    def _note_user(self, values: dict[str, str | None]) -> tuple[str, str] | None:
        # Returns the conversation whose user this row names first.
        if (values.get("role") or "").strip().lower() != "user":
            return None
        user_id = (values.get("user_id") or "").strip()
        if not user_id:
            return None
        try:
            identity = (self._channel(values), _required(values, "conversation_id"))
        except RowError:
            return None  # reported with its line number when the row is converted
        if identity in self.users:
            return None
        self.users[identity] = user_id
        return identity

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
        """Yield each record, in file order, as a message or as the reason it was skipped.

        A row without ``user_id`` whose conversation's user is not known yet is held back,
        with every row after it, until that user appears, the file ends, or more than
        ``MAX_WAITING_ROWS`` rows wait (see the module documentation).
        """
        # Held rows in file order as [line, item, conversation still waiting for its user].
        held: deque[list[Any]] = deque()
        waiting: dict[tuple[str, str], list[list[Any]]] = {}
        with self.file.open() as stream:
            for line, values, error in self._records(stream):
                item, waits_for, noted = self._item(line, values, error)
                if waits_for is not None:
                    entry: list[Any] = [line, item, waits_for]
                    waiting.setdefault(waits_for, []).append(entry)
                    held.append(entry)
                elif held:
                    held.append([line, item, None])
                else:
                    yield item
                    continue
                if noted is not None:
                    _resolve(waiting.pop(noted, ()), self.users[noted])
                if len(held) > MAX_WAITING_ROWS:
                    self.scan_users()
                    for conversation, entries in waiting.items():
                        _resolve(entries, self.users.get(conversation))
                    waiting.clear()
                while held and held[0][2] is None:
                    yield held.popleft()[1]
        for conversation, entries in waiting.items():
            _resolve(entries, self.users.get(conversation))
        for rest in held:
            yield rest[1]

    def _item(self, line: int, values: dict[str, Any] | None, error: str | None
              ) -> tuple[Row | Skipped, tuple[str, str] | None, tuple[str, str] | None]:
        # The record as a row or a skip, the conversation whose user it waits for, and the
        # conversation whose user it names first.
        if values is None:
            return Skipped(line, error or "unreadable record"), None, None
        noted = None
        try:
            if self.file_format == "jsonl":
                values = _as_strings(values)
            noted = self._note_user(values)
            message, waits_for = self._message(values)
        except _UserRowError as row_error:
            return Skipped(line, str(row_error)), row_error.identity, noted
        except RowError as row_error:
            return Skipped(line, str(row_error)), None, noted
        return Row(line, message), waits_for, noted

    def to_message(self, values: dict[str, Any]) -> ev.Message:
        """Turn one record into a message; raises RowError with the reason it is invalid.

        A row without ``user_id`` gets the user of its conversation found so far (see
        :meth:`scan_users`), or else the conversation id.
        """
        if self.file_format == "jsonl":
            values = _as_strings(values)
        try:
            return self._message(values)[0]
        except _UserRowError as error:
            raise RowError(str(error)) from None

    def _message(self, values: dict[str, str | None]
                 ) -> tuple[ev.Message, tuple[str, str] | None]:
        # The message, and its conversation when the row has no user_id and the
        # conversation's user is not known yet: the message then has the conversation id
        # as its user, the user it gets when the file names none.
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
        waits_for: tuple[str, str] | None = None
        if not user_id:
            identity = (channel, conversation_id)
            known = self.users.get(identity)
            if known is None and not self.users_complete:
                waits_for = identity
            user_id = known or conversation_id
        if len(conversation_id) > MAX_ID_CHARS:
            raise RowError(f"conversation_id is longer than {MAX_ID_CHARS} characters")
        if len(user_id) > MAX_ID_CHARS:
            raise RowError(f"user_id is longer than {MAX_ID_CHARS} characters")
        try:
            if message_id is not None and len(message_id) > MAX_ID_CHARS:
                raise RowError(f"message_id is longer than {MAX_ID_CHARS} characters")
            attributes = self._attributes(values)
        except RowError as error:
            if waits_for is None:
                raise
            raise _UserRowError(str(error), waits_for) from None

        # The time is part of the key only without a message id.
        at_ms = 0 if message_id else ev.to_ms(occurred_at)
        key = message_key(channel, conversation_id, message_id, at_ms, role, text)
        message = ev.Message(
            channel=channel,
            occurred_at=occurred_at,
            key=key,
            role=role,  # type: ignore[arg-type]
            user_id=user_id,
            text=text,
            conversation_id=conversation_id,
            platform_message_id=message_id,
            attributes=attributes,
        )
        return message, waits_for

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


def _csv_values(header: list[str], rows: Iterator[tuple[int, list[str] | None, str | None]]
                ) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    width = len(header)
    for line, row, error in rows:
        if row is None:
            yield line, None, error
        elif len(row) != width:
            yield line, None, f"the row has {len(row)} fields but the header has {width}"
        else:
            yield line, dict(zip(header, row, strict=True)), None


def _resolve(entries: Any, user_id: str | None) -> None:
    # Gives held rows their conversation's user (None: none in the file, so the
    # conversation id they already carry), or the reason a too long one skips them.
    for entry in entries:
        line, item, _ = entry
        entry[2] = None
        if user_id is None:
            continue
        if len(user_id) > MAX_ID_CHARS:
            entry[1] = Skipped(line, f"user_id is longer than {MAX_ID_CHARS} characters")
        elif isinstance(item, Row):
            entry[1] = Row(line, dataclasses.replace(item.message, user_id=user_id))
