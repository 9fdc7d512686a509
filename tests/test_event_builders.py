"""Event construction: the generated checks and builders against a plain reference.

``Event.__post_init__``, ``checked_builder``, ``Event.copy_with`` and the pickled form of
an event all run code generated per event class. Each test here computes the expected
field values with the reference below, written from the documented rules. NUL and lone
surrogates become U+FFFD, and ids wider than their column become a prefix and a SHA-256.
Every field is compared, its type included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmw import events as ev
from chatmw.events import checked_builder

CLASSES = (ev.Message, ev.Status, ev.Touch, ev.ConversationUpdate, ev.Exposure, ev.RawPayload)
WIDTHS = {"channel": 32, "key": 255, "user_id": 255, "conversation_id": 255,
          "platform_message_id": 255, "reply_to": 255, "kind": 32, "status": 16,
          "intent": 128, "step": 128, "ended_reason": 64}
WHEN = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def clean_text(value: str) -> str:
    return "".join("\ufffd" if ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF else ch
                   for ch in value)


def clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    if isinstance(value, tuple):
        return tuple(clean(item) for item in value)
    return value


def fitted(value: str, width: int) -> str:
    if len(value) <= width:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    if width > len(digest) + 1:
        return value[:width - len(digest) - 1] + "~" + digest
    return digest[:width]


def expected(name: str, value: Any) -> Any:
    """The stored form of one field value, by the documented rules."""
    if value is None:
        return None
    result = clean(value)
    if isinstance(result, str) and name in WIDTHS and len(result) > WIDTHS[name]:
        result = fitted(str(result), WIDTHS[name])
    return result


def required(cls: type[ev.Event]) -> dict[str, Any]:
    values: dict[str, Any] = {"channel": "web", "occurred_at": WHEN}
    for spec in dataclasses.fields(cls):
        if spec.name in values or spec.default is not dataclasses.MISSING \
                or spec.default_factory is not dataclasses.MISSING:
            continue
        values[spec.name] = b"body" if spec.name == "body" else \
            "user" if spec.name == "role" else f"{spec.name}-1"
    return values


def check_fields(event: ev.Event, given_values: dict[str, Any]) -> None:
    for spec in dataclasses.fields(event):
        actual = getattr(event, spec.name)
        if spec.name in given_values:
            want = expected(spec.name, given_values[spec.name])
        elif spec.default is not dataclasses.MISSING:
            want = spec.default
        else:
            want = spec.default_factory()  # type: ignore[misc]
        assert actual == want, (type(event).__name__, spec.name)
        assert type(actual) is type(want), (type(event).__name__, spec.name)


class Tag(str):
    """A str subclass, which the checks treat as any other value holding text."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoteMessage(ev.Message):
    """A subclass without slots: its own field lives in the instance's ``__dict__``."""

    note: str | None = None


# Values that exercise each branch of the checks: plain ASCII, text needing a
# replacement, over-wide text, containers, and types that hold no text.
TEXTS = [
    "plain",
    "caf\u00e9 \U0001f600",
    "nul\x00inside",
    "lone \ud800 high",
    "lone \udfff low",
    "x" * 300,
    "\u00e9" * 300,
    "\x00" * 40,
    "y" * 255,
    "z" * 33,
    "",
]
CONTAINERS = [
    {},
    {"utm_source": "ads"},
    {"k\x00": "v\ud83d"},
    {"nested": {"deep": ["a\x00", ("b", "\udc00")]}},
    {"n": 1, "f": 2.5, "t": True, "none": None},
]


def cases(cls: type[ev.Event]) -> list[dict[str, Any]]:
    base = required(cls)
    result = [dict(base)]
    for spec in dataclasses.fields(cls):
        if spec.name in ("occurred_at", "body", "role", "ended", "resolved", "handed_off",
                         "latency_ms"):
            continue
        samples: list[Any] = CONTAINERS if spec.name in ("attributes", "meta") else TEXTS
        for sample in samples:
            values = dict(base)
            values[spec.name] = sample
            result.append(values)
    return result


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_construction_follows_rules(cls: type[ev.Event]) -> None:
    for values in cases(cls):
        check_fields(cls(**values), values)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_checked_builder_follows_rules(cls: type[ev.Event]) -> None:
    for values in cases(cls):
        names = tuple(values)
        event = checked_builder(cls, names)(*values.values())
        assert type(event) is cls
        check_fields(event, values)
        assert event == cls(**values)


def test_checked_builder_any_order() -> None:
    names = ("user_id", "role", "key", "occurred_at", "channel", "text")
    build = checked_builder(ev.Message, names)
    first = build("u1", "user", "k1", WHEN, "web", "hi\x00")
    second = build("u2", "bot", "k2", WHEN, "messenger", None)
    assert first == ev.Message(channel="web", occurred_at=WHEN, key="k1", role="user",
                               user_id="u1", text="hi\ufffd")
    assert second.text is None
    assert second.role == "bot"
    assert first.attributes == {}
    assert first.meta == {}
    assert first.attributes is not second.attributes
    assert first.meta is not second.meta


@pytest.mark.parametrize("names, message", [
    (("channel", "occurred_at", "key", "role"), "field 'user_id' has no default"),
    (("channel", "occurred_at", "key", "role", "user_id", "nickname"), "named once each"),
    (("channel", "channel", "occurred_at", "key", "role", "user_id"), "named once each"),
])
def test_checked_builder_bad_names(names: tuple[str, ...], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        checked_builder(ev.Message, names)


def test_checked_builder_wrong_count() -> None:
    build = checked_builder(ev.Status, ("channel", "occurred_at", "platform_message_id",
                                        "status"))
    with pytest.raises(TypeError):
        build("web", WHEN, "m1")


def test_str_subclass_cleaned_or_kept() -> None:
    clean_tag = Tag("campaign")
    event = ev.Message(channel="web", occurred_at=WHEN, key="k", role="user",
                       user_id="u", text=clean_tag)
    assert event.text is clean_tag
    dirty = ev.Message(channel="web", occurred_at=WHEN, key="k", role="user",
                       user_id=Tag("u\x00" + "w" * 300), text=Tag("a\udc80"))
    assert dirty.text == "a\ufffd"
    assert type(dirty.text) is str
    assert dirty.user_id == fitted("u\ufffd" + "w" * 300, 255)
    long_tag = ev.Message(channel="web", occurred_at=WHEN, key="k", role="user",
                          user_id=Tag("v" * 300))
    assert long_tag.user_id == fitted("v" * 300, 255)
    assert type(long_tag.user_id) is str


def test_subclass_without_slots() -> None:
    values = {"channel": "web", "occurred_at": WHEN, "key": "k" * 400, "role": "user",
              "user_id": "u", "note": "n\x00"}
    event = NoteMessage(**values)
    assert event.note == "n\ufffd"
    assert event.key == fitted("k" * 400, 255)
    built = checked_builder(NoteMessage, tuple(values))(*values.values())
    assert built == event
    assert built.note == "n\ufffd"
    copied = event.copy_with(note="other", user_id="v")
    assert copied == dataclasses.replace(event, note="other", user_id="v")
    assert pickle.loads(pickle.dumps(event)) == event


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_copy_with_and_pickle(cls: type[ev.Event]) -> None:
    for values in cases(cls)[:8]:
        event = cls(**values)
        restored = pickle.loads(pickle.dumps(event))
        assert type(restored) is cls
        assert ev.field_reader(cls)(restored) == ev.field_reader(cls)(event)
        copied = event.copy_with(channel="whatsapp")
        assert copied == dataclasses.replace(event, channel="whatsapp")
        # copy_with runs no checks: the value is stored as given.
        assert event.copy_with(channel="raw\x00").channel == "raw\x00"
    with pytest.raises(TypeError, match="has no fields"):
        cls(**required(cls)).copy_with(nickname="x")


def test_rebuild_wrong_count() -> None:
    event = ev.Status(channel="web", occurred_at=WHEN, platform_message_id="m", status="sent")
    rebuild, (cls, values) = event.__reduce__()
    assert rebuild(cls, values) == event
    with pytest.raises(ValueError):
        rebuild(cls, values[:-1])


text_or_none = st.one_of(st.none(), st.text(max_size=300))


@settings(max_examples=300, deadline=None)
@given(channel=st.text(min_size=1, max_size=40), key=st.text(max_size=300),
       user_id=st.text(max_size=300), text=text_or_none, intent=text_or_none,
       attributes=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_message_any_text(channel: str, key: str, user_id: str, text: str | None,
                          intent: str | None, attributes: dict[str, str]) -> None:
    values = {"channel": channel, "occurred_at": WHEN, "key": key, "role": "bot",
              "user_id": user_id, "text": text, "intent": intent, "attributes": attributes}
    builders: list[Callable[..., ev.Event]] = [
        lambda **fields: ev.Message(**fields),
        lambda **fields: checked_builder(ev.Message, tuple(fields))(*fields.values()),
    ]
    for build in builders:
        check_fields(build(**values), values)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OddDefaults(ev.Event):
    """Defaults that the checks change: they must run on them too."""

    user_id: str
    kind: str = "k" * 40
    note: str = "n\x00"
    tags: list[str] = dataclasses.field(default_factory=lambda: ["t\udc00"])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Audited(ev.Message):
    """A subclass with its own __post_init__, which the builder must call."""

    def __post_init__(self) -> None:
        ev.Message.__post_init__(self)
        object.__setattr__(self, "meta", {**self.meta, "audited": True})


def test_checked_builder_checks_defaults() -> None:
    event = checked_builder(OddDefaults, ("channel", "occurred_at", "user_id"))("web", WHEN, "u")
    assert event == OddDefaults(channel="web", occurred_at=WHEN, user_id="u")
    assert event.kind == fitted("k" * 40, 32)
    assert event.note == "n\ufffd"
    assert event.tags == ["t\ufffd"]


def test_checked_builder_own_post_init() -> None:
    names = ("channel", "occurred_at", "key", "role", "user_id", "text")
    event = checked_builder(Audited, names)("web", WHEN, "k", "user", "u", "a\x00")
    assert event.meta == {"audited": True}
    assert event.text == "a\ufffd"
    assert event == Audited(channel="web", occurred_at=WHEN, key="k", role="user",
                            user_id="u", text="a\x00")


@pytest.mark.parametrize("cls", [*CLASSES, NoteMessage], ids=lambda cls: cls.__name__)
def test_values_builder_round_trip(cls: type[ev.Event]) -> None:
    values = required(cls)
    event = cls(**values)
    read = ev.field_reader(cls)
    build = ev.values_builder(cls)
    assert build(read(event)) == event
    assert type(build(read(event))) is cls
    with pytest.raises(ValueError):
        build(read(event)[:-1])
