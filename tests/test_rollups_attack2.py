"""Attribution and drop-off rollups against raw rows, on cases found wrong or risky.

Each check computes a metric twice, from rollups and from raw rows only (``raw_only``),
on SQLite and PostgreSQL, and the two answers must be equal. The stores are written
through the writer as a bot would, and refreshed as the runtime refreshes them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.business import BusinessSettings, install
from chatmw.events import to_ms
from chatmw.events_business import Conversion
from chatmw.metrics.attribution import attribution
from chatmw.metrics.contact_sets import decode
from chatmw.metrics.dropoff import dropoff
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.resolution import RESOLUTION
from chatmw.metrics.rollup_query import cover, raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.security.erasure import erase_person
from chatmw.store.models import Contact
from chatmw.store.models_rollups import RollupAttributionSets
from chatmw.store.writer import Writer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a Thursday: the first epoch week starts here
T0 = datetime(2026, 3, 5, tzinfo=UTC)  # a Thursday too


def _writer(engine: Engine) -> Writer:
    writer = Writer(engine)
    install(writer, BusinessSettings(currency="EUR"))
    return writer


def _message(
    conversation: str, at: datetime, key: str, role: str = "user", intent: str | None = None
) -> ev.Message:
    return ev.Message(
        channel="web",
        occurred_at=at,
        key=key,
        role=role,
        user_id=f"user-{conversation}",
        text="hello",
        conversation_id=conversation,
        intent=intent,
    )


def _touch(key: str, user: str, conversation: str | None, at: datetime, source: str) -> ev.Touch:
    return ev.Touch(
        channel="web",
        occurred_at=at,
        key=key,
        user_id=user,
        conversation_id=conversation,
        source=source,
    )


def _both_ways(compute: Callable[[], Any]) -> tuple[Any, Any]:
    """Return the answer from rollups and the answer from raw rows only."""
    with raw_only():
        expected = compute()
    return compute(), expected


def _assert_served_equal_raw(engine: Engine, flt: MetricFilter, now_ms: int) -> None:
    """Check that rollups serve ``flt`` and give the raw answers of the three metrics."""
    with engine.connect() as connection:
        coverage = cover(connection, flt)
    assert coverage is not None
    assert coverage.served
    computes = {
        "dropoff": lambda: dropoff(engine, flt, {"steps": "greet,pay"}, now_ms=now_ms),
        "attribution": lambda: attribution(engine, flt, {}),
        "resolution": lambda: RESOLUTION.compute(engine, flt, {}),
    }
    for name, compute in computes.items():
        if name == "attribution" and flt.group_by is not None:
            continue
        got, expected = _both_ways(compute)
        assert got == expected, f"{name} {flt.describe()}"


def test_start_moved_before_the_epoch(engine: Engine) -> None:
    """A late message moves a start from the epoch's first slot to before the epoch.

    The refresher marks both slots dirty. The day and week rows around the first slot
    must be counted again, or they keep the conversation that no longer starts there.
    """
    writer = _writer(engine)
    writer.write(
        [
            _message("c1", EPOCH + timedelta(minutes=1), "c1-0"),
            _message("c1", EPOCH + timedelta(minutes=2), "c1-1", "bot", "pay"),
            _message("c2", EPOCH + timedelta(days=1), "c2-0"),
        ]
    )
    assert refresh(engine).rebuilt
    writer.write([_message("c1", EPOCH - timedelta(minutes=3), "c1-late", "bot", "greet")])
    assert not refresh(engine).rebuilt
    now_ms = to_ms(EPOCH + timedelta(days=3))
    for until in (EPOCH + timedelta(days=7), EPOCH + timedelta(days=2), EPOCH + timedelta(hours=1)):
        for group_by in (None, GroupBy("channel")):
            flt = MetricFilter(since=EPOCH, until=until, group_by=group_by)
            _assert_served_equal_raw(engine, flt, now_ms)
    # The figures are not trivial: the moved conversation left the window.
    flt = MetricFilter(since=EPOCH, until=EPOCH + timedelta(days=7))
    assert dropoff(engine, flt, {}, now_ms=now_ms)["conversations"] == 1
    assert attribution(engine, flt, {})["totals"]["conversations"] == 1


def test_erasure_leaves_no_attribution_sets(engine: Engine) -> None:
    """The day and week sets hold contact ids, so erasure removes them with the others."""
    writer = _writer(engine)
    writer.write(
        [
            _touch("touch-1", "user-c1", "c1", T0, "news"),
            _message("c1", T0 + timedelta(minutes=1), "c1-0"),
            _message("c2", T0 + timedelta(minutes=5), "c2-0"),
        ]
    )
    writer.write(
        [
            Conversion(
                channel="web",
                occurred_at=T0 + timedelta(hours=1),
                key="order-1",
                name="purchase",
                value_micros=5_000_000,
                currency="EUR",
                conversation_id="c1",
            )
        ]
    )
    refresh(engine)
    with engine.connect() as connection:
        contact_id = connection.execute(
            select(Contact.id).where(Contact.external_id == "user-c1")
        ).scalar_one()
        blobs = connection.execute(select(RollupAttributionSets.contacts)).scalars().all()
    assert any(contact_id in decode(blob) for blob in blobs)

    erase_person(engine, "web", "user-c1")
    with engine.connect() as connection:
        blobs = connection.execute(select(RollupAttributionSets.contacts)).scalars().all()
    assert not any(contact_id in decode(blob) for blob in blobs)
    # The next refresh rebuilds the sets without the erased person.
    assert refresh(engine).rebuilt
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=7))
    got, expected = _both_ways(lambda: attribution(engine, flt, {}))
    assert got == expected
    assert got["totals"] == {"conversations": 1, "users": 1, "conversions": 0, "revenue": "0.00"}


# The largest amount a conversion may have (just below 10^12) in micros.
LARGEST_MICROS = 999_999_999_999_999_999


def test_refresh_with_large_conversion_values(engine: Engine) -> None:
    """Ten conversions of the largest accepted amount, each valid on its own."""
    writer = _writer(engine)
    writer.write([_message("c1", T0 + timedelta(minutes=1), "c1-0")])
    refresh(engine)
    writer.write(
        [
            Conversion(
                channel="web",
                occurred_at=T0 + timedelta(hours=1),
                key=f"order-{number}",
                name="purchase",
                value_micros=LARGEST_MICROS,
                currency="EUR",
                conversation_id="c1",
            )
            for number in range(10)
        ]
    )
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=7))
    got, expected = _both_ways(lambda: attribution(engine, flt, {}))
    assert got == expected
    assert expected["totals"]["revenue"] == "9999999999999.99999"


def test_touch_naming_another_users_conversation(engine: Engine) -> None:
    """A touch names a conversation stored for another user of the channel.

    The touch becomes that conversation's first and last touch, so the conversation's
    start slot is stale although neither its messages nor its contact changed.
    """
    writer = _writer(engine)
    writer.write(
        [
            _message("c1", T0 + timedelta(minutes=1), "c1-0"),
            _message("c2", T0 + timedelta(days=2), "c2-0"),
        ]
    )
    refresh(engine)
    writer.write([_touch("touch-1", "user-c2", "c1", T0, "news")])
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=7))
    for _ in range(2):
        got, expected = _both_ways(lambda: attribution(engine, flt, {}))
        assert got == expected
        sources = {item["value"]: item["conversations"] for item in got["first_touch"]["source"]}
        assert sources == {"news": 1, "(none)": 1}
        assert not refresh(engine).rebuilt


def test_touches_of_two_users_on_one_conversation(engine: Engine) -> None:
    """Two users' touches name one conversation; a later touch of either sets its touches."""
    writer = _writer(engine)
    writer.write(
        [
            _message("c1", T0 + timedelta(minutes=1), "c1-0"),
            _message("c2", T0 + timedelta(days=2), "c2-0"),
        ]
    )

    def touch(key: str, user: str, conversation: str | None, days: int, source: str) -> None:
        writer.write([_touch(key, user, conversation, T0 + timedelta(days=days), source)])

    touch("own", "user-c1", "c1", 0, "own")
    touch("other", "user-c2", "c1", 0, "other")
    refresh(engine)
    flt = MetricFilter(since=T0, until=T0 + timedelta(days=7))
    seen = []
    for key, user in (("loose-1", "user-c1"), ("loose-2", "user-c2")):
        touch(key, user, None, 3, key)
        got, expected = _both_ways(lambda: attribution(engine, flt, {}))
        assert got == expected
        seen.append({item["value"] for item in got["first_touch"]["source"]})
        refresh(engine)
    # The conversation's touches changed both times.
    assert seen == [{"own", "(none)"}, {"other", "(none)"}]


def test_step_names_rejected_with_the_reason(database_url: str) -> None:
    """A step name too long or with a control character gets a 422 that gives the reason."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from chatmw.app import mount_chatmw
    from chatmw.config import Settings
    from chatmw.runtime import Runtime

    runtime = Runtime.from_settings(Settings(database_url=database_url), privacy=None)
    app = FastAPI()
    mount_chatmw(app, runtime, require_keys=False, live=False, manage_lifespan=False)
    window = "since=2026-03-05T00:00:00Z&until=2026-03-06T00:00:00Z"

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://chatmw") as client:
            return [
                await client.get(f"/metrics/dropoff?{window}&steps={steps}")
                for steps in ("x" * 129, "a%01b", "x" * 128 + ",pay")
            ]

    long, control, accepted = asyncio.run(scenario())
    assert long.status_code == 422
    assert "longer than 128 characters" in long.json()["detail"][0]["msg"]
    assert control.status_code == 422
    assert "control characters" in control.json()["detail"][0]["msg"]
    assert accepted.status_code == 200
    assert accepted.json()["steps"] == ["x" * 128, "pay"]


def _random_events(rng: random.Random, number: int) -> list[Any]:
    """Return one batch of random events; conversation ids are shared between users.

    Users post into conversations that other users started, touches name such
    conversations, and updates, conversions and repeated keys come in any order.
    """
    values = [None, "", "(none)", "news", "ads"]
    events: list[Any] = []
    for index in range(40):
        key = f"{number}-{index}"
        conversation = f"c{rng.randrange(40)}"
        user = f"u{rng.randrange(12)}"
        channel = rng.choice(("web", "whatsapp"))
        at = T0 + timedelta(
            minutes=rng.randrange(-60, 5 * 24 * 60), milliseconds=rng.choice([0, 1])
        )
        kind = rng.random()
        if kind < 0.45:
            events.append(
                ev.Message(
                    channel=channel,
                    occurred_at=at,
                    key=f"m{key}",
                    role=rng.choice(("user", "bot", "bot", "agent")),
                    user_id=user,
                    text="hello",
                    conversation_id=conversation,
                    intent=rng.choice([None, "", "greet", "pay", " padded", "a,b", "(unknown)"]),
                )
            )
        elif kind < 0.6:
            events.append(
                ev.ConversationUpdate(
                    channel=channel,
                    occurred_at=at,
                    user_id=user,
                    conversation_id=rng.choice([conversation, None]),
                    ended=rng.choice([True, False, None]),
                    resolved=rng.choice([True, False, None]),
                    step=rng.choice([None, "", "pay", "greet"]),
                )
            )
        elif kind < 0.75:
            events.append(
                ev.Touch(
                    channel=channel,
                    occurred_at=at,
                    key=f"t{key}",
                    user_id=user,
                    conversation_id=rng.choice([conversation, None]),
                    source=rng.choice(values),
                    campaign=rng.choice(values),
                    ad_id=rng.choice(values),
                )
            )
        else:
            by_user = kind < 0.85
            events.append(
                Conversion(
                    channel=channel,
                    occurred_at=at + timedelta(days=rng.choice([0, 1, 7, 8])),
                    # Some keys repeat, so a conversion may be posted twice.
                    key=f"v{rng.randrange(60)}",
                    name="purchase",
                    value_micros=rng.randrange(1, 10**6),
                    currency="EUR",
                    user_id=user if by_user else None,
                    conversation_id=None if by_user else conversation,
                )
            )
    return events


@pytest.mark.parametrize("seed", [1, 2])
def test_random_events_of_shared_conversations(engine: Engine, seed: int) -> None:
    """Rounds of random events, each compared with raw rows before and after a refresh."""
    rng = random.Random(seed)
    writer = _writer(engine)
    now_ms = to_ms(T0 + timedelta(days=2, minutes=rng.randrange(60)))
    windows = [
        (T0 - timedelta(days=1), T0 + timedelta(days=8)),
        (T0 + timedelta(hours=1, minutes=3), T0 + timedelta(days=2, minutes=44)),
    ]
    filters = [
        MetricFilter(since=since, until=until, channels=channels)
        for since, until in windows
        for channels in ((), ("web", "sms"))
    ]
    seen: list[Any] = []
    for number in range(6):
        events = _random_events(rng, number)
        events += rng.sample(seen, min(len(seen), 5))
        seen += events
        for kind in (ev.Message, ev.ConversationUpdate, ev.Touch, Conversion):
            writer.write([item for item in events if isinstance(item, kind)])
        if number == 4:
            erase_person(engine, "web", "u3")
        for step in ("written", "refreshed"):
            for flt in filters:
                got, expected = _both_ways(lambda flt=flt: attribution(engine, flt, {}))
                assert got == expected, f"attribution {step} {number} {flt.describe()}"
                for options in ({}, {"steps": "greet,pay", "idle_minutes": 90.0}):
                    got, expected = _both_ways(
                        lambda flt=flt, options=options: dropoff(
                            engine, flt, options, now_ms=now_ms
                        )
                    )
                    assert got == expected, f"dropoff {step} {number} {options} {flt.describe()}"
            refresh(engine)
    # The rounds served from rollups and counted touches.
    with engine.connect() as connection:
        assert cover(connection, filters[0]) is not None
    assert len(attribution(engine, filters[0], {})["first_touch"]["source"]) > 2
