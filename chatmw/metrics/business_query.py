"""Sums of attributions, customers and leads of a query window, from the business rollups.

The window is split as ``chatmw.metrics.rollup_query.cover`` splits it. SQL sums the
link rows of the served slots (``rollup_conversion_links``, ``rollup_lead_links``) with
the resolved conversions of ``rollup_orders``. The link rows of the conversations that
started in the raw ranges are computed from raw rows by the functions the refresher
uses, and added where SQL has not counted the same conversion, contact or lead yet.

The contacts changed since the last refresh are read from raw rows too, because their
leads and conversions may have moved since the rows were stored: stored rows of their
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
    case,
    exists,
    func,
    literal_column,
    select,
)
from sqlalchemy.orm import aliased

from chatmw.metrics.business_rollups import (
    LINK_WINDOW_MS,
    contact_leads,
    contact_orders,
    conversion_links,
    lead_links,
)
from chatmw.metrics.conversion import DAY_MS
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import Coverage, channel_condition, cover
from chatmw.metrics.rollup_refresh import time_in_ranges
from chatmw.metrics.scope import UNKNOWN_GROUP
from chatmw.metrics.started_query import add_conversations
from chatmw.store.models import Conversation
from chatmw.store.models_business import Lead
from chatmw.store.models_rollups import (
    RollupConversionLinks,
    RollupLeadLinks,
    RollupOrders,
)

__all__ = [
    "ConversionSums",
    "CustomerSums",
    "LeadSums",
    "serves_days",
    "serves_filter",
    "rolled_conversions",
    "rolled_customers",
    "rolled_leads",
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
    """Return whether rollups can serve ``flt``: no attribute or touch filter, a served grouping."""
    if flt.attributes or flt.touch_filters:
        return False
    return (None if flt.group_by is None else flt.group_by.kind) in set(group_kinds)


def _chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    ordered = sorted(set(values))
    for first in range(0, len(ordered), _IDS):
        yield ordered[first : first + _IDS]


@dataclass(slots=True)
class _Window:
    """The coverage of a query and the rows changed since the last refresh."""

    coverage: Coverage
    changed: set[int]
    # Conversions that resolve to a changed contact now: conversion id -> raw order row.
    moved: dict[int, dict[str, Any]]


def _window(connection: Connection, flt: MetricFilter) -> _Window | None:
    # Start slots are counted in UTC, and the callers check groupings and touch filters.
    plain = dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None, touch_filters={})
    coverage = cover(connection, plain)
    if coverage is None:
        return None
    changed = coverage.contacts
    if len(changed) > MAX_CHANGED_CONTACTS:
        return None
    moved = {row["conversion_id"]: row for row in contact_orders(connection, changed)}
    return _Window(coverage, changed, moved)


def _raw_targets(flt: MetricFilter, coverage: Coverage) -> ColumnElement[bool]:
    return and_(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )


# Conversions


def _campaign_column(flt: MetricFilter) -> Any:
    return Links.first_campaign if flt.touch == "first" else Links.last_campaign


def _link_group(flt: MetricFilter) -> Any:
    """Return the SQL group key of link rows, or None without grouping."""
    if flt.group_by is None:
        return None
    if flt.group_by.kind == "channel":
        return Links.channel
    # Keyed by label, so that a campaign named "(none)" and no campaign are one group, as
    # the cpa metric groups them.
    return func.coalesce(_campaign_column(flt), UNKNOWN_GROUP)


def _link_key(flt: MetricFilter, link: dict[str, Any]) -> Any:
    if flt.group_by is None:
        return None
    if flt.group_by.kind == "channel":
        return link["channel"]
    campaign = link["first_campaign" if flt.touch == "first" else "last_campaign"]
    return UNKNOWN_GROUP if campaign is None else campaign


def _link_conditions(flt: MetricFilter, coverage: Coverage) -> list[ColumnElement[bool]]:
    conditions = [
        *coverage.served_conditions(Links.start_slot_ms),
        *channel_condition(Links.channel, flt),
    ]
    campaign = flt.touch_filters.get("campaign")
    if campaign is not None:
        conditions.append(_campaign_column(flt) == campaign)
    return conditions


def _raw_links(
    connection: Connection, flt: MetricFilter, coverage: Coverage
) -> list[dict[str, Any]]:
    if not coverage.raw:
        return []
    links = conversion_links(connection, _raw_targets(flt, coverage))
    campaign = flt.touch_filters.get("campaign")
    if campaign is None:
        return links
    column = "first_campaign" if flt.touch == "first" else "last_campaign"
    return [link for link in links if link[column] == campaign]


def _served_pairs(
    connection: Connection, flt: MetricFilter, coverage: Coverage, conversion_ids: Iterable[int]
) -> set[tuple[Any, int]]:
    """Return (group key, conversion id) of the served link rows of ``conversion_ids``."""
    group = _link_group(flt)
    key = group if group is not None else literal_column("NULL")
    pairs: set[tuple[Any, int]] = set()
    for chunk in _chunks(conversion_ids):
        statement = (
            select(key, Links.conversion_id)
            .where(*_link_conditions(flt, coverage), Links.conversion_id.in_(chunk))
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
    conditions = _link_conditions(flt, coverage)
    group = _link_group(flt)
    # PostgreSQL rejects a constant in GROUP BY, so an ungrouped query selects NULL only.
    grouped = [] if group is None else [group]
    key = literal_column("NULL") if group is None else group
    statement = (
        select(
            key,
            Links.by_user,
            Links.name,
            func.count(),
            func.sum(Links.value_micros),
            func.sum(Links.first_link),
        )
        .where(*conditions)
        .group_by(*grouped, Links.by_user, Links.name)
    )
    by_user = False
    for group_key, user_only, name, count, micros, firsts in connection.execute(statement):
        sums.converted[group_key] += int(firsts)
        if user_only:
            by_user = True
            continue
        # A conversion that names a conversation has one row, so rows count conversions.
        for figures in (sums.names[group_key][name], sums.overall[name]):
            figures[0] += int(count)
            figures[1] += int(micros)
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
            *outer_keys, inner.c.name, func.count(), func.sum(inner.c.value_micros)
        ).group_by(*outer_keys, inner.c.name)
        for row in connection.execute(statement):
            *key, name, count, micros = row
            targets = [sums.names[key[0]][name]] if grouped else [sums.overall[name]]
            if group is None:
                targets.append(sums.names[None][name])
            for figures in targets:
                figures[0] += int(count)
                figures[1] += int(micros)


def _add_raw_conversions(
    connection: Connection, flt: MetricFilter, coverage: Coverage, sums: ConversionSums
) -> None:
    links = _raw_links(connection, flt, coverage)
    if not links:
        return
    served = _served_pairs(connection, flt, coverage, (link["conversion_id"] for link in links))
    counted_pairs = set(served)
    counted = {conversion_id for _, conversion_id in served}
    conversations: dict[Any, set[int]] = defaultdict(set)
    for link in links:
        key = _link_key(flt, link)
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
    sums = ConversionSums()
    with engine.connect() as connection:
        coverage = cover(
            connection,
            dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None, touch_filters={}),
        )
        if coverage is None:
            return None
        if counts:
            totals: dict[Any, dict[str, int]] = {}
            add_conversations(connection, flt, coverage, totals)
            sums.conversations = {key: group["conversations"] for key, group in totals.items()}
        _served_conversion_sums(connection, flt, coverage, sums)
        _add_raw_conversions(connection, flt, coverage, sums)
    return sums


# Customers (ltv)


@dataclass(slots=True)
class CustomerSums:
    """Customers, their orders before the end time, revenue and observed time in ms."""

    customers: int = 0
    orders: int = 0
    revenue: int = 0
    observed_ms: int = 0


def _observed(end_ms: int, first_ms: int, minimum_ms: int) -> int:
    return max(end_ms - first_ms, minimum_ms)


def _orders_of(
    connection: Connection, contacts: Iterable[int], window: _Window, end_ms: int
) -> dict[int, tuple[int, int, int]]:
    """Return (orders, micros, first time ms) before ``end_ms`` of each of ``contacts``."""
    found: dict[int, list[tuple[int, int]]] = defaultdict(list)
    wanted = set(contacts)
    for chunk in _chunks(wanted - window.changed):
        statement = select(
            Orders.contact_id, Orders.conversion_id, Orders.occurred_at_ms, Orders.value_micros
        ).where(Orders.contact_id.in_(chunk), Orders.occurred_at_ms < end_ms)
        for contact_id, conversion_id, at_ms, micros in connection.execute(statement):
            if conversion_id not in window.moved:
                found[contact_id].append((at_ms, micros))
    for row in window.moved.values():
        if row["contact_id"] in wanted and row["occurred_at_ms"] < end_ms:
            found[row["contact_id"]].append((row["occurred_at_ms"], row["value_micros"]))
    return {
        contact_id: (len(items), sum(m for _, m in items), min(at for at, _ in items))
        for contact_id, items in found.items()
    }


def _stored_contact_filter(window: _Window) -> list[ColumnElement[bool]]:
    conditions = []
    if window.changed:
        conditions.append(Orders.contact_id.not_in(sorted(window.changed)))
    if window.moved:
        conditions.append(Orders.conversion_id.not_in(sorted(window.moved)))
    return conditions


def _served_customer_sums(
    connection: Connection,
    flt: MetricFilter,
    window: _Window,
    end_ms: int,
    minimum_ms: int,
    grouped: bool,
) -> dict[Any, CustomerSums]:
    """Sum the customers of the served link rows per group key (or overall)."""
    group = _link_group(flt) if grouped else None
    keys = [] if group is None else [group.label("group_key")]
    pairs = (
        select(*keys, Orders.contact_id.label("contact_id"))
        .select_from(Links)
        .join(Orders, Orders.conversion_id == Links.conversion_id)
        .where(*_link_conditions(flt, window.coverage), *_stored_contact_filter(window))
        .distinct()
        .subquery()
    )
    placed = aliased(Orders)
    moved = [placed.conversion_id.not_in(sorted(window.moved))] if window.moved else []
    pair_keys = [pairs.c.group_key] if keys else []
    # One row per customer (and group) with the sums of their orders before end_ms.
    per_customer = (
        select(
            *pair_keys,
            func.count(placed.conversion_id).label("orders"),
            func.coalesce(func.sum(placed.value_micros), 0).label("micros"),
            func.min(placed.occurred_at_ms).label("first_ms"),
        )
        .select_from(pairs)
        .outerjoin(
            placed,
            and_(
                placed.contact_id == pairs.c.contact_id,
                placed.occurred_at_ms < end_ms,
                *moved,
            ),
        )
        .group_by(*pair_keys, pairs.c.contact_id)
        .subquery()
    )
    span = literal_column(str(int(end_ms))) - per_customer.c.first_ms
    observed = case(
        (per_customer.c.first_ms.is_(None), 0),
        (span > minimum_ms, span),
        else_=minimum_ms,
    )
    outer_keys = [per_customer.c.group_key] if keys else []
    statement = select(
        *outer_keys,
        func.count(),
        func.coalesce(func.sum(per_customer.c.orders), 0),
        func.coalesce(func.sum(per_customer.c.micros), 0),
        func.coalesce(func.sum(observed), 0),
    ).group_by(*outer_keys)
    sums: dict[Any, CustomerSums] = {}
    for row in connection.execute(statement):
        *key, customers, orders, micros, observed_ms = row
        if customers:
            sums[key[0] if key else None] = CustomerSums(
                int(customers), int(orders), int(micros), int(observed_ms)
            )
    return sums


def _extra_customers(
    connection: Connection, flt: MetricFilter, window: _Window
) -> list[tuple[Any, int]]:
    """Return (group key, contact) of customers that the served sums leave out.

    Those are the contacts of the raw link rows, and the contacts that the conversions of
    served link rows resolve to when those conversions moved to a changed contact.
    """
    coverage = window.coverage
    links = _raw_links(connection, flt, coverage)
    contact_of = _stored_contacts(connection, (link["conversion_id"] for link in links), window)
    found = [
        (_link_key(flt, link), contact_of[link["conversion_id"]])
        for link in links
        if link["conversion_id"] in contact_of
    ]
    for key, conversion_id in _served_pairs(connection, flt, coverage, window.moved):
        found.append((key, window.moved[conversion_id]["contact_id"]))
    return found


def _stored_contacts(
    connection: Connection, conversion_ids: Iterable[int], window: _Window
) -> dict[int, int]:
    """Return the contact each of ``conversion_ids`` resolves to now, where it resolves."""
    wanted = set(conversion_ids)
    found: dict[int, int] = {}
    for chunk in _chunks(wanted):
        statement = select(Orders.conversion_id, Orders.contact_id).where(
            Orders.conversion_id.in_(chunk)
        )
        for conversion_id, contact_id in connection.execute(statement):
            if contact_id not in window.changed:
                found[conversion_id] = contact_id
    for conversion_id in wanted & set(window.moved):
        found[conversion_id] = window.moved[conversion_id]["contact_id"]
    return found


def _served_customers(
    connection: Connection, flt: MetricFilter, window: _Window, contacts: Iterable[int]
) -> set[tuple[Any, int]]:
    """Return (group key, contact) of the served sums' customers among ``contacts``."""
    group = _link_group(flt)
    key = group if group is not None else literal_column("NULL")
    found: set[tuple[Any, int]] = set()
    for chunk in _chunks(contacts):
        statement = (
            select(key, Orders.contact_id)
            .select_from(Links)
            .join(Orders, Orders.conversion_id == Links.conversion_id)
            .where(
                *_link_conditions(flt, window.coverage),
                *_stored_contact_filter(window),
                Orders.contact_id.in_(chunk),
            )
            .distinct()
        )
        found.update((row[0], row[1]) for row in connection.execute(statement))
    return found


def rolled_customers(
    engine: Engine, flt: MetricFilter, end_ms: int, minimum_ms: int
) -> tuple[dict[Any, CustomerSums], CustomerSums] | None:
    """Return the ``ltv`` sums per group key and overall, or None where rollups do not apply.

    Customers are the contacts of the conversions attributed to the window's
    conversations. Orders are all their conversions before ``end_ms``; each customer is
    observed from the first of them to ``end_ms``, at least ``minimum_ms``.
    """
    with engine.connect() as connection:
        window = _window(connection, flt)
        if window is None:
            return None
        groups: dict[Any, CustomerSums] = {}
        if flt.group_by is not None:
            groups = _served_customer_sums(connection, flt, window, end_ms, minimum_ms, True)
        overall = _served_customer_sums(connection, flt, window, end_ms, minimum_ms, False)
        extra = _extra_customers(connection, flt, window)
        if extra:
            contacts = {contact_id for _, contact_id in extra}
            served = _served_customers(connection, flt, window, contacts)
            served_contacts = {contact_id for _, contact_id in served}
            orders = _orders_of(connection, contacts, window, end_ms)
            for key, contact_id in set(extra) - served:
                _add_customer(
                    groups.setdefault(key, CustomerSums()),
                    orders.get(contact_id),
                    end_ms,
                    minimum_ms,
                )
            total = overall.setdefault(None, CustomerSums())
            for contact_id in contacts - served_contacts:
                _add_customer(total, orders.get(contact_id), end_ms, minimum_ms)
    if flt.group_by is None:
        groups.clear()
    return groups, overall.get(None, CustomerSums())


def _add_customer(
    sums: CustomerSums, orders: tuple[int, int, int] | None, end_ms: int, minimum_ms: int
) -> None:
    sums.customers += 1
    if orders is None:
        return
    count, micros, first_ms = orders
    sums.orders += count
    sums.revenue += micros
    sums.observed_ms += _observed(end_ms, first_ms, minimum_ms)


# Leads


@dataclass(slots=True)
class LeadSums:
    """Lead figures of one group: counts, distinct users, kinds, origins, scores."""

    leads: int = 0
    users: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    origins: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    converted: int = 0
    scored: int = 0
    score_sum: float = 0.0


_LEAD_FIELDS = ("lead_id", "channel", "contact_id", "kind", "origin", "score", "occurred_at_ms")


def _lead_source(flt: MetricFilter) -> Any:
    return LeadLinks.first_source if flt.touch == "first" else LeadLinks.last_source


def _lead_conditions(flt: MetricFilter, window: _Window, moved: set[int]) -> list[Any]:
    conditions = [
        *window.coverage.served_conditions(LeadLinks.start_slot_ms),
        *channel_condition(LeadLinks.channel, flt),
    ]
    if moved:
        conditions.append(LeadLinks.lead_id.not_in(sorted(moved)))
    return conditions


def _converted_lead(window: _Window) -> ColumnElement[bool]:
    """Return SQL true when the lead's user has a conversion at or after the lead."""
    return exists().where(
        Orders.contact_id == LeadLinks.contact_id,
        Orders.occurred_at_ms >= LeadLinks.occurred_at_ms,
        *_stored_contact_filter(window),
    )


def _served_lead_sums(
    connection: Connection, flt: MetricFilter, window: _Window, moved: set[int]
) -> dict[str, dict[Any, LeadSums]]:
    """Return the lead sums of the served rows by split (``groups``, ``by_source``, ``all``)."""
    conditions = _lead_conditions(flt, window, moved)
    group = LeadLinks.channel if flt.group_by is not None else literal_column("NULL")
    # PostgreSQL rejects a constant in GROUP BY.
    grouped = [LeadLinks.channel] if flt.group_by is not None else []
    source = _lead_source(flt)
    splits: dict[str, dict[Any, LeadSums]] = {"groups": {}, "by_source": {}, "all": {}}
    statement = (
        select(
            group,
            source,
            LeadLinks.kind,
            LeadLinks.origin,
            func.count(),
            func.sum(case((_converted_lead(window), 1), else_=0)),
            func.count(LeadLinks.score),
            func.sum(LeadLinks.score),
        )
        .where(*conditions)
        .group_by(*grouped, source, LeadLinks.kind, LeadLinks.origin)
    )
    for key, source_key, kind, origin, count, converted, scored, score_sum in connection.execute(
        statement
    ):
        for split, split_key in (("groups", key), ("by_source", source_key), ("all", None)):
            sums = splits[split].setdefault(split_key, LeadSums())
            sums.leads += int(count)
            sums.kinds[kind] += int(count)
            sums.origins[origin] += int(count)
            sums.converted += int(converted or 0)
            sums.scored += int(scored)
            sums.score_sum += float(score_sum or 0.0)
    user_splits: list[tuple[str, Any]] = [("by_source", source), ("all", None)]
    if grouped:
        user_splits.append(("groups", grouped[0]))
    for split, column in user_splits:
        keys = [] if column is None else [column]
        users = select(*keys, func.count(func.distinct(LeadLinks.contact_id))).where(*conditions)
        if keys:
            users = users.group_by(column)
        for *key, count in connection.execute(users):
            split_key = key[0] if key else None
            if split_key in splits[split]:
                splits[split][split_key].users += int(count)
    return splits


def _raw_leads(
    connection: Connection, flt: MetricFilter, window: _Window, moved: set[int]
) -> list[dict[str, Any]]:
    """Return the lead rows that the served sums leave out, one per lead."""
    coverage = window.coverage
    rows: dict[int, dict[str, Any]] = {}
    if coverage.raw:
        for row in lead_links(connection, _raw_targets(flt, coverage)):
            rows[row["lead_id"]] = row
    if moved:
        in_window = and_(
            Conversation.started_at_ms >= coverage.since_ms,
            Conversation.started_at_ms < coverage.until_ms,
            *channel_condition(Conversation.channel, flt),
        )
        for chunk in _chunks(moved):
            for row in lead_links(connection, in_window, Lead.id.in_(chunk)):
                rows[row["lead_id"]] = row
    return list(rows.values())


def _latest_conversions(
    connection: Connection, contacts: set[int], window: _Window
) -> dict[int, int]:
    orders: dict[int, int] = {}
    for chunk in _chunks(contacts - window.changed):
        statement = select(Orders.contact_id, Orders.conversion_id, Orders.occurred_at_ms).where(
            Orders.contact_id.in_(chunk)
        )
        for contact_id, conversion_id, at_ms in connection.execute(statement):
            if conversion_id not in window.moved:
                orders[contact_id] = max(orders.get(contact_id, at_ms), at_ms)
    for row in window.moved.values():
        contact_id = row["contact_id"]
        if contact_id in contacts:
            orders[contact_id] = max(
                orders.get(contact_id, row["occurred_at_ms"]), row["occurred_at_ms"]
            )
    return orders


def _served_lead_users(
    connection: Connection, flt: MetricFilter, window: _Window, moved: set[int], contacts: set[int]
) -> set[tuple[Any, Any, int]]:
    group = LeadLinks.channel if flt.group_by is not None else literal_column("NULL")
    found: set[tuple[Any, Any, int]] = set()
    for chunk in _chunks(contacts):
        statement = (
            select(group, _lead_source(flt), LeadLinks.contact_id)
            .where(*_lead_conditions(flt, window, moved), LeadLinks.contact_id.in_(chunk))
            .distinct()
        )
        found.update((row[0], row[1], row[2]) for row in connection.execute(statement))
    return found


def _add_raw_leads(
    connection: Connection,
    flt: MetricFilter,
    window: _Window,
    moved: set[int],
    splits: dict[str, dict[Any, LeadSums]],
) -> None:
    rows = _raw_leads(connection, flt, window, moved)
    if not rows:
        return
    contacts = {row["contact_id"] for row in rows if row["contact_id"] is not None}
    latest = _latest_conversions(connection, contacts, window)
    served = _served_lead_users(connection, flt, window, moved, contacts)
    seen = {
        "groups": {(key, contact) for key, _, contact in served},
        "by_source": {(source, contact) for _, source, contact in served},
        "all": {(None, contact) for _, _, contact in served},
    }
    source_column = "first_source" if flt.touch == "first" else "last_source"
    for row in rows:
        keys = {
            "groups": row["channel"] if flt.group_by is not None else None,
            "by_source": row[source_column],
            "all": None,
        }
        contact_id = row["contact_id"]
        converted = contact_id is not None and latest.get(contact_id, -1) >= row["occurred_at_ms"]
        for split, key in keys.items():
            sums = splits[split].setdefault(key, LeadSums())
            sums.leads += 1
            sums.kinds[row["kind"]] += 1
            sums.origins[row["origin"]] += 1
            sums.converted += converted
            if row["score"] is not None:
                sums.scored += 1
                sums.score_sum += row["score"]
            if contact_id is not None and (key, contact_id) not in seen[split]:
                seen[split].add((key, contact_id))
                sums.users += 1


def rolled_leads(engine: Engine, flt: MetricFilter) -> dict[str, dict[Any, LeadSums]] | None:
    """Return the lead sums by split (``groups``, ``by_source``, ``all``), or None.

    ``groups`` is keyed by channel with ``group_by=channel`` and by None without grouping;
    ``by_source`` by the source of the conversation's touch; ``all`` has one key, None.
    The caller checks that rollups serve the filter (:func:`serves_filter`).
    """
    with engine.connect() as connection:
        window = _window(connection, flt)
        if window is None:
            return None
        moved = contact_leads(connection, window.changed) if window.changed else set()
        splits = _served_lead_sums(connection, flt, window, moved)
        _add_raw_leads(connection, flt, window, moved, splits)
    return splits
