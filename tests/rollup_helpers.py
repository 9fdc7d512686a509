"""Helpers of the rollup tests: random stores, table snapshots and rollup-to-raw comparisons.

The rollup tests compute each metric twice, once with rollups and once from raw rows only
(``raw_only``), and compare the two results. Percentiles from rollups are estimates from
histograms, so :func:`assert_close` allows them the histogram's relative error.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.business import BusinessSettings, install
from chatmw.events_business import Conversion
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.growth import growth
from chatmw.metrics.heatmap import heatmap
from chatmw.metrics.histogram import RELATIVE_ERROR
from chatmw.metrics.response_time import response_times
from chatmw.metrics.rollup_query import Coverage, cover
from chatmw.metrics.rollup_refresh import rebuild, refresh
from chatmw.metrics.summary import summary
from chatmw.metrics.volume import volume
from chatmw.store.models_rollups import SLOT_MS
from chatmw.store.writer import Enricher, Writer

CHANNELS = ("web", "whatsapp", "messenger")
PERCENTILES = ("p50", "p90", "p95")
DAY_MS = 86_400_000

Compute = Callable[[Engine, MetricFilter], dict[str, Any]]
# Metrics whose every figure from rollups equals the raw figure.
ACTIVITY_METRICS: dict[str, Compute] = {
    "volume-hour": lambda engine, flt: volume(engine, flt, {"interval": "hour"}),
    "volume-day": lambda engine, flt: volume(engine, flt, {"interval": "day"}),
    "volume-week": lambda engine, flt: volume(engine, flt, {"interval": "week"}),
    "volume-month": lambda engine, flt: volume(engine, flt, {"interval": "month"}),
    "heatmap": lambda engine, flt: heatmap(engine, flt, {}),
    "growth-day": lambda engine, flt: growth(engine, flt, {"period": "day"}),
    "growth-week": lambda engine, flt: growth(engine, flt, {"period": "week"}),
    "growth-month": lambda engine, flt: growth(engine, flt, {"period": "month"}),
}
# Metrics whose percentiles rollups estimate: every other figure must be equal.
ESTIMATED_METRICS: dict[str, Compute] = {
    "summary": lambda engine, flt: summary(engine, flt, {}),
    "response-time": lambda engine, flt: response_times(engine, flt, {}),
}

Bound = Callable[[float], float]

WEEK = timedelta(days=7)
# Conversion times from a start: inside, on and 1 ms either side of the 7-day attribution
# window, after it, and before the start.
CONVERSION_OFFSETS = (
    timedelta(0),
    timedelta(hours=1),
    timedelta(days=3),
    WEEK,
    WEEK + timedelta(milliseconds=1),
    WEEK - timedelta(milliseconds=1),
    timedelta(days=12),
    -timedelta(hours=2),
)


def percentile_bound(value: float) -> float:
    """Return the maximum difference between an estimated percentile and the exact ``value``."""
    # Both are rounded to the ms, so they may differ by one more ms.
    return RELATIVE_ERROR * value + 0.001


PERCENTILE_BOUNDS: dict[str, Bound] = dict.fromkeys(PERCENTILES, percentile_bound)


def assert_close(
    actual: Any, expected: Any, path: str = "", bounds: Mapping[str, Bound] = PERCENTILE_BOUNDS
) -> None:
    """Assert equal results, except that a value under a key of ``bounds`` may differ.

    ``bounds`` maps a key to the maximum difference allowed for a value under it. By
    default percentiles may differ by the histogram's relative error.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert sorted(actual) == sorted(expected), path
        for key, value in expected.items():
            if key in bounds and value is not None and actual[key] is not None:
                bound = bounds[key](value)
                assert abs(actual[key] - value) <= bound, f"{path}.{key}: {actual[key]} {value}"
            else:
                assert_close(actual[key], value, f"{path}.{key}", bounds)
    elif isinstance(expected, list):
        assert isinstance(actual, list), path
        assert len(actual) == len(expected), f"{path}: {len(actual)} != {len(expected)}"
        for index, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_close(left, right, f"{path}[{index}]", bounds)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def window_filters(
    since: datetime, until: datetime, ragged: tuple[datetime, datetime], channel: str
) -> list[MetricFilter]:
    """Return filters over a whole window and over a window not aligned to slots.

    They are the whole window alone, by channel and on ``channel`` only, then the ragged
    window alone and by channel on web and whatsapp.
    """
    return [
        MetricFilter(since=since, until=until),
        MetricFilter(since=since, until=until, group_by=GroupBy("channel")),
        MetricFilter(since=since, until=until, channels=(channel,)),
        MetricFilter(since=ragged[0], until=ragged[1]),
        MetricFilter(
            since=ragged[0],
            until=ragged[1],
            group_by=GroupBy("channel"),
            channels=("web", "whatsapp"),
        ),
    ]


def coverage_of(engine: Engine, flt: MetricFilter) -> Coverage | None:
    """Return which slots of ``flt`` rollups serve and which ranges are read from raw rows."""
    with engine.connect() as connection:
        return cover(connection, flt)


def assert_fully_served(engine: Engine, flt: MetricFilter) -> None:
    """Assert that rollups serve all of ``flt``'s window, so no part is read from raw rows."""
    coverage = coverage_of(engine, flt)
    assert coverage is not None
    assert coverage.raw == []


def table_rows(engine: Engine, tables: Iterable[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of each table, ordered by all columns, by table name."""
    rows = {}
    with engine.connect() as connection:
        for table in tables:
            columns = list(table.__table__.columns)
            result = connection.execute(select(*columns).order_by(*columns))
            rows[table.__tablename__] = [tuple(row) for row in result]
    return rows


def assert_rebuild_matches(engine: Engine, read_rows: Callable[[Engine], Any]) -> Any:
    """Assert that a full rebuild writes the rows the refreshes wrote; return those rows."""
    refreshed = read_rows(engine)
    assert rebuild(engine).rebuilt
    assert read_rows(engine) == refreshed
    return refreshed


def assert_later_steps_match_raw(
    engine: Engine,
    write_later: Callable[[], None],
    assert_same_as_raw: Callable[[Engine], None],
    read_rows: Callable[[Engine], Any],
) -> None:
    """Compare with raw rows after later events, after their refresh, and after a rebuild.

    The refresh must update the changed slots without a rebuild, and the rebuild must
    write the rows that ``read_rows`` read after the refresh.
    """
    write_later()
    # Not refreshed yet: the changed slots are read from raw rows.
    assert_same_as_raw(engine)
    report = refresh(engine)
    assert not report.rebuilt
    assert report.slots > 0
    assert_same_as_raw(engine)
    assert_rebuild_matches(engine, read_rows)
    assert_same_as_raw(engine)


# Random stores


def edge_time(rng: random.Random, start: datetime, days: int) -> datetime:
    """Return a time in the ``days`` days from ``start``, often on or 1 ms before a slot edge."""
    base = start + timedelta(milliseconds=rng.randrange(days * DAY_MS // SLOT_MS) * SLOT_MS)
    choice = rng.random()
    if choice < 0.3:
        return base
    if choice < 0.4:
        return base - timedelta(milliseconds=1)
    return base + timedelta(milliseconds=rng.randrange(SLOT_MS))


def hold_back_first(
    events: list[Any], held_back: list[ev.Message], late: bool, min_messages: int = 2
) -> list[Any]:
    """Return ``events`` without their first message when it arrives late.

    With ``late`` and at least ``min_messages`` messages, the first message goes to
    ``held_back``. Written later, it moves the conversation's start.
    """
    messages = [event for event in events if isinstance(event, ev.Message)]
    if not late or len(messages) < min_messages:
        return events
    held_back.append(messages[0])
    return [event for event in events if event is not messages[0]]


def duplicate_messages(
    numbers: Iterable[int],
    at: datetime,
    key: str,
    conversation: str,
    role: ev.Role = "user",
    user: str = "u0",
    text: str | None = None,
) -> list[ev.Message]:
    """Return messages with the keys of stored messages, which the writer stores once.

    ``key`` and ``conversation`` are format strings of the number, and message ``n`` is on
    channel ``CHANNELS[n % 3]``.
    """
    return [
        ev.Message(
            channel=CHANNELS[number % len(CHANNELS)],
            occurred_at=at,
            key=key.format(number),
            role=role,
            user_id=user,
            text=text,
            conversation_id=conversation.format(number),
        )
        for number in numbers
    ]


class RandomStore:
    """A random chat history with conversions in euros, written in steps.

    Conversation ``c{n}`` is on channel ``CHANNELS[n % 3]``, and ``starts`` maps its name
    to its channel, user and start.
    """

    def __init__(self, engine: Engine, seed: int, enrichers: Iterable[Enricher] = ()) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.writer = Writer(engine, enrichers=list(enrichers))
        install(self.writer, BusinessSettings(currency="EUR"))
        self.starts: dict[str, tuple[str, str, datetime]] = {}
        self.held_back: list[ev.Message] = []
        self.written: list[ev.Message] = []

    def start_conversation(
        self, number: int, start: datetime, user: str | None, users: int
    ) -> tuple[str, str, str]:
        """Record the start of ``c{number}`` and return its channel, user and name.

        Without ``user``, the user is one of ``users`` random users.
        """
        channel = CHANNELS[number % len(CHANNELS)]
        user = user or f"u{self.rng.randrange(users)}"
        name = f"c{number}"
        self.starts[name] = (channel, user, start)
        return channel, user, name

    def conversion(
        self,
        number: int,
        at: datetime,
        key: str,
        value_micros: int,
        name: str = "purchase",
        user: bool = False,
        conversation: bool = True,
    ) -> Conversion:
        """Return a conversion that names the user or the conversation ``c{number}``, or both."""
        channel, user_id, _ = self.starts[f"c{number}"]
        return Conversion(
            channel=channel,
            occurred_at=at,
            key=key,
            name=name,
            value_micros=value_micros,
            currency="EUR",
            user_id=user_id if user else None,
            conversation_id=f"c{number}" if conversation else None,
        )

    def random_conversions(
        self,
        number: int,
        offsets: tuple[timedelta, ...],
        by_user_share: float,
        both_share: float = 0.0,
    ) -> list[Conversion]:
        """Return 0 to 2 conversions of ``c{number}``, each at its start plus one of ``offsets``.

        A ``by_user_share`` of them names only the user. Of the others, a ``both_share``
        names the user and the conversation, and the rest the conversation only.
        """
        rng = self.rng
        start = self.starts[f"c{number}"][2]
        conversions = []
        for index in range(rng.choice((0, 0, 1, 2))):
            by_user = rng.random() < by_user_share
            offset = rng.choice(offsets)
            both = not by_user and both_share > 0 and rng.random() < both_share
            conversions.append(
                self.conversion(
                    number,
                    start + offset,
                    f"v{number}-{index}",
                    name=rng.choice(("purchase", "signup")),
                    value_micros=rng.randrange(1, 500) * 10_000,
                    user=by_user or both,
                    conversation=not by_user,
                )
            )
        return conversions

    def conversions(self, number: int) -> list[Conversion]:
        """Return 0 to 2 conversions of ``c{number}``, 60% naming only the user and 12% both."""
        return self.random_conversions(number, CONVERSION_OFFSETS, 0.6, both_share=0.3)


def number_on_channel(number: int, channel: str) -> int:
    """Return the first conversation number from ``number`` whose conversation is on ``channel``."""
    return number + (CHANNELS.index(channel) - number) % len(CHANNELS)
