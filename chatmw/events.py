"""Typed events: the only thing sources hand to the recorder.

Every source (ASGI middleware, platform adapters, the web widget, transcript import, the
survey dispatcher) translates its input into these records. Nothing downstream depends on
which source made an event. Times are timezone-aware ``datetime`` values; the store keeps
them as integer milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import keyword
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from datetime import UTC, datetime
from types import MemberDescriptorType
from typing import Any, Literal

__all__ = [
    "ROLES",
    "Event",
    "Message",
    "Status",
    "Touch",
    "ConversationUpdate",
    "Exposure",
    "RawPayload",
    "Role",
    "now_utc",
    "to_ms",
    "from_ms",
    "storable",
    "field_reader",
    "values_builder",
    "checked_builder",
]

Role = Literal["user", "bot", "agent"]
ROLES: tuple[str, ...] = ("user", "bot", "agent")

# Characters no store takes: PostgreSQL rejects NUL in text, SQLite ids with NUL are read
# back cut short, and a lone surrogate has no UTF-8 encoding.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Field types that never contain text, skipped without a closer look.
_PLAIN_TYPES = frozenset({int, float, bool, bytes, datetime})
# Containers in event fields nested deeper than this are left as they are.
_MAX_CLEAN_DEPTH = 64

# Widths of the columns that store identifiers and names (characters). A longer value would
# be cut by PostgreSQL's casts, and two ids sharing a prefix would become one, so it is
# replaced by a prefix and a hash of the whole value instead (see ``fit_id``).
_ID_WIDTHS = {
    "channel": 32,
    "key": 255,
    "user_id": 255,
    "conversation_id": 255,
    "platform_message_id": 255,
    "reply_to": 255,
    "kind": 32,
    "status": 16,
    "intent": 128,
    "step": 128,
    "ended_reason": 64,
}


def fit_id(value: str, width: int) -> str:
    """Return ``value`` if it fits ``width`` characters, else a prefix plus its SHA-256.

    The result is deterministic, so the same long id always maps to the same stored id,
    and ids that differ anywhere stay different.
    """
    if len(value) <= width:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    keep = max(0, width - len(digest) - 1)
    return f"{value[:keep]}~{digest}"[:width] if keep else digest[:width]


def now_utc() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def to_ms(moment: datetime) -> int:
    """Convert an aware datetime to integer milliseconds since the epoch."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: a time zone is required")
    return int(round(moment.timestamp() * 1000))


def from_ms(ms: int) -> datetime:
    """Convert milliseconds since the epoch to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def _has_unstorable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        if value.isascii():
            return "\x00" in value
        return _UNSTORABLE.search(value) is not None
    if depth >= _MAX_CLEAN_DEPTH:
        return False
    if isinstance(value, Mapping):
        return any(_has_unstorable(k, depth + 1) or _has_unstorable(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_unstorable(item, depth + 1) for item in value)
    return False


def storable(value: Any, depth: int = 0) -> Any:
    """Return ``value`` with NUL and lone surrogates in its strings replaced by U+FFFD.

    Descends into mappings, lists and tuples; returns ``value`` itself when nothing changed.
    """
    if not _has_unstorable(value, depth):
        return value
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {storable(k, depth + 1): storable(v, depth + 1) for k, v in value.items()}
    return type(value)(storable(item, depth + 1) for item in value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event. ``channel`` names the platform (web, messenger, whatsapp, ...).

    Construction replaces NUL and lone surrogates in string fields, including those inside
    mappings and lists, by U+FFFD (see :func:`storable`).
    """

    channel: str
    occurred_at: datetime

    def __post_init__(self) -> None:
        # Every source builds events, so this one check keeps any text the store cannot
        # take (see ``storable``) from failing the batch write and losing the event.
        checker = _CHECKERS.get(self.__class__)
        if checker is None:
            checker = _CHECKERS[self.__class__] = _fields_checker(self.__class__)
        checker(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Events cross process boundaries (the writer process) in every batch: a tuple of
        # field values pickles several times faster than the dataclass's own state, and
        # unpickling skips the checks above, which the values already passed.
        return _rebuild, (self.__class__, _field_values(self))

    def copy_with(self, **changes: Any) -> Event:
        """Return a copy with ``changes``, which must be storable values of fitting width.

        Unlike :func:`dataclasses.replace` it runs no checks: it serves transforms that
        put values known to pass them, such as pseudonyms.
        """
        read, _, positions, build = _slots_of(self.__class__)
        values = list(read(self))
        for name, value in changes.items():
            position = positions.get(name)
            if position is None:
                unknown = sorted(set(changes) - set(positions))
                raise TypeError(f"{self.__class__.__name__} has no fields {unknown}")
            values[position] = value
        return build(values)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        # dataclasses.fields leaves out the ClassVar and InitVar pseudo-fields that
        # __dataclass_fields__ lists. They are not instance data, and a slotted instance
        # has no slot for them.
        names = _FIELD_NAMES[cls] = tuple(spec.name for spec in dataclasses.fields(cls))
    return names


def _field_values(event: Event) -> tuple[Any, ...]:
    return _slots_of(event.__class__)[0](event)


def field_reader(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """Return the function that reads the field values of an event of ``cls``, in order."""
    return _slots_of(cls)[0]


def values_builder(cls: type) -> Callable[[Sequence[Any]], Any]:
    """Return the function that builds an event of ``cls`` from all its field values, in order.

    It runs none of the checks of construction, like :meth:`Event.copy_with`, so it serves
    values read from an event with :func:`field_reader` and replaced by values known to
    pass the checks. A wrong count of values raises ValueError.
    """
    return _slots_of(cls)[3]


def _rebuild(cls: type[Event], values: Sequence[Any]) -> Event:
    """Recreate an event of ``cls`` from its field values (see ``Event.__reduce__``)."""
    return _slots_of(cls)[3](values)


# Per event class: a function returning its field values in order, a function per field
# that sets it on an instance, each field's position, and a function that builds an
# instance from the values in order (without the checks of construction).
_Slots = tuple[Callable[[Any], tuple[Any, ...]], tuple[Callable[[Any, Any], None], ...],
               dict[str, int], Callable[[Sequence[Any]], Any]]
_SLOTS: dict[type, _Slots] = {}


def _slots_of(cls: type) -> _Slots:
    found = _SLOTS.get(cls)
    if found is None:
        names = _field_names(cls)
        read = operator.attrgetter(*names)
        if len(names) == 1:
            # attrgetter of one name returns the value itself, not a tuple.
            single = read
            read = lambda event: (single(event),)  # noqa: E731
        setters: list[Callable[[Any, Any], None]] = []
        for name in names:
            slot = getattr(cls, name, None)
            if isinstance(slot, MemberDescriptorType):
                # The slot's own setter skips the frozen dataclass's __setattr__, as
                # object.__setattr__ does, without looking the field's name up.
                setters.append(slot.__set__)
            else:
                # A subclass declared without slots keeps this field in its __dict__.
                setters.append(functools.partial(_set_field, name))
        found = _SLOTS[cls] = (read, tuple(setters), {name: i for i, name in enumerate(names)},
                               _values_builder(cls, setters))
    return found


def _values_builder(cls: type, setters: Sequence[Callable[[Any, Any], None]]
                    ) -> Callable[[Sequence[Any]], Any]:
    # Generated code that unpacks the values and calls each field's setter by position. A
    # loop over zip() took about a third more instructions per Message (counted with
    # callgrind). The unpacking raises ValueError for a wrong count of values.
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = []
    targets = []
    for index, setter in enumerate(setters):
        namespace[f"set_{index}"] = setter
        targets.append(f"v_{index},")
        lines.append(f"    set_{index}(event, v_{index})")
    source = ("def build(values):\n"
              f"    {' '.join(targets)} = values\n"
              "    event = new(cls)\n"
              + "\n".join(lines) + "\n"
              "    return event\n")
    exec(compile(source, f"<chatmw.events build of {cls.__name__}>", "exec"), namespace)
    return namespace["build"]  # type: ignore[no-any-return]


def checked_builder(cls: type[Event], names: Sequence[str]) -> Callable[..., Any]:
    """Return a function that builds an event of ``cls`` from the values of ``names``, in order.

    ``checked_builder(Message, ("channel", ...))(*values)`` equals ``Message(channel=...,
    ...)``: the other fields get their defaults, and the checks of construction run. A
    frozen dataclass sets each field through ``object.__setattr__``, so this builder takes
    fewer instructions (see docs/performance.md). Every field without a default must be
    named.
    """
    fields = {spec.name: spec for spec in dataclasses.fields(cls)}
    parameters = set(inspect.signature(cls).parameters)
    unknown = [name for name in names if name not in parameters]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if unknown or repeated:
        raise TypeError(f"{cls.__name__} fields must be named once each, got {list(names)}: "
                        f"unknown {unknown}, repeated {repeated}")
    if parameters != {name for name, spec in fields.items() if spec.init}:
        # The constructor takes InitVar values for __post_init__, or the class has its own
        # __init__. Only calling the constructor then builds the same event.
        return _constructor_builder(cls, tuple(names))
    setters = _slots_of(cls)[1]
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls, **_CHECK_NAMES}
    lines = []
    # The checks of Event run inline on the named values and on the defaults that might
    # need them. A subclass with its own __post_init__ gets that method called instead.
    inline = cls.__post_init__ is Event.__post_init__  # type: ignore[attr-defined]
    checked: list[tuple[str, str]] = []
    for index, (name, spec) in enumerate(fields.items()):
        namespace[f"set_{index}"] = setters[index]
        if name in names:
            value = f"a_{names.index(name)}"
            checked.append((name, value))
        elif not spec.init and spec.default is MISSING and spec.default_factory is MISSING:
            # The constructor leaves this field unset too (a __post_init__ may set it).
            checked.append((name, f"self.{name}"))
            continue
        elif spec.default is not MISSING:
            namespace[f"default_{index}"] = spec.default
            value = f"default_{index}"
            if not _passes_checks(name, spec.default):
                checked.append((name, f"self.{name}"))
        elif spec.default_factory is not MISSING:
            namespace[f"factory_{index}"] = spec.default_factory
            value = f"factory_{index}()"
            if spec.default_factory not in (dict, list):
                checked.append((name, f"self.{name}"))
        else:
            raise TypeError(f"{cls.__name__} field {name!r} has no default and must be named")
        lines.append(f"    set_{index}(self, {value})")

    if inline:
        lines += _check_lines(cls, checked)
    else:
        namespace["post_init"] = cls.__post_init__  # type: ignore[attr-defined]
        lines.append("    post_init(self)")
    arguments = ", ".join(f"a_{index}" for index in range(len(names)))
    source = (f"def build({arguments}):\n"
              "    self = new(cls)\n"
              + "\n".join(lines) + "\n"
              "    return self\n")
    exec(compile(source, f"<chatmw.events checked build of {cls.__name__}>", "exec"), namespace)
    return namespace["build"]  # type: ignore[no-any-return]


def _constructor_builder(cls: type[Event], names: tuple[str, ...]) -> Callable[..., Any]:
    def build(*values: Any) -> Any:
        if len(values) != len(names):
            raise TypeError(f"{cls.__name__} builder expected {len(names)} values "
                            f"for {list(names)}, got {len(values)}")
        return cls(**dict(zip(names, values, strict=True)))
    return build


def _passes_checks(name: str, value: Any) -> bool:
    # A default value that the checks of construction would leave as it is.
    if value is None or value.__class__ in _PLAIN_TYPES:
        return True
    width = _ID_WIDTHS.get(name, 0)
    return (value.__class__ is str and value.isascii() and "\x00" not in value
            and not (width and len(value) > width))


def _set_field(name: str, event: Any, value: Any) -> None:
    object.__setattr__(event, name, value)


def _plain_text_dict(value: dict[Any, Any]) -> bool:
    # True for a dict of ASCII strings without NUL (attributes, usually), found with two
    # joins rather than one check per string. False sends the dict to the full check.
    try:
        joined = "".join(value) + "".join(value.values())
    except TypeError:
        return False
    return joined.isascii() and "\x00" not in joined


# Per event class: the function that runs the checks of construction (see _fields_checker).
_CHECKERS: dict[type, Callable[[Any], None]] = {}


def _fields_checker(event_class: type) -> Callable[[Any], None]:
    fields = [(name, f"self.{name}") for name in _field_names(event_class)]
    lines = ["def check(self):", *_check_lines(event_class, fields), "    return None"]
    source = "\n".join(lines) + "\n"
    namespace = dict(_CHECK_NAMES)
    exec(compile(source, f"<chatmw.events checks of {event_class.__name__}>", "exec"), namespace)
    return namespace["check"]  # type: ignore[no-any-return]


def _check_lines(event_class: type, fields: Sequence[tuple[str, str]]) -> list[str]:
    # Generated code that checks each field's value, read from its expression, on the
    # instance ``self``. The common cases are settled inline: None, ASCII text without NUL
    # that fits the field's width, values of the types that contain no text, and empty dicts.
    # Other values go to _check_text or _check_value. A loop over the fields with getattr()
    # took at least a third more instructions per Message (counted with callgrind). Field
    # names go into the code, so each is checked to be an identifier.
    lines = []
    for name, expression in fields:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise TypeError(f"{event_class.__name__} field {name!r} is not an identifier")
        width = _ID_WIDTHS.get(name, 0)
        lines += [
            f"    value = {expression}",
            "    if value is not None:",
            "        if value.__class__ is str:",
            "            if not (value.isascii() and '\\x00' not in value):",
            f"                value = check_text(self, {name!r}, value)",
        ]
        if width:
            lines += [
                f"            if len(value) > {width}:",
                f"                set_field(self, {name!r}, fit_id(value, {width}))",
            ]
        lines += [
            "        elif value.__class__ not in plain_types and (",
            "                value.__class__ is not dict or value):",
            f"            check_value(self, {name!r}, value, {width})",
        ]
    return lines


def _check_text(event: Any, name: str, value: str) -> str:
    # A str field that is not plain ASCII, or contains NUL.
    if _UNSTORABLE.search(value) is not None:
        value = _UNSTORABLE.sub("\ufffd", value)
        object.__setattr__(event, name, value)
    return value


def _check_value(event: Any, name: str, value: Any, width: int) -> None:
    # A field that is neither None nor a str. An id of a str subclass is fitted like a str.
    kind = value.__class__
    if kind in _PLAIN_TYPES or (kind is dict and _plain_text_dict(value)):
        return
    if _has_unstorable(value):
        value = storable(value)
        object.__setattr__(event, name, value)
    if width and isinstance(value, str) and len(value) > width:
        object.__setattr__(event, name, fit_id(value, width))


# The names that the generated checks use.
_CHECK_NAMES: dict[str, Any] = {"check_text": _check_text, "check_value": _check_value,
                                "fit_id": fit_id, "set_field": object.__setattr__,
                                "plain_types": _PLAIN_TYPES}


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Event):
    """One message in either direction.

    ``key`` is unique across the store: the platform message id where there is one, or a
    key derived from the import row or generated at the request. The same key stored twice
    is counted once. ``conversation_id`` is the source's own conversation id. When it is
    ``None`` the writer assigns the message to the contact's open conversation, or starts
    a new one after the configured silence.
    """

    key: str
    role: Role
    user_id: str
    text: str | None = None
    conversation_id: str | None = None
    platform_message_id: str | None = None
    kind: str = "message"
    latency_ms: float | None = None
    intent: str | None = None
    reply_to: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Event):
    """A delivery status of an outbound message, linked by the platform message id."""

    platform_message_id: str
    status: str
    user_id: str | None = None
    error_code: str | None = None
    error_title: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Touch(Event):
    """An attribution touch: a campaign link, an ad click or a referral that led to a chat.

    ``key`` makes a touch idempotent, as for messages.
    """

    key: str
    user_id: str
    conversation_id: str | None = None
    kind: str = "link"
    source: str | None = None
    medium: str | None = None
    campaign: str | None = None
    term: str | None = None
    content: str | None = None
    ad_id: str | None = None
    ref: str | None = None
    click_id: str | None = None
    referrer: str | None = None
    landing_url: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationUpdate(Event):
    """Facts about a conversation reported by the bot or the app.

    Each field left ``None`` is unchanged. ``ended`` closes the conversation with
    ``ended_reason``; a later message reopens it. Without ``conversation_id`` the update
    applies to the latest conversation of the user (on ``channel``) that started at or
    before it. When the user has no such conversation, or no contact yet, it changes
    nothing and creates no contact.
    """

    user_id: str
    conversation_id: str | None = None
    ended: bool | None = None
    ended_reason: str | None = None
    resolved: bool | None = None
    handed_off: bool | None = None
    intent: str | None = None
    step: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Exposure(Event):
    """A user was reached without writing: a widget impression or open, a proactive send."""

    key: str
    user_id: str
    kind: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawPayload(Event):
    """A body that a source accepted but could not parse, kept for inspection."""

    source: str
    body: bytes
    reason: str
