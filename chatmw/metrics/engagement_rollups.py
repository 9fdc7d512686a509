"""The ``engagement`` figures from rollups, with raw rows for the parts rollups do not cover.

Reached users and writers are unions over the window. They come from the day and week
bitmaps of ``rollup_contact_sets`` (kinds ``exposed``, ``proactive`` and ``writers``),
from the slot rows of the served slots outside whole days, and from the raw rows of the
raw ranges. Conversation counts are sums of ``rollup_conversations`` and ``rollup_engaged``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pyroaring import FrozenBitMap
from sqlalchemy import Connection, Engine, func, literal_column, select, union_all

from chatmw.metrics.contact_sets import ContactBitmap, intersection_count, union
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.reach_rollups import conversation_rows
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.window_sets import span_sets, with_ids
from chatmw.store.models import Conversation, Exposure
from chatmw.store.models_rollups import (
    RollupContactSets,
    RollupConversations,
    RollupEngaged,
    RollupState,
)

__all__ = [
    "ChannelReach",
    "EngagementCounts",
    "conversation_counts",
    "engagement_counts",
]


_KINDS = ("exposed", "proactive", "writers")
_EMPTY = FrozenBitMap()


@dataclass(slots=True)
class ChannelReach:
    """Distinct users of one channel: exposed, proactive, writing, reached, and engaged."""

    exposed: int = 0
    proactive: int = 0
    writing: int = 0
    reach: int = 0
    engaged: int = 0


@dataclass(slots=True)
class EngagementCounts:
    """The figures ``chatmw.metrics.engagement`` reports, before rates and notes."""

    reach: dict[str, ChannelReach] = field(default_factory=dict)
    # Channels with an exposure at any time, within the channel filter.
    known: set[str] = field(default_factory=set)
    # Conversations and engaged conversations per channel, for those started in the window.
    conversations: dict[str, int] = field(default_factory=dict)
    engaged_conversations: dict[str, int] = field(default_factory=dict)


def _window_sets(
    connection: Connection, coverage: Coverage, channels: tuple[str, ...]
) -> dict[str, dict[str, ContactBitmap]]:
    """Return the contacts of the served slots per kind and channel."""
    spans = {0: (coverage.first_slot, coverage.end_slot)}
    sets: dict[str, dict[str, ContactBitmap]] = {kind: {} for kind in _KINDS}
    for (kind, _, channel), bits in span_sets(
        connection, _KINDS, spans, coverage.served, channels
    ).items():
        sets[kind][channel] = bits
    return sets


def _slot_sums(
    connection: Connection, flt: MetricFilter, coverage: Coverage, counts: EngagementCounts
) -> None:
    """Sum conversations and engaged conversations per channel over the served slots."""
    parts = []
    for figure, (slot, channel, count) in enumerate(
        (
            (
                RollupConversations.slot_ms,
                RollupConversations.channel,
                RollupConversations.conversations,
            ),
            (RollupEngaged.start_slot_ms, RollupEngaged.channel, RollupEngaged.conversations),
        )
    ):
        parts.append(
            select(literal_column(str(figure)).label("figure"), channel, func.sum(count))
            .where(*coverage.served_conditions(slot), *channel_condition(channel, flt))
            .group_by(channel)
        )
    totals = (counts.conversations, counts.engaged_conversations)
    for figure, channel, total in connection.execute(union_all(*parts)):
        totals[int(figure)][channel] = int(total)


def conversation_counts(
    connection: Connection, flt: MetricFilter, coverage: Coverage
) -> EngagementCounts:
    """Return conversations and engaged conversations per channel, for those started in the window.

    Only ``conversations`` and ``engaged_conversations`` are set. ``coverage`` must come
    from ``cover`` on ``flt``.
    """
    counts = EngagementCounts()
    _slot_sums(connection, flt, coverage, counts)
    if not coverage.raw:
        return counts
    rows = select(Conversation.channel, Conversation.user_message_count).where(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )
    for channel, user_messages in connection.execute(rows):
        _count_conversation(counts, channel, user_messages)
    return counts


def _count_conversation(counts: EngagementCounts, channel: str, user_messages: int | None) -> None:
    counts.conversations[channel] = counts.conversations.get(channel, 0) + 1
    if (user_messages or 0) >= 2:
        engaged = counts.engaged_conversations
        engaged[channel] = engaged.get(channel, 0) + 1


def _known_channels(connection: Connection, flt: MetricFilter) -> set[str]:
    """Return the channels with an exposure at any time, within the channel filter."""
    watermark = connection.execute(
        select(RollupState.exposure_watermark_id).where(RollupState.id == 1)
    ).scalar_one()
    rolled = select(RollupContactSets.channel).where(RollupContactSets.kind == "exposed").distinct()
    # Exposures not refreshed yet and those before the epoch are not in the sets. Each
    # statement reads one index range.
    new = select(Exposure.channel).where(Exposure.id > watermark).distinct()
    early = select(Exposure.channel).where(Exposure.occurred_at_ms < 0).distinct()
    known: set[str] = set()
    for statement in (rolled, new, early):
        known.update(connection.execute(statement).scalars())
    if flt.channels:
        known &= set(flt.channels)
    return known


def _add_raw(
    connection: Connection,
    flt: MetricFilter,
    coverage: Coverage,
    counts: EngagementCounts,
    raw_ids: dict[str, dict[str, set[int]]],
) -> None:
    """Add the exposures and conversations of the raw ranges to ``counts`` and ``raw_ids``."""
    exposures = select(Exposure.channel, Exposure.contact_id).where(
        time_in_ranges(Exposure.occurred_at_ms, coverage.raw),
        *channel_condition(Exposure.channel, flt),
    )
    for channel, contact_id in connection.execute(exposures):
        raw_ids["exposed"][channel].add(contact_id)
    rows = conversation_rows(time_in_ranges(Conversation.started_at_ms, coverage.raw), flt.channels)
    for _, channel, contact_id, role, user_messages in connection.execute(rows):
        _count_conversation(counts, channel, user_messages)
        if contact_id is None:
            continue
        if role is not None and role != "user":
            raw_ids["proactive"][channel].add(contact_id)
        if (user_messages or 0) >= 1:
            raw_ids["writers"][channel].add(contact_id)


def engagement_counts(engine: Engine, flt: MetricFilter) -> EngagementCounts | None:
    """Return the engagement figures from rollups, or None where rollups do not apply."""
    with engine.connect() as connection:
        coverage = cover(connection, flt)
        if coverage is None:
            return None
        counts = EngagementCounts()
        counts.known = _known_channels(connection, flt)
        _slot_sums(connection, flt, coverage, counts)
        sets = _window_sets(connection, coverage, flt.channels)
        raw_ids: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        if coverage.raw:
            _add_raw(connection, flt, coverage, counts, raw_ids)

    for kind, by_channel in raw_ids.items():
        for channel, ids in by_channel.items():
            sets[kind][channel] = with_ids(sets[kind].get(channel), ids)
    channels = set().union(*(kind_sets.keys() for kind_sets in sets.values()))
    for channel in channels:
        exposed = sets["exposed"].get(channel, _EMPTY)
        proactive = sets["proactive"].get(channel, _EMPTY)
        writers = sets["writers"].get(channel, _EMPTY)
        reached = union((exposed, proactive))
        counts.reach[channel] = ChannelReach(
            exposed=len(exposed),
            proactive=len(proactive),
            writing=len(writers),
            reach=len(reached),
            engaged=intersection_count(reached, writers),
        )
    return counts
