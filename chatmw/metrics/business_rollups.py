"""Response-time histograms in business hours, counted for one registered schedule.

Business time depends on the schedule, so ``rollup_business_responses`` keeps histograms
for exactly one: the business hours stored in ``rollup_business_schedule`` (canonical
JSON and its SHA-256 fingerprint). The process that serves the metrics registers its
configured schedule (:func:`register_business_hours`; ``Runtime.start`` and
``chatmw rollups refresh`` do it), and a store where none was registered counts the
default one (Monday to Friday, 09:00-17:00 UTC). Registering a different schedule marks
the table unbuilt, and the next refresh counts it again (:func:`rebuild_stale_business`)
while the other rollups stay in use. A query reads these histograms only when its
schedule has the fingerprint they were built for; every other schedule reads raw rows.

Rows are keyed like ``rollup_responses``: conversation start slot (summed per hour, day
and week) and conversation channel. Each answer's business time uses the schedule of its
message's channel, as the raw metric does, so a dirty start slot is recounted exactly.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from chatmw.business_hours import DEFAULT_BUSINESS_HOURS, BusinessClock, BusinessHours
from chatmw.metrics.histogram import Bin, SlotKey, add_slot_duration, slot_rows
from chatmw.metrics.rollup_refresh import (
    REBUILD_LEASE_MS,
    analyze_tables,
    lock_state,
    slot_expression,
    time_chunks,
)
from chatmw.store.models import Conversation, Message
from chatmw.store.models_rollups import (
    LEVEL_SLOT,
    RollupBusinessResponses,
    RollupBusinessSchedule,
)

__all__ = [
    "BusinessSchedule",
    "business_durations",
    "business_slot_rows",
    "read_schedule",
    "registered_hours",
    "register_business_hours",
    "rebuild_stale_business",
    "claim_business_for_rebuild",
    "finish_business_rebuild",
]

logger = logging.getLogger("chatmw")

FIRST_RESPONSE = "first_response"
REPLY_TIME = "reply_time"
# Parsed schedules by fingerprint, so refreshes do not parse the stored JSON each time.
_PARSED: dict[str, BusinessHours] = {}
_PARSED_MAX = 16


@dataclass(frozen=True, slots=True)
class BusinessSchedule:
    """The row of ``rollup_business_schedule``."""

    schedule: str
    fingerprint: str
    built_fingerprint: str | None
    rebuild_token: str | None
    rebuild_started_at_ms: int

    @property
    def built(self) -> bool:
        """Whether every histogram row was counted with the registered schedule."""
        return self.built_fingerprint == self.fingerprint


def _ensure_schedule(connection: Connection) -> None:
    # A store where no schedule was registered counts the default business hours.
    insert_module = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(
        insert_module.insert(RollupBusinessSchedule)
        .values(
            id=1,
            schedule=DEFAULT_BUSINESS_HOURS.canonical_json(),
            fingerprint=DEFAULT_BUSINESS_HOURS.fingerprint(),
            built_fingerprint=None,
            rebuild_token=None,
            rebuild_started_at_ms=0,
        )
        .on_conflict_do_nothing()
    )


def read_schedule(connection: Connection) -> BusinessSchedule | None:
    """Return the stored schedule row, or None when no schedule row exists yet."""
    row = connection.execute(
        select(
            RollupBusinessSchedule.schedule,
            RollupBusinessSchedule.fingerprint,
            RollupBusinessSchedule.built_fingerprint,
            RollupBusinessSchedule.rebuild_token,
            RollupBusinessSchedule.rebuild_started_at_ms,
        ).where(RollupBusinessSchedule.id == 1)
    ).first()
    if row is None:
        return None
    return BusinessSchedule(row[0], row[1], row[2], row[3], int(row[4] or 0))


def registered_hours(connection: Connection) -> BusinessHours:
    """Return the business hours the histograms are counted with (the default if none)."""
    stored = read_schedule(connection)
    if stored is None:
        return DEFAULT_BUSINESS_HOURS
    hours = _PARSED.get(stored.fingerprint)
    if hours is None:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        hours = _PARSED[stored.fingerprint] = BusinessHours.from_canonical_json(stored.schedule)
    return hours


def business_durations(
    answers: Sequence[tuple[str, int, float]], hours: BusinessHours
) -> list[float]:
    """Return the business ms of each ``(message channel, answered at ms, response ms)``.

    Each answer is timed by its channel's schedule from ``answered - response`` to
    ``answered``, as ``chatmw.metrics.business_hours`` times raw rows.
    """
    if not answers:
        return []
    low = min(answered - int(round(response)) for _, answered, response in answers)
    high = max(answered for _, answered, _ in answers)
    clocks: dict[str, BusinessClock] = {}
    durations = []
    for channel, answered, response in answers:
        clock = clocks.get(channel)
        if clock is None:
            clock = clocks[channel] = BusinessClock(hours.for_channel(channel), low, high)
        durations.append(float(clock.business_ms(answered - int(round(response)), answered)))
    return durations


def business_slot_rows(connection: Connection, where: ColumnElement[bool]) -> list[dict[str, Any]]:
    """Return the slot histogram rows of the answers in the conversations ``where`` selects.

    Durations are counted with the registered schedule (:func:`registered_hours`).
    """
    hours = registered_hours(connection)
    statement = (
        select(
            slot_expression(Conversation.started_at_ms),
            Conversation.channel,
            Message.role,
            Message.is_first_response,
            Message.channel,
            Message.occurred_at_ms,
            Message.response_ms,
        )
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.response_ms.is_not(None), where)
    )
    rows = connection.execute(statement).all()
    durations = business_durations([(row[4], row[5], row[6]) for row in rows], hours)
    bins: dict[SlotKey, Bin] = {}
    for (start_slot, channel, role, is_first, *_), value in zip(rows, durations, strict=True):
        figures = (REPLY_TIME, FIRST_RESPONSE) if is_first else (REPLY_TIME,)
        for figure in figures:
            add_slot_duration(bins, start_slot, channel, figure, role, value)
    return slot_rows(bins, LEVEL_SLOT)


def register_business_hours(engine: Engine, hours: BusinessHours) -> bool:
    """Store ``hours`` as the schedule of the business-hours histograms.

    Returns True when the schedule changed: the histograms are then marked unbuilt, the
    business half of ``response-time-business`` reads raw rows, and the next refresh
    counts the histograms again with ``hours``. Registering the stored schedule again
    changes nothing.
    """
    canonical = hours.canonical_json()
    fingerprint = hours.fingerprint()
    with engine.begin() as connection:
        # The state lock keeps a refresh or rebuild step from counting with the old schedule
        # after this commits.
        lock_state(connection)
        _ensure_schedule(connection)
        stored = read_schedule(connection)
        if stored is not None and stored.fingerprint == fingerprint:
            return False
        connection.execute(
            update(RollupBusinessSchedule)
            .where(RollupBusinessSchedule.id == 1)
            .values(
                schedule=canonical,
                fingerprint=fingerprint,
                built_fingerprint=None,
                rebuild_token=None,
                rebuild_started_at_ms=0,
            )
        )
    logger.info(
        "rollups: business hours %s registered; business-hours histograms are rebuilt "
        "at the next refresh",
        fingerprint[:12],
    )
    return True


def claim_business_for_rebuild(connection: Connection, token: str, now_ms: int) -> None:
    """Let the full rebuild claimed with ``token`` count the histograms (state row locked)."""
    _ensure_schedule(connection)
    connection.execute(
        update(RollupBusinessSchedule)
        .where(RollupBusinessSchedule.id == 1)
        .values(built_fingerprint=None, rebuild_token=token, rebuild_started_at_ms=now_ms)
    )


def finish_business_rebuild(connection: Connection, token: str) -> None:
    """Mark the histograms built, unless a schedule was registered since ``token`` claimed them."""
    connection.execute(
        update(RollupBusinessSchedule)
        .where(RollupBusinessSchedule.id == 1, RollupBusinessSchedule.rebuild_token == token)
        .values(built_fingerprint=RollupBusinessSchedule.fingerprint, rebuild_token=None)
    )


def _claim_stale(connection: Connection, now_ms: int) -> str | None:
    state = lock_state(connection)
    if not state.built:
        # The next full rebuild counts the histograms with the other rollups.
        return None
    _ensure_schedule(connection)
    stored = read_schedule(connection)
    if stored is None or stored.built:
        return None
    claimed = stored.rebuild_token is not None
    if claimed and now_ms - stored.rebuild_started_at_ms < REBUILD_LEASE_MS:
        return None
    token = secrets.token_hex(8)
    claim_business_for_rebuild(connection, token, now_ms)
    connection.execute(delete(RollupBusinessResponses))
    return token


def _owns(connection: Connection, token: str) -> bool:
    lock_state(connection)
    stored = read_schedule(connection)
    return stored is not None and stored.rebuild_token == token


def rebuild_stale_business(engine: Engine, now_ms: int) -> bool:
    """Count the histograms again when they were not counted with the registered schedule.

    Runs one week of conversation starts per transaction, each under the state lock, so
    refreshes wait between steps and never interleave with one. Returns True when it
    rebuilt the table, False when there was nothing to do, another rebuild has the
    claim, or a schedule registered meanwhile took the claim away.
    """
    from chatmw.metrics.rollup_started import recount_business

    with engine.begin() as connection:
        token = _claim_stale(connection, now_ms)
        if token is None:
            return False
        chunks = time_chunks(connection)
    for chunk in chunks:
        with engine.begin() as connection:
            if not _owns(connection, token):
                return False
            recount_business(connection, [chunk])
    with engine.begin() as connection:
        if not _owns(connection, token):
            return False
        finish_business_rebuild(connection, token)
    analyze_tables(engine, ("rollup_business_responses",))
    logger.info("rollups: business-hours histograms rebuilt for the registered schedule")
    return True
