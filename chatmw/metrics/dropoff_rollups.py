"""Drop-off counts per conversation start slot, their refresh, and the query that reads them.

Each conversation counts in the slot of its start, like ``rollup_outcomes``:

- ``rollup_dropoff`` (slot, hour, day and week rows) counts the conversations per last
  step. Its ``ended`` column counts those without an outcome whose end was reported,
  dropped whatever the time of the query. Its ``open`` column counts those without an
  outcome or a reported end, dropped once their last message is older than the idle
  cut-off;
- ``rollup_dropoff_open`` splits the slot rows' ``open`` conversations by the slot of
  their last message;
- ``rollup_dropoff_steps`` (slot, hour, day and week rows) counts the conversations per
  set of steps seen, kept once each in ``rollup_step_sets``, so that the funnel of any
  ``steps`` list is summed from the counts.

A row depends on its conversation (start, channel, end, resolution, last step, last
message time), its bot messages' intents and its attributed conversions. A change to
any of these dirties the conversation's start slot (``chatmw.metrics.rollup_refresh``),
so recomputing dirty start slots keeps the rows exact.

A query sums ``open`` over its served slots and subtracts the conversations whose last
message lies in the cut-off's slot or later, read from ``rollup_dropoff_open`` as one
index range. The conversations whose last message lies in the cut-off's own slot are
then read from raw rows, and those before the cut-off are added back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, delete, func, insert, literal_column, select
from sqlalchemy.sql.elements import ColumnElement

from chatmw.metrics.conversion_rollups import conversion_links
from chatmw.metrics.dropoff import DropoffTally, nameable_step, stopped_step
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.outcome_query import raw_where, rolled_sums
from chatmw.metrics.rollup_levels import LeveledSums, Ranges
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import (
    BEFORE_EPOCH_SLOT,
    slot_of,
    slot_ranges,
    time_in_ranges,
)
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import (
    LEVEL_SLOT,
    RollupDropoff,
    RollupDropoffOpen,
    RollupDropoffSteps,
    RollupStepSets,
)

__all__ = [
    "DROPOFF_TABLES",
    "DROPOFF",
    "STEP_COUNTS",
    "collect_dropoff",
    "delete_dropoff",
    "insert_dropoff",
    "dropoff_tallies",
]

DROPOFF = LeveledSums(RollupDropoff, ("channel", "step"), ("conversations", "ended", "open"))
STEP_COUNTS = LeveledSums(RollupDropoffSteps, ("channel", "step_set_id"), ("conversations",))
# The step sets go last: the rows of the other tables name them.
DROPOFF_TABLES = (RollupDropoff, RollupDropoffOpen, RollupDropoffSteps, RollupStepSets)
# Ranges and ids per statement, as in chatmw.metrics.rollup_refresh.
_RANGES = 50
_IDS = 5_000

# The state of a conversation for the drop-off: an outcome (resolved or converted), a
# reported end without an outcome, or neither.
OUTCOME, ENDED, OPEN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Stop:
    """One conversation as the drop-off counts it."""

    start_slot: int
    channel: str
    step: str
    state: int
    last_ms: int
    steps: frozenset[str]


def collect_dropoff(connection: Connection, where: ColumnElement[bool]) -> list[Stop]:
    """Return the conversations ``where`` selects, from raw rows, as the metric counts them.

    A conversation has an outcome when it is resolved or has an attribution with the
    default window (the rows of ``rollup_conversion_links``, computed from raw rows here).
    """
    converted = {link["conversation_id"] for link in conversion_links(connection, where)}
    intents: dict[int, list[str]] = defaultdict(list)
    bot = (
        select(Message.conversation_id, Message.intent)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(where, Message.role == "bot", Message.intent.is_not(None))
        .order_by(Message.conversation_id, Message.occurred_at_ms, Message.id)
    )
    for conversation_id, intent in connection.execute(bot):
        intents[conversation_id].append(intent)
    conversations = select(
        Conversation.id,
        Conversation.started_at_ms,
        Conversation.channel,
        Conversation.resolved,
        Conversation.ended_at_ms,
        Conversation.last_message_at_ms,
        Conversation.last_step,
    ).where(where)
    stops = []
    for conversation_id, started, channel, resolved, ended, last, last_step in connection.execute(
        conversations
    ):
        bot_intents = intents.get(conversation_id, [])
        state = OPEN if ended is None else ENDED
        if resolved or conversation_id in converted:
            state = OUTCOME
        seen = {*bot_intents, *([last_step] if last_step else [])}
        stops.append(
            Stop(
                slot_of(int(started)),
                channel,
                stopped_step(last_step, bot_intents),
                state,
                int(last),
                frozenset(step for step in seen if nameable_step(step)),
            )
        )
    return stops


def _fingerprint(steps: frozenset[str]) -> tuple[str, str]:
    text = json.dumps(sorted(steps), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), text


def _step_set_ids(connection: Connection, sets: Iterable[frozenset[str]]) -> dict[frozenset, int]:
    """Return the id of each step set, adding the sets not stored yet.

    Only the refresher and a rebuild add sets, one at a time under the ``rollup_state``
    lock, so a set is never added twice.
    """
    requested = {_fingerprint(steps)[0]: steps for steps in set(sets)}
    ids: dict[frozenset, int] = {}
    fingerprints = sorted(requested)
    for index in range(0, len(fingerprints), _IDS):
        statement = select(RollupStepSets.fingerprint, RollupStepSets.id).where(
            RollupStepSets.fingerprint.in_(fingerprints[index : index + _IDS])
        )
        for fingerprint, set_id in connection.execute(statement):
            ids[requested[fingerprint]] = int(set_id)
    missing = [steps for steps in requested.values() if steps not in ids]
    if missing:
        top = connection.execute(select(RollupStepSets.id).order_by(RollupStepSets.id.desc()))
        next_id = int(top.scalar() or 0) + 1
        rows = []
        for offset, steps in enumerate(sorted(missing, key=lambda item: sorted(item))):
            fingerprint, text = _fingerprint(steps)
            rows.append({"id": next_id + offset, "fingerprint": fingerprint, "steps": text})
            ids[steps] = next_id + offset
        connection.execute(insert(RollupStepSets), rows)
    return ids


def _insert_slot_rows(connection: Connection, where: ColumnElement[bool]) -> None:
    stops = collect_dropoff(connection, where)
    counts: dict[tuple[int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    opened: dict[tuple[int, int, str, str], int] = defaultdict(int)
    by_set: dict[tuple[int, str, frozenset[str]], int] = defaultdict(int)
    for stop in stops:
        item = counts[(stop.start_slot, stop.channel, stop.step)]
        item[0] += 1
        item[1] += int(stop.state == ENDED)
        if stop.state == OPEN:
            item[2] += 1
            opened[(slot_of(stop.last_ms), stop.start_slot, stop.channel, stop.step)] += 1
        by_set[(stop.start_slot, stop.channel, stop.steps)] += 1
    if not stops:
        return
    connection.execute(
        insert(RollupDropoff),
        [
            {
                "level": LEVEL_SLOT,
                "start_ms": slot,
                "channel": channel,
                "step": step,
                "conversations": total,
                "ended": ended,
                "open": still_open,
            }
            for (slot, channel, step), (total, ended, still_open) in counts.items()
        ],
    )
    if opened:
        connection.execute(
            insert(RollupDropoffOpen),
            [
                {
                    "last_slot_ms": last,
                    "start_slot_ms": start,
                    "channel": channel,
                    "step": step,
                    "conversations": number,
                }
                for (last, start, channel, step), number in opened.items()
            ],
        )
    ids = _step_set_ids(connection, (steps for _, _, steps in by_set))
    connection.execute(
        insert(RollupDropoffSteps),
        [
            {
                "level": LEVEL_SLOT,
                "start_ms": slot,
                "channel": channel,
                "step_set_id": ids[steps],
                "conversations": number,
            }
            for (slot, channel, steps), number in by_set.items()
        ],
    )


def delete_dropoff(connection: Connection, ranges: Ranges) -> None:
    """Delete the rows of the start slots in ``ranges`` and the hours, days and weeks around."""
    DROPOFF.delete(connection, ranges)
    STEP_COUNTS.delete(connection, ranges)
    for index in range(0, len(ranges), _RANGES):
        part = ranges[index : index + _RANGES]
        connection.execute(
            delete(RollupDropoffOpen).where(time_in_ranges(RollupDropoffOpen.start_slot_ms, part))
        )


def insert_dropoff(connection: Connection, ranges: Ranges) -> None:
    """Count the conversations that started in ``ranges`` (whole slots) into emptied rows."""
    for index in range(0, len(ranges), _RANGES):
        part = ranges[index : index + _RANGES]
        _insert_slot_rows(connection, time_in_ranges(Conversation.started_at_ms, part))
    DROPOFF.sum_levels(connection, ranges)
    STEP_COUNTS.sum_levels(connection, ranges)


def _count_raw(
    tallies: dict[str, DropoffTally], stops: Iterable[Stop], idle_before_ms: int
) -> None:
    """Add conversations read from raw rows to ``tallies``."""
    for stop in stops:
        tally = tallies[stop.channel]
        tally.conversations += 1
        tally.step_sets[stop.steps] = tally.step_sets.get(stop.steps, 0) + 1
        if stop.state == ENDED or (stop.state == OPEN and stop.last_ms < idle_before_ms):
            tally.dropped[stop.step] = tally.dropped.get(stop.step, 0) + 1


def _still_active(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    idle_before_ms: int,
    tallies: dict[str, DropoffTally],
) -> None:
    """Take the open conversations of served slots that are not idle yet out of ``tallies``.

    The served sums count every open conversation as dropped. The conversations whose last
    message lies in the cut-off's slot or later are subtracted, and those of them whose
    last message is still before the cut-off are read from raw rows and added back.
    """
    cut_slot = slot_of(idle_before_ms)
    table = RollupDropoffOpen
    # "+ 0" keeps the planners off the start slot index: the rows at or after the cut-off
    # are few and one range of the primary key, the rows of the window are many.
    start = table.start_slot_ms + literal_column("0")
    statement = select(
        table.start_slot_ms, table.last_slot_ms, table.channel, table.step, table.conversations
    ).where(
        table.last_slot_ms >= cut_slot,
        start >= coverage.first_slot,
        start < coverage.end_slot,
        *channel_condition(table.channel, flt),
    )
    straddling: set[int] = set()
    for start, last, channel, step, number in connection.execute(statement):
        if int(start) not in coverage.served:
            continue
        dropped = tallies[channel].dropped
        dropped[step] = dropped.get(step, 0) - int(number)
        if int(last) == cut_slot:
            straddling.add(int(start))
    if not straddling:
        return
    low = None if cut_slot == BEFORE_EPOCH_SLOT else cut_slot
    where = time_in_ranges(Conversation.started_at_ms, slot_ranges(straddling)) & time_in_ranges(
        Conversation.last_message_at_ms, [(low, idle_before_ms)]
    )
    for condition in channel_condition(Conversation.channel, flt):
        where = where & condition
    for stop in collect_dropoff(connection, where):
        if stop.state == OPEN and stop.start_slot in coverage.served:
            dropped = tallies[stop.channel].dropped
            dropped[stop.step] = dropped.get(stop.step, 0) + 1


def dropoff_tallies(
    engine: Engine, flt: MetricFilter, idle_before_ms: int, with_steps: bool
) -> dict[str, DropoffTally] | None:
    """Return the drop-off counts per channel, or None when rollups do not apply.

    ``idle_before_ms`` is the idle cut-off: an open conversation whose last message is
    before it is dropped. Step sets are counted only ``with_steps``.
    """
    # Start slots are counted in UTC: the time zone does not change which conversations
    # started in the window.
    utc = dataclasses.replace(flt, tz=ZoneInfo("UTC"))
    with engine.connect() as connection:
        coverage = cover(connection, utc)
        if coverage is None:
            return None
        tallies: dict[str, DropoffTally] = defaultdict(DropoffTally)
        for channel, step, total, ended, still_open in rolled_sums(
            connection, utc, coverage, DROPOFF
        ):
            tally = tallies[channel]
            tally.conversations += int(total or 0)
            dropped = int(ended or 0) + int(still_open or 0)
            tally.dropped[step] = tally.dropped.get(step, 0) + dropped
        _still_active(connection, utc, coverage, idle_before_ms, tallies)
        if with_steps:
            _served_step_sets(connection, utc, coverage, tallies)
        in_raw = raw_where(utc, coverage)
        if in_raw is not None:
            _count_raw(tallies, collect_dropoff(connection, in_raw), idle_before_ms)
    for tally in tallies.values():
        tally.dropped = {step: count for step, count in tally.dropped.items() if count}
    return {channel: tally for channel, tally in tallies.items() if tally.conversations}


def _served_step_sets(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    tallies: dict[str, DropoffTally],
) -> None:
    """Add the step set counts of the served slots to ``tallies``."""
    served = STEP_COUNTS.served(coverage)
    if served is None:
        return
    counts = RollupDropoffSteps
    sums = (
        select(
            counts.channel,
            counts.step_set_id,
            func.sum(counts.conversations).label("conversations"),
        )
        .where(served, *channel_condition(counts.channel, flt))
        .group_by(counts.channel, counts.step_set_id)
        .subquery()
    )
    # One statement reads the counts with their sets, so a rebuild cannot come between.
    statement = select(sums.c.channel, RollupStepSets.steps, sums.c.conversations).join(
        RollupStepSets, RollupStepSets.id == sums.c.step_set_id
    )
    parsed: dict[str, frozenset[str]] = {}
    for channel, text, number in connection.execute(statement):
        steps = parsed.get(text)
        if steps is None:
            steps = parsed[text] = frozenset(json.loads(text))
        step_sets = tallies[channel].step_sets
        step_sets[steps] = step_sets.get(steps, 0) + int(number or 0)
