"""Contact sets and rollup metrics with contact ids outside ``[0, 2**32)``.

The unit checks compare the contact sets with Python sets. The store checks give some
contacts such ids before anything is written, so the writer reuses them, and compare
every metric that counts contacts from rollups with the same metric from raw rows, after
a refresh that builds 64-bit sets. SQLite stores any signed 64-bit id, so its stores get
ids on both sides of 2**32 and of 2**63-1, and negative ids. On PostgreSQL ``contacts.id``
is a 32-bit ``integer`` column, so its stores get negative ids and ids next to 2**31-1.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import test_metrics_attribution_rollups as attribution_store
import test_metrics_cohort_rollups as cohort_store
import test_metrics_rollups as activity_store
from pyroaring import BitMap, BitMap64
from rollup_helpers import CHANNELS
from sqlalchemy import Engine, func, insert, select, text

from chatmw.metrics.attribution_rollups import rolled_attribution
from chatmw.metrics.contact_sets import (
    bitmap_of,
    count_distinct,
    count_union,
    decode,
    encode,
    intersection_count,
    union,
    union_update,
)
from chatmw.metrics.engagement_rollups import engagement_counts
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import cover
from chatmw.metrics.rollup_refresh import refresh
from chatmw.metrics.window_sets import with_ids
from chatmw.store.models import Contact
from chatmw.store.models_rollups import RollupAttributionSets, RollupContactSets, RollupUsers

WIDE = 2**64
# Ids next to the edges of 32-bit sets, as SQLite and PostgreSQL can store them.
SQLITE_IDS = (2**32 - 1, 2**32, 2**32 + 1, 2**63 - 2, 2**63 - 1, -1, -(2**63), 2**40 + 5)
POSTGRES_IDS = (2**31 - 2, 2**31 - 1, -1, -2, -(2**31), -(2**31) + 1)
OUTSIDE_32_BITS = tuple(contact_id for contact_id in SQLITE_IDS if not 0 <= contact_id < 2**32)


def _members(ids: set[int]) -> set[int]:
    """Return the members of a bitmap of ``ids``, with negative ids as their two's complement."""
    return {contact_id % WIDE for contact_id in ids}


def test_narrow_sets_keep_32_bit_format() -> None:
    ids = {0, 1, 7, 65_535, 65_536, *range(100_000, 120_000), 2**32 - 1}
    stored = BitMap(ids)
    stored.run_optimize()
    blob = encode(ids)
    # The bytes are those of a 32-bit bitmap, as stores built before 64-bit sets contain them.
    assert blob == stored.serialize()
    decoded = decode(blob)
    assert type(decoded) is BitMap
    assert set(decoded) == ids


@pytest.mark.parametrize(
    "ids",
    [
        {2**32},
        {0, 2**32 - 1, 2**32},
        {1, 2, 2**63 - 1},
        {-1, 5},
        {-(2**63), 2**63 - 1, 0},
        {*range(60_000, 80_000), 2**32 + 3, *range(2**33, 2**33 + 5_000)},
    ],
)
def test_wide_sets_round_trip(ids: set[int]) -> None:
    blob = encode(ids)
    assert blob[:1] == b"\x40"
    decoded = decode(blob)
    assert type(decoded) is BitMap64
    assert len(decoded) == len(ids)
    assert set(decoded) == _members(ids)
    assert decode(encode(decoded)) == decoded


def test_wide_sets_from_iterators() -> None:
    # A generator can be read only once, so the 32-bit attempt must not consume it.
    bitmap = bitmap_of(contact_id for contact_id in (3, 2**32, 4))
    assert type(bitmap) is BitMap64
    assert set(bitmap) == {3, 4, 2**32}


def test_ids_outside_64_bits_rejected() -> None:
    with pytest.raises(OverflowError):
        bitmap_of([1, 2**63])
    with pytest.raises(OverflowError):
        bitmap_of([-(2**63) - 1])


def test_mixed_width_unions_and_counts() -> None:
    rng = random.Random(11)
    for _ in range(50):
        narrow = set(rng.sample(range(200_000), rng.randrange(0, 3_000)))
        other = set(rng.sample(range(200_000), rng.randrange(0, 3_000)))
        wide = set(rng.sample(OUTSIDE_32_BITS, rng.randrange(1, 4)))
        loose = [rng.randrange(200_000) for _ in range(20)] + rng.sample(SQLITE_IDS, 2)
        narrow_bits = decode(encode(narrow))
        wide_bits = decode(encode(other | wide))
        assert type(narrow_bits) is BitMap
        assert type(wide_bits) is BitMap64

        everyone = _members(narrow | other | wide | set(loose))
        assert count_union([narrow_bits, wide_bits], loose) == len(everyone)
        assert count_union([wide_bits, narrow_bits]) == len(_members(narrow | other | wide))
        assert count_union([narrow_bits], loose) == len(_members(narrow | set(loose)))
        assert set(union([narrow_bits, wide_bits])) == _members(narrow | other | wide)
        assert intersection_count(narrow_bits, wide_bits) == len(narrow & other)
        assert intersection_count(wide_bits, narrow_bits) == len(narrow & other)
        assert set(with_ids(narrow_bits, loose)) == _members(narrow | set(loose))
        assert set(with_ids(None, wide_bits)) == _members(other | wide)

        target = BitMap(narrow_bits)
        merged = union_update(target, wide_bits)
        assert set(merged) == _members(narrow | other | wide)
        # Only the argument is 64-bit, so the result is new and the 32-bit target is unchanged.
        assert target == narrow_bits
        wide_target = BitMap64(wide_bits)
        assert union_update(wide_target, narrow_bits) is wide_target
        assert set(wide_target) == _members(narrow | other | wide)


def _special_ids(engine: Engine) -> tuple[int, ...]:
    return SQLITE_IDS if engine.dialect.name == "sqlite" else POSTGRES_IDS


def _seed_contacts(engine: Engine, pairs: list[tuple[str, str]]) -> set[int]:
    """Create the contacts of ``pairs``, with the special ids spread evenly over them.

    On SQLite the others get small explicit ids. On PostgreSQL the writer creates them
    from the sequence, because explicit ids would collide with its later values.
    Returns the ids outside ``[0, 2**32)``.
    """
    special_ids = _special_ids(engine)
    step = max(1, len(pairs) // len(special_ids))
    special = iter(special_ids)
    rows = []
    for index, (channel, user) in enumerate(sorted(pairs)):
        contact_id = next(special, None) if index % step == 0 else None
        if contact_id is None and engine.dialect.name == "sqlite":
            contact_id = 1_000 + index
        if contact_id is None:
            continue
        rows.append(
            {
                "id": contact_id,
                "channel": channel,
                "external_id": user,
                "first_seen_ms": 0,
                "last_seen_ms": 0,
            }
        )
    with engine.begin() as connection:
        connection.execute(insert(Contact), rows)
    return {row["id"] for row in rows if not 0 <= row["id"] < 2**32}


def _wide_stored(engine: Engine, table: Any, wide_ids: set[int]) -> set[int]:
    """Return the ids of ``wide_ids`` in the 64-bit sets of ``table``, after checking them."""
    with engine.connect() as connection:
        blobs = connection.execute(select(table.contacts)).scalars().all()
    assert blobs
    found: set[int] = set()
    for blob in blobs:
        decoded = decode(bytes(blob))
        if isinstance(decoded, BitMap64):
            assert bytes(blob)[:1] == b"\x40"
            found |= {contact_id for contact_id in wide_ids if contact_id % WIDE in decoded}
    return found


def _later_steps_match_raw(
    engine: Engine, write_later: Callable[[], None], assert_same: Callable[[Engine], None]
) -> None:
    """Compare after later events are written, and again after their refresh."""
    write_later()
    assert_same(engine)
    refresh(engine)
    assert_same(engine)


def _assert_served(engine: Engine, flt: MetricFilter) -> None:
    """Assert that rollups serve all of ``flt``'s window, so comparisons compare two paths."""
    with engine.connect() as connection:
        coverage = cover(connection, flt)
    assert coverage is not None
    assert coverage.raw == []


def test_activity_metrics_wide_ids(engine: Engine) -> None:
    users = [f"user{number}" for number in range(25)]
    wide = _seed_contacts(engine, [(c, u) for c in CHANNELS for u in users])
    writer, held_back = activity_store.build_store(engine)
    assert refresh(engine).rebuilt
    assert len(_wide_stored(engine, RollupContactSets, wide)) >= 2

    flt = MetricFilter(since=activity_store.T0, until=activity_store.T0 + timedelta(days=5))
    _assert_served(engine, flt)
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        assert coverage is not None
        spans = {0: (coverage.first_slot, coverage.end_slot)}
        counted = count_distinct(connection, "users", spans, coverage.served, (), [])
        distinct = select(func.count(func.distinct(RollupUsers.contact_id)))
        expected = connection.execute(distinct).scalar_one()
        wide_users = select(func.count(func.distinct(RollupUsers.contact_id))).where(
            RollupUsers.contact_id.in_(sorted(wide))
        )
        assert connection.execute(wide_users).scalar_one() >= 2
    assert counted is not None
    assert counted[1][0] == expected
    # summary, volume, growth and channels count distinct users from the sets.
    activity_store.assert_same_as_raw(engine)

    _later_steps_match_raw(
        engine,
        lambda: activity_store.later_events(writer, held_back),
        activity_store.assert_same_as_raw,
    )


def test_engagement_retention_wide_ids(engine: Engine) -> None:
    users = [f"u{number}" for number in range(70)]
    wide = _seed_contacts(engine, [(c, u) for c in CHANNELS for u in users])
    writer, late, rng = cohort_store.build_store(engine, 3)
    assert refresh(engine).rebuilt
    stored = _wide_stored(engine, RollupContactSets, wide)
    assert len(stored) >= 2
    with engine.connect() as connection:
        kinds = connection.execute(
            select(RollupContactSets.kind).where(
                func.substr(RollupContactSets.contacts, 1, 1) == b"\x40"
            )
        ).scalars()
        wide_kinds = set(kinds)
    # Retention reads the starters, engagement the exposed, proactive and writing contacts.
    assert {"starters", "writers", "exposed"} <= wide_kinds

    since = cohort_store.T0 + timedelta(days=7)
    flt = MetricFilter(since=since, until=cohort_store.T0 + timedelta(days=35))
    _assert_served(engine, flt)
    assert engagement_counts(engine, flt) is not None
    cohort_store.assert_same_as_raw(engine)

    _later_steps_match_raw(
        engine, lambda: cohort_store.more_events(writer, late, rng), cohort_store.assert_same_as_raw
    )


def test_attribution_wide_ids(engine: Engine) -> None:
    users = [f"u{number}" for number in range(15)]
    wide = _seed_contacts(engine, [(c, u) for c in CHANNELS for u in users])
    store = attribution_store.Store(engine, seed=5)
    store.first_events()
    assert refresh(engine).rebuilt
    assert len(_wide_stored(engine, RollupAttributionSets, wide)) >= 2

    attribution_store.assert_same_as_raw(engine)
    rolled = rolled_attribution(
        engine,
        MetricFilter(since=attribution_store.T0, until=attribution_store.T0 + timedelta(days=10)),
        7,
    )
    assert rolled is not None
    with engine.connect() as connection:
        distinct = connection.execute(
            text("SELECT COUNT(DISTINCT contact_id) FROM rollup_attribution")
        ).scalar_one()
    # Every conversation of the store starts inside the ten days.
    assert rolled["totals"]["users"] == distinct

    _later_steps_match_raw(engine, store.later_events, attribution_store.assert_same_as_raw)
