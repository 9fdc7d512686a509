"""Sums of the attributions of a query window, from the business rollups, and shared helpers.

The window is split as ``chatmw.metrics.rollup_query.cover`` splits it. SQL sums the
link rows of the served slots (``rollup_conversion_links``, ``rollup_lead_links``) with
the resolved conversions of ``rollup_orders``. The link rows of the conversations that
started in the raw ranges are computed from raw rows by the functions the refresher
uses, and added where SQL has not counted the same conversion, contact or lead yet.

The contacts changed since the last refresh are read from raw rows too, because their
leads and conversions may have moved since the rows were stored. The stored rows of their
leads and of the conversions that now resolve to them are left out of the sums.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    func,
    literal_column,
    select,
)

from chatmw.metrics.conversion import DAY_MS
from chatmw.metrics.conversion_rollups import (
    LINK_WINDOW_MS,
    contact_orders,
    conversion_links,
)
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.scope import UNKNOWN_GROUP
from chatmw.metrics.sql import joined_sum, split_sum
from chatmw.metrics.started_query import add_conversations
from chatmw.store.models import Conversation
from chatmw.store.models_rollups import (
    RollupConversionLinks,
    RollupLeadLinks,
    RollupOrders,
)

__all__ = [
    "QueryWindow",
    "ConversionSums",
    "serves_days",
    "serves_filter",
    "query_window",
    "rolled_conversions",
    "conversions_in",
    "id_chunks",
    "raw_targets",
    "stored_contact_filter",
    "link_group",
    "link_key",
    "link_conditions",
    "raw_links",
    "served_pairs",
    "MAX_CHANGED_CONTACTS",
]

# Ids bound per statement, below SQLite's default limit of 32,766 bound parameters.
_IDS = 5_000
# With more contacts changed since the last refresh than this, queries read raw rows only,
# because each changed contact's rows are left out of the sums by id.
MAX_CHANGED_CONTACTS = 2_000

Links = RollupConversionLinks
LeadLinks = RollupLeadLinks
Orders = RollupOrders


def serves_days(days: float) -> bool:
    """Return whether the link rows hold attributions for ``days``."""
    return int(days * DAY_MS) == LINK_WINDOW_MS


def serves_filter(flt: MetricFilter, group_kinds: Iterable[str | None] = (None, "channel")) -> bool:
    """Return whether rollups serve ``flt``: no attribute or touch filter, a grouping they keep."""
    if flt.attributes or flt.touch_filters:
        return False
    return (None if flt.group_by is None else flt.group_by.kind) in set(group_kinds)


def id_chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    ordered = sorted(set(values))
    for first in range(0, len(ordered), _IDS):
        yield ordered[first : first + _IDS]


@dataclass(slots=True)
class QueryWindow:
    """The coverage of a query and the rows changed since the last refresh."""

    coverage: Coverage
    changed: set[int]
    # Conversions that resolve to a changed contact now: conversion id -> raw order row.
    moved: dict[int, dict[str, Any]]


def query_window(connection: Connection, flt: MetricFilter) -> QueryWindow | None:
    # Start slots are counted in UTC, and the callers check groupings and touch filters.
    plain = dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None, touch_filters={})
    coverage = cover(connection, plain)
    if coverage is None:
        return None
    changed = coverage.contacts
    if len(changed) > MAX_CHANGED_CONTACTS:
        return None
    moved = {row["conversion_id"]: row for row in contact_orders(connection, changed)}
    return QueryWindow(coverage, changed, moved)


def raw_targets(flt: MetricFilter, coverage: Coverage) -> ColumnElement[bool]:
    return and_(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )


def stored_contact_filter(window: QueryWindow) -> list[ColumnElement[bool]]:
    conditions = []
    if window.changed:
        conditions.append(Orders.contact_id.not_in(sorted(window.changed)))
    if window.moved:
        conditions.append(Orders.conversion_id.not_in(sorted(window.moved)))
    return conditions


# Conversions


def _campaign_column(flt: MetricFilter) -> Any:
    return Links.first_campaign if flt.touch == "first" else Links.last_campaign


def link_group(flt: MetricFilter) -> Any:
    """Return the SQL group key of link rows, or None without grouping."""
    if flt.group_by is None:
        return None
    if flt.group_by.kind == "channel":
        return Links.channel
    # Keyed by label, so that a campaign named "(none)" and no campaign are one group, as
    # the cpa metric groups them.
    return func.coalesce(_campaign_column(flt), UNKNOWN_GROUP)


def link_key(flt: MetricFilter, link: dict[str, Any]) -> Any:
    if flt.group_by is None:
        return None
    if flt.group_by.kind == "channel":
        return link["channel"]
    campaign = link["first_campaign" if flt.touch == "first" else "last_campaign"]
    return UNKNOWN_GROUP if campaign is None else campaign


def link_conditions(flt: MetricFilter, coverage: Coverage) -> list[ColumnElement[bool]]:
    conditions = [
        *coverage.served_conditions(Links.start_slot_ms),
        *channel_condition(Links.channel, flt),
    ]
    campaign = flt.touch_filters.get("campaign")
    if campaign is not None:
        conditions.append(_campaign_column(flt) == campaign)
    return conditions


def raw_links(
    connection: Connection, flt: MetricFilter, coverage: Coverage
) -> list[dict[str, Any]]:
    if not coverage.raw:
        return []
    links = conversion_links(connection, raw_targets(flt, coverage))
    campaign = flt.touch_filters.get("campaign")
    if campaign is None:
        return links
    column = "first_campaign" if flt.touch == "first" else "last_campaign"
    return [link for link in links if link[column] == campaign]


def served_pairs(
    connection: Connection, flt: MetricFilter, coverage: Coverage, conversion_ids: Iterable[int]
) -> set[tuple[Any, int]]:
    """Return (group key, conversion id) of the served link rows of ``conversion_ids``."""
    group = link_group(flt)
    key = group if group is not None else literal_column("NULL")
    pairs: set[tuple[Any, int]] = set()
    for chunk in id_chunks(conversion_ids):
        statement = (
            select(key, Links.conversion_id)
            .where(*link_conditions(flt, coverage), Links.conversion_id.in_(chunk))
            .distinct()
        )
        pairs.update((row[0], row[1]) for row in connection.execute(statement))
    return pairs


@dataclass(slots=True)
class ConversionSums:
    """Attributions summed per group key.

    ``names`` maps each group key to conversion name -> [conversions, revenue in micros],
    each conversion counted once per group; ``overall`` counts each conversion once.
    """

    conversations: dict[Any, int] = field(default_factory=dict)
    converted: dict[Any, int] = field(default_factory=lambda: defaultdict(int))
    names: dict[Any, dict[str, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    overall: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


def _served_conversion_sums(
    connection: Connection, flt: MetricFilter, coverage: Coverage, sums: ConversionSums
) -> None:
    conditions = link_conditions(flt, coverage)
    group = link_group(flt)
    # PostgreSQL rejects a constant in GROUP BY, so an ungrouped query selects NULL only.
    grouped = [] if group is None else [group]
    key = literal_column("NULL") if group is None else group
    statement = (
        select(
            key,
            Links.by_user,
            Links.name,
            func.count(),
            *split_sum(Links.value_micros),
            func.sum(Links.first_link),
        )
        .where(*conditions)
        .group_by(*grouped, Links.by_user, Links.name)
    )
    by_user = False
    for group_key, user_only, name, count, high, low, firsts in connection.execute(statement):
        sums.converted[group_key] += int(firsts)
        if user_only:
            by_user = True
            continue
        # A conversion that names a conversation has one row, so rows count conversions.
        for figures in (sums.names[group_key][name], sums.overall[name]):
            figures[0] += int(count)
            figures[1] += joined_sum(high, low)
    if by_user:
        _served_user_conversions(connection, conditions, group, sums)


def _served_user_conversions(
    connection: Connection, conditions: list[Any], group: Any, sums: ConversionSums
) -> None:
    """Add the conversions naming only a user, each once per group and once overall."""
    # Each conversion has one name and one value, so distinct rows count it once.
    user_rows = [*conditions, Links.by_user == 1]
    for grouped in [False, True] if group is not None else [False]:
        keys = [group.label("group_key")] if grouped else []
        columns = [Links.conversion_id, Links.name, Links.value_micros]
        inner = select(*keys, *columns).where(*user_rows).distinct().subquery()
        outer_keys = [inner.c.group_key] if grouped else []
        statement = select(
            *outer_keys, inner.c.name, func.count(), *split_sum(inner.c.value_micros)
        ).group_by(*outer_keys, inner.c.name)
        for row in connection.execute(statement):
            *key, name, count, high, low = row
            micros = joined_sum(high, low)
            targets = [sums.names[key[0]][name]] if grouped else [sums.overall[name]]
            if group is None:
                targets.append(sums.names[None][name])
            for figures in targets:
                figures[0] += int(count)
                figures[1] += int(micros)


def _add_raw_conversions(
    connection: Connection, flt: MetricFilter, coverage: Coverage, sums: ConversionSums
) -> None:
    links = raw_links(connection, flt, coverage)
    if not links:
        return
    served = served_pairs(connection, flt, coverage, (link["conversion_id"] for link in links))
    counted_pairs = set(served)
    counted = {conversion_id for _, conversion_id in served}
    conversations: dict[Any, set[int]] = defaultdict(set)
    for link in links:
        key = link_key(flt, link)
        conversion_id = link["conversion_id"]
        # Conversations of the raw ranges are never in the served slots.
        conversations[key].add(link["conversation_id"])
        if (key, conversion_id) not in counted_pairs:
            counted_pairs.add((key, conversion_id))
            figures = sums.names[key][link["name"]]
            figures[0] += 1
            figures[1] += link["value_micros"]
        if conversion_id not in counted:
            counted.add(conversion_id)
            figures = sums.overall[link["name"]]
            figures[0] += 1
            figures[1] += link["value_micros"]
    for key, ids in conversations.items():
        sums.converted[key] += len(ids)


def rolled_conversions(
    engine: Engine, flt: MetricFilter, counts: bool = True
) -> ConversionSums | None:
    """Return the attributions to the conversations of ``flt`` summed per group, or None.

    None means that rollups do not apply (see ``chatmw.metrics.rollup_query.cover``). The
    caller checks that rollups serve the filter and the attribution window
    (:func:`serves_filter`, :func:`serves_days`). Groups are the channel or the campaign
    of the conversation's touch (by label). Without ``counts`` no conversation is counted.
    """
    with engine.connect() as connection:
        coverage = cover(
            connection,
            dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None, touch_filters={}),
        )
        if coverage is None:
            return None
        return conversions_in(connection, flt, coverage, counts)


def conversions_in(
    connection: Connection, flt: MetricFilter, coverage: Coverage, counts: bool = True
) -> ConversionSums:
    """Return the attributions to the conversations that started in the window of ``coverage``.

    ``coverage`` must come from ``cover`` on ``flt`` in UTC, without its grouping and touch
    filters. The sums are those of :func:`rolled_conversions`.
    """
    sums = ConversionSums()
    if counts:
        totals: dict[Any, dict[str, int]] = {}
        add_conversations(connection, flt, coverage, totals)
        sums.conversations = {key: group["conversations"] for key, group in totals.items()}
    _served_conversion_sums(connection, flt, coverage, sums)
    _add_raw_conversions(connection, flt, coverage, sums)
    return sums
