"""Event subclasses with ClassVar, InitVar and init=False fields: pickled, copied and built.

``dataclasses`` lists ClassVar and InitVar pseudo-fields in ``__dataclass_fields__``
beside the real fields. An event's pickled form, ``copy_with`` and ``checked_builder``
carry only the real fields, and ``checked_builder`` builds what the constructor builds.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import InitVar
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from chatmw import events as ev
from chatmw.events import checked_builder

WHEN = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TableEvent(ev.Event):
    """A slotted subclass with a class-level constant."""

    table: ClassVar[str] = "custom_events"
    user_id: str
    note: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableEventNoSlots(ev.Event):
    """The same without slots."""

    table: ClassVar[str] = "custom_events"
    user_id: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SaltedEvent(ev.Event):
    """A subclass whose __post_init__ takes an InitVar value."""

    user_id: str
    salt: InitVar[str | None] = None
    tag: str | None = None

    def __post_init__(self, salt: str | None) -> None:
        if salt is not None:
            object.__setattr__(self, "tag", f"{salt}:{self.user_id}")
        ev.Event.__post_init__(self)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DerivedEvent(ev.Event):
    """A subclass with a field the constructor does not take."""

    user_id: str
    label: str = dataclasses.field(init=False, default="l\x00")


def test_classvar_event_pickles_and_copies() -> None:
    event = TableEvent(channel="web", occurred_at=WHEN, user_id="u", note="n\x00")
    assert event.note == "n\ufffd"
    assert ev.field_reader(TableEvent)(event) == ("web", WHEN, "u", "n\ufffd")
    assert pickle.loads(pickle.dumps(event)) == event
    assert event.copy_with(user_id="v") == dataclasses.replace(event, user_id="v")
    # The writer process sends each event as its class and field values.
    rebuild, (cls, values) = event.__reduce__()
    assert rebuild(cls, values) == event
    assert TableEvent.table == "custom_events"


def test_classvar_event_without_slots_pickles() -> None:
    event = TableEventNoSlots(channel="web", occurred_at=WHEN, user_id="u")
    restored = pickle.loads(pickle.dumps(event))
    assert restored == event
    assert "table" not in vars(restored)


def test_checked_builder_classvar_event() -> None:
    names = ("channel", "occurred_at", "user_id", "note")
    event = checked_builder(TableEvent, names)("web", WHEN, "u" * 300, "a\udc00")
    assert event == TableEvent(channel="web", occurred_at=WHEN, user_id="u" * 300,
                               note="a\udc00")
    assert event.user_id == ev.fit_id("u" * 300, 255)


def test_checked_builder_initvar_event() -> None:
    build = checked_builder(SaltedEvent, ("channel", "occurred_at", "user_id", "salt"))
    event = build("web", WHEN, "u", "s\x00")
    assert event == SaltedEvent(channel="web", occurred_at=WHEN, user_id="u", salt="s\x00")
    assert event.tag == "s\ufffd:u"
    plain = checked_builder(SaltedEvent, ("channel", "occurred_at", "user_id"))("web", WHEN, "u")
    assert plain.tag is None
    with pytest.raises(TypeError):
        build("web", WHEN)


def test_checked_builder_init_false_field() -> None:
    event = checked_builder(DerivedEvent, ("channel", "occurred_at", "user_id"))("web", WHEN, "u")
    assert event == DerivedEvent(channel="web", occurred_at=WHEN, user_id="u")
    assert event.label == "l\ufffd"
    # The constructor rejects the field as an argument, and so does the builder.
    with pytest.raises(TypeError):
        checked_builder(DerivedEvent, ("channel", "occurred_at", "user_id", "label"))


def test_pseudonymiser_skips_class_constants() -> None:
    from chatmw.security import Pseudonymiser, Secret

    pseudonymiser = Pseudonymiser(Secret("k" * 32))
    event = TableEvent(channel="web", occurred_at=WHEN, user_id="u1", note="n")
    result = pseudonymiser.apply(event)
    assert result == dataclasses.replace(event, user_id=pseudonymiser.pseudonymise("u1"))
    assert result.note == "n"
    assert TableEvent.table == "custom_events"
