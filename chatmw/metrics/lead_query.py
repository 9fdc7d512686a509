"""The ``leads`` metric's sums of a query window, from the business rollups.

SQL sums the served lead rows per group and source, and tests each lead's conversion
with ``rollup_orders``. Leads of the raw ranges and of the contacts changed since the
last refresh are computed from raw rows and added (see ``chatmw.metrics.business_query``).
Score sums are float sums in another order than the raw path's ``math.fsum``, so an
average score can differ in the 2nd decimal only when it lies within about 1e-12 of a
rounding boundary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

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

from chatmw.metrics.business_query import (
    QueryWindow,
    id_chunks,
    query_window,
    raw_targets,
    stored_contact_filter,
)
from chatmw.metrics.conversion_rollups import (
    contact_leads,
    lead_links,
)
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import channel_condition
from chatmw.store.models import Conversation
from chatmw.store.models_business import Lead
from chatmw.store.models_rollups import RollupLeadLinks, RollupOrders

__all__ = ["LeadSums", "rolled_leads"]

LeadLinks = RollupLeadLinks
Orders = RollupOrders


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


def _lead_source(flt: MetricFilter) -> Any:
    return LeadLinks.first_source if flt.touch == "first" else LeadLinks.last_source


def _lead_conditions(flt: MetricFilter, window: QueryWindow, moved: set[int]) -> list[Any]:
    conditions = [
        *window.coverage.served_conditions(LeadLinks.start_slot_ms),
        *channel_condition(LeadLinks.channel, flt),
    ]
    if moved:
        conditions.append(LeadLinks.lead_id.not_in(sorted(moved)))
    return conditions


def _converted_lead(window: QueryWindow) -> ColumnElement[bool]:
    """Return SQL true when the lead's user has a conversion at or after the lead."""
    return exists().where(
        Orders.contact_id == LeadLinks.contact_id,
        Orders.occurred_at_ms >= LeadLinks.occurred_at_ms,
        *stored_contact_filter(window),
    )


def _served_lead_sums(
    connection: Connection, flt: MetricFilter, window: QueryWindow, moved: set[int]
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

    # Distinct users are counted per split, because a user can have leads in several groups.
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
    connection: Connection, flt: MetricFilter, window: QueryWindow, moved: set[int]
) -> list[dict[str, Any]]:
    """Return the lead rows that the served sums leave out, one per lead."""
    coverage = window.coverage
    rows: dict[int, dict[str, Any]] = {}
    if coverage.raw:
        for row in lead_links(connection, raw_targets(flt, coverage)):
            rows[row["lead_id"]] = row
    if moved:
        in_window = and_(
            Conversation.started_at_ms >= coverage.since_ms,
            Conversation.started_at_ms < coverage.until_ms,
            *channel_condition(Conversation.channel, flt),
        )
        for chunk in id_chunks(moved):
            for row in lead_links(connection, in_window, Lead.id.in_(chunk)):
                rows[row["lead_id"]] = row
    return list(rows.values())


def _latest_conversions(
    connection: Connection, contacts: set[int], window: QueryWindow
) -> dict[int, int]:
    orders: dict[int, int] = {}
    for chunk in id_chunks(contacts - window.changed):
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
    connection: Connection,
    flt: MetricFilter,
    window: QueryWindow,
    moved: set[int],
    contacts: set[int],
) -> set[tuple[Any, Any, int]]:
    group = LeadLinks.channel if flt.group_by is not None else literal_column("NULL")
    found: set[tuple[Any, Any, int]] = set()
    for chunk in id_chunks(contacts):
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
    window: QueryWindow,
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
        window = query_window(connection, flt)
        if window is None:
            return None
        moved = contact_leads(connection, window.changed) if window.changed else set()
        splits = _served_lead_sums(connection, flt, window, moved)
        _add_raw_leads(connection, flt, window, moved, splits)
    return splits
