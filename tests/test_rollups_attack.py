"""Rollup figures against raw figures on random stores, event sequences and windows.

Each check computes ``volume``, ``heatmap``, ``growth``, ``summary`` and ``response-time``
twice: from rollups, and from raw rows only (``raw_only``). The results must be equal.
The one exception is p50, p90 and p95 of response times, which may differ by
``RELATIVE_ERROR`` of the raw value plus 1 ms of rounding. ``exact=true`` must give the
raw figures exactly. The random stores have late, duplicate and out-of-order messages,
identical timestamps, times on and next to slot edges, Unix epoch week edges and the
Unix epoch itself, and the checks run before and after refreshes, erasure and retention.
The targeted tests below the random ones pin down cases found risky or wrong.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rollup_helpers import (
    ACTIVITY_METRICS,
    CHANNELS,
    ESTIMATED_METRICS,
    PERCENTILES,
    Compute,
    assert_close,
    percentile_bound,
)
from sqlalchemy import Engine, func, insert, select, text, update

from chatmw import events as ev
from chatmw.app import mount_chatmw
from chatmw.config import Settings
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.response_time import response_times
from chatmw.metrics.rollup_query import cover, raw_only
from chatmw.metrics.rollup_refresh import invalidate, refresh
from chatmw.metrics.summary import summary
from chatmw.runtime import Runtime
from chatmw.security.erasure import erase_person, purge_older_than
from chatmw.store.engine import make_engine
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_rollups import SLOT_MS, RollupConversations
from chatmw.store.writer import Writer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a Thursday: the first epoch week starts here
EPOCH_WEEK_EDGE = datetime(2024, 3, 28, tzinfo=UTC)  # a Thursday, 2,830 epoch weeks later
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
QUIET = "sms"  # a channel that never has traffic
ZONES = (
    "UTC",
    "Europe/Paris",  # summer time from 2024-03-31 01:00 UTC
    "America/St_Johns",  # -03:30 / -02:30
    "Asia/Kathmandu",  # +05:45 (+05:30 until 1986)
    "Australia/Lord_Howe",  # daylight saving of 30 minutes
    "Pacific/Chatham",  # +12:45 / +13:45
    "Africa/Monrovia",  # -00:44:30 until 1972: no slot is served
    "Pacific/Kiritimati",  # -10:40 until 1979
)
ROLES = ("user", "user", "bot", "agent")

EXACT_METRICS = ACTIVITY_METRICS
EXACT_OPTION: dict[str, Compute] = {
    "summary exact": lambda engine, flt: summary(engine, flt, {"exact": "true"}),
    "response-time exact": lambda engine, flt: response_times(engine, flt, {"exact": "true"}),
}
# Both percentiles are rounded to the ms. The 1e-9 absorbs the float error of the difference.
BOUNDS = dict.fromkeys(PERCENTILES, lambda value: percentile_bound(value) + 1e-9)
# The metrics most targeted checks compare (each reads a different set of rollup tables).
CORE = ("volume-day", "heatmap", "growth-week", "summary", "response-time")
# The metrics with distinct counts from contact sets (bitsets per UTC day and epoch week).
DISTINCT = ("volume-day", "volume-week", "growth-day", "growth-week", "summary")


# Comparison


def _outcome(compute: Compute, engine: Engine, flt: MetricFilter) -> tuple[str, Any]:
    try:
        return "ok", compute(engine, flt)
    except ValueError as error:  # FilterError and bucket limits: both paths must agree
        return type(error).__name__, str(error)


def assert_same_as_raw(
    engine: Engine, flt: MetricFilter, names: tuple[str, ...] | None = None
) -> None:
    """Compare every metric (or those in ``names``) from rollups with the raw figures."""
    label = describe(flt)
    for group in (EXACT_METRICS, ESTIMATED_METRICS):
        for name, compute in group.items():
            if names is not None and name not in names:
                continue
            with raw_only():
                expected = _outcome(compute, engine, flt)
            actual = _outcome(compute, engine, flt)
            if group is EXACT_METRICS or expected[0] != "ok":
                assert actual == expected, f"{name} {label}"
            else:
                assert actual[0] == "ok", f"{name} {label}: {actual[1]}"
                assert_close(actual[1], expected[1], f"{name} {label}", BOUNDS)
    for name, compute in EXACT_OPTION.items():
        if names is not None and name.split()[0] not in names:
            continue
        with raw_only():
            expected = _outcome(compute, engine, flt)
        assert _outcome(compute, engine, flt) == expected, f"{name} {label}"


def describe(flt: MetricFilter) -> str:
    group = "" if flt.group_by is None else " group_by=channel"
    channels = f" channels={','.join(flt.channels)}" if flt.channels else ""
    return f"[{flt.since_ms}, {flt.until_ms}) tz={flt.tz.key}{channels}{group}"


# Stores


@dataclass
class Store:
    """An engine on an empty migrated database, with a writer and message keys."""

    engine: Engine
    writer: Writer
    keys: Iterator[int] = field(default_factory=count)

    def message(
        self,
        at_ms: int,
        conversation: str | None,
        user: str,
        role: str = "user",
        channel: str = "web",
        kind: str = "message",
        key: str | None = None,
    ) -> ev.Message:
        return ev.Message(
            channel=channel,
            occurred_at=EPOCH + timedelta(milliseconds=at_ms),
            key=key or f"k{next(self.keys)}",
            role=role,  # type: ignore[arg-type]
            kind=kind,
            user_id=user,
            text="x",
            conversation_id=conversation,
        )

    def write(self, *messages: ev.Message | ev.Event) -> None:
        self.writer.write(list(messages))


_TABLES: dict[str, list[str]] = {}


def _empty(url: str, engine: Engine) -> None:
    """Empty every table but the migration version, and restart the id sequences."""
    if url not in _TABLES:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            else:
                query = "SELECT name FROM sqlite_master WHERE type = 'table'"
            names = connection.execute(text(query)).scalars().all()
        _TABLES[url] = [
            name for name in names if name != "alembic_version" and not name.startswith("sqlite_")
        ]
    tables = _TABLES[url]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            quoted = ", ".join(f'"{name}"' for name in tables)
            connection.execute(text(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                connection.execute(text(f'DELETE FROM "{name}"'))


@contextmanager
def fresh_store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    """Yield a store on an empty database: a copy of the migrated SQLite file, or PostgreSQL."""
    if database_url.startswith("sqlite"):
        template = Path(database_url.removeprefix("sqlite:///"))
        copy = tmp_path / f"example-{next(_COPIES)}.db"
        shutil.copyfile(template, copy)
        engine = make_engine(f"sqlite:///{copy}")
    else:
        engine = make_engine(database_url)
        _empty(database_url, engine)
    try:
        yield Store(engine, Writer(engine))
    finally:
        engine.dispose()
        if database_url.startswith("sqlite"):
            copy.unlink(missing_ok=True)


_COPIES = count()


# Random stores


def _ms(moment: datetime) -> int:
    return ev.to_ms(moment)


# Gaps between messages of one conversation: identical times, slot edges, hours, a day.
GAPS = st.sampled_from([0, 0, 1, 999, 60_000, SLOT_MS - 1, SLOT_MS, SLOT_MS + 1, HOUR_MS, DAY_MS])


@st.composite
def moments(draw: st.DrawFn, anchor_ms: int) -> int:
    """A time from a day before ``anchor_ms`` to nine days after, often on a slot edge."""
    slot = draw(st.integers(-96, 9 * 96))
    edge = anchor_ms + slot * SLOT_MS
    shift = draw(st.sampled_from(["edge", "edge", "before", "after", "inside"]))
    if shift == "edge":
        return edge
    if shift == "before":
        return edge - 1
    if shift == "after":
        return edge + 1
    return edge + draw(st.integers(0, SLOT_MS - 1))


@dataclass
class Plan:
    """Messages to write first, messages that arrive later, and duplicates of both."""

    first: list[ev.Message]
    later: list[ev.Message]
    duplicates: list[ev.Message]
    users: list[tuple[str, str]]


@st.composite
def plans(draw: st.DrawFn, store: Store, anchor_ms: int) -> Plan:
    first: list[ev.Message] = []
    later: list[ev.Message] = []
    users: set[tuple[str, str]] = set()
    for number in range(draw(st.integers(1, 10))):
        channel = draw(st.sampled_from(CHANNELS))
        owner = f"u{draw(st.integers(0, 4))}"
        named = draw(st.integers(0, 4)) > 0
        at = draw(moments(anchor_ms))
        messages = []
        for step in range(draw(st.integers(1, 5))):
            role = "user" if step == 0 else draw(st.sampled_from(ROLES))
            # Another contact may write in the same named conversation.
            guest = named and draw(st.integers(0, 5)) == 0
            user = f"u{draw(st.integers(0, 4))}" if guest else owner
            kind = "reaction" if draw(st.integers(0, 9)) == 0 else "message"
            messages.append(
                store.message(at, f"c{number}" if named else None, user, role, channel, kind)
            )
            users.add((channel, user))
            at += draw(GAPS)
        late = draw(st.sets(st.integers(0, len(messages) - 1), max_size=2))
        if len(messages) > 1 and draw(st.booleans()):
            late.add(0)  # the first message arrives late and moves the start
        for index, message in enumerate(messages):
            (later if index in late and len(late) < len(messages) else first).append(message)
    shuffled = draw(st.permutations(first))
    stored = shuffled + later
    duplicates = []
    for original in draw(st.lists(st.sampled_from(stored), max_size=4)):
        # A duplicate may carry another time. Without a conversation id such a duplicate can
        # start an empty conversation (test_duplicate_after_session_gap), so those keep theirs.
        moved = draw(st.sampled_from([0, 0, -SLOT_MS, 1, DAY_MS]))
        if original.conversation_id is None:
            moved = 0
        duplicates.append(
            store.message(
                _ms(original.occurred_at) + moved,
                original.conversation_id,
                original.user_id,
                draw(st.sampled_from(ROLES)),
                original.channel,
                key=original.key,
            )
        )
    return Plan(list(shuffled), list(draw(st.permutations(later))), duplicates, sorted(users))


@st.composite
def windows(draw: st.DrawFn, anchor_ms: int) -> MetricFilter:
    """A window near the anchor: edges on slots, hours, UTC days or epoch weeks, or not."""
    unit = draw(st.sampled_from([SLOT_MS, HOUR_MS, DAY_MS, WEEK_MS]))
    since = anchor_ms + draw(st.integers(-2, 10 * DAY_MS // unit)) * unit
    since += draw(st.sampled_from([0, 0, 0, 1, -1, 7 * 60_000 + 13]))
    length = draw(
        st.sampled_from(
            [0, 1, SLOT_MS - 1, SLOT_MS, SLOT_MS + 1, HOUR_MS, DAY_MS, DAY_MS + 1,
             WEEK_MS, WEEK_MS - 1, WEEK_MS + SLOT_MS, 9 * DAY_MS]
        )
    )
    if draw(st.booleans()):
        length = draw(st.integers(0, 10 * DAY_MS))
    channels: tuple[str, ...] = ()
    if draw(st.integers(0, 2)) == 0:
        channels = tuple(
            draw(st.lists(st.sampled_from((*CHANNELS, QUIET)), min_size=1, max_size=2, unique=True))
        )
    return MetricFilter(
        since=EPOCH + timedelta(milliseconds=since),
        until=EPOCH + timedelta(milliseconds=since + length),
        tz=ZoneInfo(draw(st.sampled_from(ZONES))),
        channels=channels,
        group_by=GroupBy("channel") if draw(st.booleans()) else None,
    )


ANCHORS = st.sampled_from([_ms(EPOCH), _ms(EPOCH_WEEK_EDGE)])
# CHATMW_ATTACK_EXAMPLES runs more random examples, with a new seed each run. By default
# the module runs 12 examples from a fixed seed, so that it is short and repeatable.
_EXAMPLES = os.environ.get("CHATMW_ATTACK_EXAMPLES")
RANDOM = settings(
    max_examples=int(_EXAMPLES or "12"),
    derandomize=_EXAMPLES is None,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@RANDOM
@given(data=st.data())
def test_random_stores_match_raw(database_url: str, tmp_path: Path, data: st.DataObject) -> None:
    with fresh_store(database_url, tmp_path) as store:
        anchor = data.draw(ANCHORS, label="anchor")
        plan = data.draw(plans(store, anchor), label="plan")
        engine = store.engine

        def check(step: str) -> None:
            flt = data.draw(windows(anchor), label=f"window {step}")
            assert_same_as_raw(engine, flt)

        split = data.draw(st.integers(0, len(plan.first)), label="split")
        store.write(*plan.first[:split])
        if data.draw(st.booleans(), label="refresh early"):
            refresh(engine)  # built on part of the store; the rest arrives as new events
        store.write(*plan.first[split:])
        refresh(engine)
        check("built")

        # Late messages and duplicates, with a refresh between them or not.
        store.write(*plan.later)
        if data.draw(st.booleans(), label="refresh between"):
            refresh(engine)
        store.write(*plan.duplicates)
        check("unrefreshed")
        refresh(engine)
        check("refreshed")

        action = data.draw(st.sampled_from(["none", "erase", "purge"]), label="deletion")
        if action == "erase" and plan.users:
            channel, user = data.draw(st.sampled_from(plan.users), label="erased")
            erase_person(engine, channel, user)
        elif action == "purge":
            cutoff = anchor + data.draw(st.integers(0, 9), label="purge day") * DAY_MS
            purge_older_than(engine, 1, now_ms=cutoff + DAY_MS)
        if action != "none":
            refresh(engine)
            store.write(store.message(anchor + 3 * HOUR_MS, None, "u9", channel="web"))
            check("after deletion")


# Targeted cases


def _filter(since_ms: int, until_ms: int, zone: str = "UTC", **kwargs: Any) -> MetricFilter:
    return MetricFilter(
        since=EPOCH + timedelta(milliseconds=since_ms),
        until=EPOCH + timedelta(milliseconds=until_ms),
        tz=ZoneInfo(zone),
        **kwargs,
    )


def _edge_store(store: Store, anchor: int) -> None:
    """Conversations on both sides of the epoch week edge at ``anchor``, 1 ms apart."""
    messages = []
    for number, at in enumerate(
        [anchor - WEEK_MS, anchor - DAY_MS - 1, anchor - 1, anchor, anchor + 1,
         anchor + SLOT_MS - 1, anchor + HOUR_MS, anchor + WEEK_MS - 1, anchor + WEEK_MS]
    ):
        channel = CHANNELS[number % 3]
        conversation = f"e{number}"
        messages += [
            store.message(at, conversation, f"u{number % 4}", "user", channel),
            store.message(at + 1500, conversation, f"u{number % 4}", "bot", channel),
            store.message(at + SLOT_MS, conversation, f"u{number % 4}", "user", channel),
            store.message(at + SLOT_MS + 40_000, conversation, f"u{number % 4}", "agent", channel),
        ]
    store.write(*messages)


@pytest.mark.parametrize("anchor", [EPOCH, EPOCH_WEEK_EDGE], ids=["epoch", "2024-03-28"])
def test_epoch_week_edges(database_url: str, tmp_path: Path, anchor: datetime) -> None:
    """Windows that start or end on, or 1 ms beside, an epoch week edge (Thursday 00:00 UTC)."""
    edge = _ms(anchor)
    with fresh_store(database_url, tmp_path) as store:
        _edge_store(store, edge)
        refresh(store.engine)
        windows = [
            (edge, edge + WEEK_MS),
            (edge - 1, edge + WEEK_MS),
            (edge + 1, edge + WEEK_MS + 1),
            (edge, edge + WEEK_MS - 1),
            (edge - WEEK_MS, edge + WEEK_MS),
            (edge - SLOT_MS, edge + SLOT_MS),
        ]
        zones = ("UTC", "Asia/Kathmandu", "Africa/Monrovia", "Pacific/Chatham")
        for number, (since, until) in enumerate(windows):
            flt = _filter(since, until, zones[number % len(zones)])
            assert_same_as_raw(store.engine, flt, None if number == 0 else CORE)
        for since, until in windows[1:3]:
            flt = _filter(since, until, group_by=GroupBy("channel"), channels=("web", QUIET))
            assert_same_as_raw(store.engine, flt, CORE)


def test_empty_and_tiny_windows(database_url: str, tmp_path: Path) -> None:
    """since == until, 1 ms, one whole slot, one slot minus 1 ms, and a window with no traffic."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        _edge_store(store, edge)
        refresh(store.engine)
        for since, until in [
            (edge, edge),
            (edge + 1, edge + 1),
            (edge, edge + 1),
            (edge, edge + SLOT_MS),
            (edge - 1, edge + SLOT_MS - 1),
            (edge + 3 * DAY_MS, edge + 4 * DAY_MS),  # nothing happened that day
        ]:
            group = GroupBy("channel") if since % 2 else None
            assert_same_as_raw(store.engine, _filter(since, until, group_by=group), CORE)


def test_quiet_channels(database_url: str, tmp_path: Path) -> None:
    """Channel filters naming a channel that has no traffic, alone or with others."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        _edge_store(store, edge)
        refresh(store.engine)
        for number, channels in enumerate([(QUIET,), (QUIET, "web"), ("web", "whatsapp")]):
            group = GroupBy("channel") if number % 2 else None
            flt = _filter(edge - DAY_MS, edge + WEEK_MS, channels=channels, group_by=group)
            assert_same_as_raw(store.engine, flt, CORE)


def test_contacts_with_ids_far_apart(database_url: str, tmp_path: Path) -> None:
    """Contact ids 1 and 4,000,001 in the same day sets (the bitsets span every id between)."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        with store.engine.begin() as connection:
            for contact_id, name in ((1, "near"), (4_000_001, "far")):
                connection.execute(
                    insert(Contact).values(
                        id=contact_id, channel="web", external_id=name,
                        first_seen_ms=edge, last_seen_ms=edge,
                    )
                )
            if store.engine.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT setval(pg_get_serial_sequence('contacts', 'id'), 4000001)")
                )
        store.write(
            store.message(edge + 10, "a", "near"),
            store.message(edge + 20, "b", "far"),
            store.message(edge + DAY_MS + 5, "c", "far"),
            store.message(edge + DAY_MS + 6, "d", "new"),
        )
        refresh(store.engine)
        # Not refreshed yet, so its day is read from raw rows.
        store.write(store.message(edge + 2 * DAY_MS, "e", "near"))
        for since, until, group in [(edge, edge + WEEK_MS, None),
                                    (edge, edge + 2 * DAY_MS, GroupBy("channel")),
                                    (edge + 7, edge + 3 * DAY_MS, None)]:
            assert_same_as_raw(store.engine, _filter(since, until, group_by=group), DISTINCT)


def test_refresh_between_late_message_and_duplicate(database_url: str, tmp_path: Path) -> None:
    """A late first message, a refresh, then the same key again (at another time and role)."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(
            store.message(edge + 2 * HOUR_MS, "c", "u1"),
            store.message(edge + 2 * HOUR_MS + 500, "c", "u1", "bot"),
        )
        refresh(store.engine)
        late = store.message(edge + SLOT_MS - 1, "c", "u1", key="late")
        store.write(late)
        refresh(store.engine)
        duplicate = store.message(edge + 5 * HOUR_MS, "c", "u1", "agent", key="late")
        store.write(duplicate)
        windows = [(edge, edge + DAY_MS), (edge + SLOT_MS, edge + DAY_MS), (edge, edge + SLOT_MS)]
        for since, until in windows:
            assert_same_as_raw(store.engine, _filter(since, until), CORE)
        refresh(store.engine)
        for since, until in windows:
            assert_same_as_raw(store.engine, _filter(since, until), CORE)


def test_identical_timestamps(database_url: str, tmp_path: Path) -> None:
    """Many messages and conversations at the same millisecond, on a slot edge."""
    edge = _ms(EPOCH_WEEK_EDGE) + 5 * SLOT_MS
    with fresh_store(database_url, tmp_path) as store:
        messages = []
        for number in range(6):
            for role in ("user", "user", "bot", "agent", "user", "bot"):
                messages.append(store.message(edge, f"same{number}", f"u{number % 2}", role,
                                              CHANNELS[number % 3]))
        store.write(*messages[:20])
        refresh(store.engine)
        store.write(*messages[20:])
        for since, until in [(edge, edge + SLOT_MS), (edge - SLOT_MS, edge + 1), (edge, edge + 1)]:
            flt = _filter(since, until, group_by=GroupBy("channel"))
            assert_same_as_raw(store.engine, flt, CORE)
        refresh(store.engine)
        assert_same_as_raw(store.engine, _filter(edge, edge + SLOT_MS), CORE)


def test_zero_and_large_response_times(database_url: str, tmp_path: Path) -> None:
    """Replies at the same millisecond, around 23 ms, 40 years later and in the year 9999.

    The rollups are built before the replies arrive, so the refresh recomputes their slots
    only (a rebuild over such a span is slow, see test_rebuild_time_follows_time_span).
    """
    edge = _ms(EPOCH_WEEK_EDGE)
    last = _ms(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC))
    gaps = [0, 0, 1, 22, 23, 24, 999, SLOT_MS, 40 * 365 * DAY_MS, 40 * 365 * DAY_MS + 12_345]
    gaps += [last] * 40  # replies in the last ms of 9999: sums above 2 ** 53 ms
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge, "seed", "u0"))
        refresh(store.engine)
        messages = []
        for number, gap in enumerate(gaps):
            at = edge + (number % 12) * SLOT_MS
            reply = min(at + gap, last - 2 * number)
            messages += [
                store.message(at, f"r{number}", "u1"),
                store.message(reply, f"r{number}", "u1", "bot" if number % 2 else "agent"),
            ]
        store.write(*messages)
        refresh(store.engine)
        for until in (edge + DAY_MS, edge + WEEK_MS, edge + 4 * SLOT_MS):
            flt = _filter(edge, until)
            assert_same_as_raw(store.engine, flt, ("summary", "response-time"))
            exact = response_times(store.engine, flt, {"exact": "true"})
            estimated = response_times(store.engine, flt, {})
            for figure in ("first_response", "reply_time"):
                for name in ("count", "mean", "max"):
                    assert estimated[figure]["all"][name] == exact[figure]["all"][name]


def _metrics_app(database_url: str) -> FastAPI:
    runtime = Runtime.from_settings(Settings(database_url=database_url), privacy=None)
    app = FastAPI()
    mount_chatmw(app, runtime, require_keys=False, live=False, manage_lifespan=False)
    return app


@pytest.mark.parametrize("metric", ["summary", "response-time"])
def test_api_rejects_unknown_exact(database_url: str, metric: str) -> None:
    """Reject exact=maybe with a 422 that names the parameter and the accepted values."""
    import asyncio

    import httpx

    app = _metrics_app(database_url)

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://chatmw") as client:
            window = "since=2024-03-28&until=2024-03-29"
            return [
                await client.get(f"/metrics/{metric}?{window}&exact=maybe"),
                await client.get(f"/metrics/{metric}?{window}&exact=TRUE"),
                await client.get(f"/metrics/{metric}?{window}&exact=true&exact=false"),
                await client.get(f"/metrics/{metric}?{window}&exact=true"),
                await client.get(f"/metrics/{metric}?{window}&exact=false"),
                await client.get(f"/metrics/{metric}?{window}&exact="),
            ]

    maybe, upper, twice, *accepted = asyncio.run(scenario())
    assert maybe.status_code == 422, maybe.text
    detail = maybe.json()["detail"][0]
    assert detail["loc"] == ["query", "exact"]
    assert "true" in detail["msg"]
    assert "false" in detail["msg"]
    assert "maybe" in detail["msg"]
    assert upper.status_code == 422
    assert twice.status_code == 422
    assert twice.json()["detail"][0]["msg"] == "given more than once"
    assert [response.status_code for response in accepted] == [200, 200, 200]


def test_contact_across_channels(database_url: str, tmp_path: Path) -> None:
    """One contact owning conversations on three channels, ties at its first start included."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(
            store.message(edge + HOUR_MS, "w1", "p", channel="web"),
            store.message(edge + HOUR_MS, "a1", "q", channel="whatsapp"),
            store.message(edge + DAY_MS, "m1", "r", channel="messenger"),
            store.message(edge - DAY_MS, "m0", "s", channel="messenger"),
        )
        with store.engine.begin() as connection:
            owner = connection.execute(
                select(Contact.id).where(Contact.external_id == "p")
            ).scalar_one()
            connection.execute(
                update(Conversation).where(Conversation.external_id.in_(["a1", "m1", "m0"]))
                .values(contact_id=owner)
            )
        invalidate(store.engine)
        refresh(store.engine)
        store.write(store.message(edge + 2 * DAY_MS, "w2", "p", channel="web"))
        for number, channels in enumerate(
            [(), ("web",), ("whatsapp", "messenger"), ("web", "messenger"), (QUIET, "web")]
        ):
            group = GroupBy("channel") if number % 2 else None
            flt = _filter(edge - DAY_MS, edge + WEEK_MS, channels=channels, group_by=group)
            metrics = ("growth-day", "growth-week", "volume-week", "summary")
            assert_same_as_raw(store.engine, flt, metrics)


def test_erasure_and_retention(database_url: str, tmp_path: Path) -> None:
    """After erasure and retention: raw rows until the refresh rebuilds, then equal again."""
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        _edge_store(store, edge)
        refresh(store.engine)
        erase_person(store.engine, "web", "u0")
        flt = _filter(edge - WEEK_MS, edge + WEEK_MS, group_by=GroupBy("channel"))
        with store.engine.connect() as connection:
            assert cover(connection, flt) is None
        assert refresh(store.engine).rebuilt
        assert_same_as_raw(store.engine, flt, CORE)
        purge_older_than(store.engine, 1, now_ms=edge + DAY_MS)
        assert refresh(store.engine).rebuilt
        assert_same_as_raw(store.engine, flt, CORE)


# Bugs: each test states the exact failure it shows.


def test_conversation_created_by_update_after_build(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge + HOUR_MS, "c1", "u1"))
        refresh(store.engine)
        store.write(
            ev.ConversationUpdate(
                channel="web", occurred_at=EPOCH + timedelta(milliseconds=edge + 2 * HOUR_MS),
                user_id="u2", conversation_id="c2", step="welcome",
            )
        )
        refresh(store.engine)
        assert_same_as_raw(store.engine, _filter(edge, edge + DAY_MS), ("summary", "volume-day"))


def test_conversation_start_moved_from_update_slot(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(
            ev.ConversationUpdate(
                channel="web", occurred_at=EPOCH + timedelta(milliseconds=edge + 2 * HOUR_MS),
                user_id="u2", conversation_id="c2", step="welcome",
            )
        )
        refresh(store.engine)
        store.write(store.message(edge + 5 * HOUR_MS, "c2", "u2"))
        refresh(store.engine)
        with store.engine.connect() as connection:
            rolled = connection.execute(
                select(func.sum(RollupConversations.conversations))
            ).scalar_one()
        assert rolled == 1, "rollup_conversations still counts the update's slot"
        assert_same_as_raw(store.engine, _filter(edge, edge + DAY_MS), ("summary", "heatmap"))


def test_conversation_created_by_touch_after_build(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge + HOUR_MS, "c1", "u1"))
        refresh(store.engine)
        store.write(
            ev.Touch(
                channel="web", occurred_at=EPOCH + timedelta(milliseconds=edge + 2 * HOUR_MS),
                key="t1", user_id="u2", conversation_id="c2", source="ads",
            )
        )
        refresh(store.engine)
        assert_same_as_raw(store.engine, _filter(edge, edge + DAY_MS), ("summary", "volume-day"))


def test_rebuild_chunks_follow_rows_not_time_span(tmp_path: Path) -> None:
    from chatmw.metrics.rollup_refresh import time_chunks
    from chatmw.store.engine import upgrade

    url = f"sqlite:///{tmp_path / 'span.db'}"
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine, Writer(engine))
    edge = _ms(EPOCH_WEEK_EDGE)
    # One reply dated 100 years later (a bad client clock).
    store.write(
        store.message(edge, "c", "u1"),
        store.message(_ms(datetime(2124, 3, 28, tzinfo=UTC)), "c", "u1", "bot"),
    )
    with engine.connect() as connection:
        chunks = time_chunks(connection)
    assert len(chunks) == 2
    assert refresh(engine).rebuilt
    assert_same_as_raw(engine, _filter(edge, edge + DAY_MS), ("summary", "volume-day"))
    engine.dispose()


def test_duplicate_after_session_gap(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge + HOUR_MS, None, "u1", key="same"))
        refresh(store.engine)
        store.write(store.message(edge + 5 * HOUR_MS, None, "u1", key="same"))
        refresh(store.engine)
        assert_same_as_raw(store.engine, _filter(edge, edge + DAY_MS), ("summary", "volume-day"))


def test_message_after_erased_opening_guest(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge + 2 * HOUR_MS, "room", "owner"))
        store.write(
            store.message(edge + HOUR_MS, "room", "guest"),
            store.message(edge + 3 * HOUR_MS, "room", "owner", "bot"),
        )
        erase_person(store.engine, "web", "guest")
        assert refresh(store.engine).rebuilt
        flt = _filter(edge, edge + DAY_MS)
        assert_same_as_raw(store.engine, flt, ("summary", "heatmap"))  # holds here
        store.write(store.message(edge + 5 * HOUR_MS, "room", "owner"))
        refresh(store.engine)
        assert_same_as_raw(store.engine, flt, ("summary", "heatmap"))


def test_end_update_after_erased_opener(database_url: str, tmp_path: Path) -> None:
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(edge + 2 * HOUR_MS, "room", "owner"))
        store.write(
            store.message(edge + HOUR_MS, "room", "guest"),
            store.message(edge + 3 * HOUR_MS, "room", "owner", "bot"),
        )
        erase_person(store.engine, "web", "guest")
        assert refresh(store.engine).rebuilt
        store.write(
            ev.ConversationUpdate(
                channel="web", occurred_at=EPOCH + timedelta(milliseconds=edge + 6 * HOUR_MS),
                user_id="owner", conversation_id="room", ended=True,
            )
        )
        refresh(store.engine)
        flt = _filter(edge + HOUR_MS, edge + HOUR_MS + SLOT_MS)
        assert_same_as_raw(store.engine, flt, ("summary", "heatmap"))


def test_contact_ids_stay_dense(database_url: str, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite takes no id for a row that conflicts")
    edge = _ms(EPOCH_WEEK_EDGE)
    with fresh_store(database_url, tmp_path) as store:
        for number in range(60):
            store.write(store.message(edge + number * 1000, "c", "regular"))
        store.write(store.message(edge, "d", "newcomer"))
        with store.engine.connect() as connection:
            newcomer = connection.execute(
                select(Contact.id).where(Contact.external_id == "newcomer")
            ).scalar_one()
        assert newcomer == 2
