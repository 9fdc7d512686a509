"""The ``ltv`` metric's customers and orders of a query window, from the business rollups.

Customers are the contacts that ``rollup_orders`` resolves the attributed conversions to,
and SQL sums each customer's orders once per group. Customers of the raw link rows and of
conversions that moved to a changed contact are added in Python where SQL has not
counted them yet (see ``chatmw.metrics.business_query``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    func,
    literal_column,
    select,
)
from sqlalchemy.orm import aliased

from chatmw.metrics.business_query import (
    QueryWindow,
    id_chunks,
    link_conditions,
    link_group,
    link_key,
    query_window,
    raw_links,
    served_pairs,
    stored_contact_filter,
)
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.sql import joined_sum, split_sum
from chatmw.store.models_rollups import RollupConversionLinks, RollupOrders

__all__ = ["CustomerSums", "rolled_customers"]

Links = RollupConversionLinks
Orders = RollupOrders


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
    connection: Connection, contacts: Iterable[int], window: QueryWindow, end_ms: int
) -> dict[int, tuple[int, int, int]]:
    """Return (orders, micros, first time ms) before ``end_ms`` of each of ``contacts``."""
    found: dict[int, list[tuple[int, int]]] = defaultdict(list)
    requested = set(contacts)
    for chunk in id_chunks(requested - window.changed):
        statement = select(
            Orders.contact_id, Orders.conversion_id, Orders.occurred_at_ms, Orders.value_micros
        ).where(Orders.contact_id.in_(chunk), Orders.occurred_at_ms < end_ms)
        for contact_id, conversion_id, at_ms, micros in connection.execute(statement):
            if conversion_id not in window.moved:
                found[contact_id].append((at_ms, micros))
    for row in window.moved.values():
        if row["contact_id"] in requested and row["occurred_at_ms"] < end_ms:
            found[row["contact_id"]].append((row["occurred_at_ms"], row["value_micros"]))
    return {
        contact_id: (len(items), sum(m for _, m in items), min(at for at, _ in items))
        for contact_id, items in found.items()
    }


def _served_customer_sums(
    connection: Connection,
    flt: MetricFilter,
    window: QueryWindow,
    end_ms: int,
    minimum_ms: int,
    grouped: bool,
) -> dict[Any, CustomerSums]:
    """Sum the customers of the served link rows per group key (or overall)."""
    group = link_group(flt) if grouped else None
    keys = [] if group is None else [group.label("group_key")]
    pairs = (
        select(*keys, Orders.contact_id.label("contact_id"))
        .select_from(Links)
        .join(Orders, Orders.conversion_id == Links.conversion_id)
        .where(*link_conditions(flt, window.coverage), *stored_contact_filter(window))
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
            *(part.label(label) for part, label in zip(split_sum(placed.value_micros),
                                                       ("micros_high", "micros_low"), strict=True)),
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
        func.coalesce(func.sum(per_customer.c.micros_high), 0),
        func.coalesce(func.sum(per_customer.c.micros_low), 0),
        func.coalesce(func.sum(observed), 0),
    ).group_by(*outer_keys)

    sums: dict[Any, CustomerSums] = {}
    for row in connection.execute(statement):
        *key, customers, orders, high, low, observed_ms = row
        if customers:
            sums[key[0] if key else None] = CustomerSums(
                int(customers), int(orders), joined_sum(high, low), int(observed_ms)
            )
    return sums


def _extra_customers(
    connection: Connection, flt: MetricFilter, window: QueryWindow
) -> list[tuple[Any, int]]:
    """Return (group key, contact) of customers that the served sums leave out.

    Those are the contacts of the raw link rows, and the contacts that the conversions of
    served link rows resolve to when those conversions moved to a changed contact.
    """
    coverage = window.coverage
    links = raw_links(connection, flt, coverage)
    contact_of = _stored_contacts(connection, (link["conversion_id"] for link in links), window)
    found = [
        (link_key(flt, link), contact_of[link["conversion_id"]])
        for link in links
        if link["conversion_id"] in contact_of
    ]
    for key, conversion_id in served_pairs(connection, flt, coverage, window.moved):
        found.append((key, window.moved[conversion_id]["contact_id"]))
    return found


def _stored_contacts(
    connection: Connection, conversion_ids: Iterable[int], window: QueryWindow
) -> dict[int, int]:
    """Return the contact each of ``conversion_ids`` resolves to now, where it resolves."""
    requested = set(conversion_ids)
    found: dict[int, int] = {}
    for chunk in id_chunks(requested):
        statement = select(Orders.conversion_id, Orders.contact_id).where(
            Orders.conversion_id.in_(chunk)
        )
        for conversion_id, contact_id in connection.execute(statement):
            if contact_id not in window.changed:
                found[conversion_id] = contact_id
    for conversion_id in requested & set(window.moved):
        found[conversion_id] = window.moved[conversion_id]["contact_id"]
    return found


def _served_customers(
    connection: Connection, flt: MetricFilter, window: QueryWindow, contacts: Iterable[int]
) -> set[tuple[Any, int]]:
    """Return (group key, contact) of the served sums' customers among ``contacts``."""
    group = link_group(flt)
    key = group if group is not None else literal_column("NULL")
    found: set[tuple[Any, int]] = set()
    for chunk in id_chunks(contacts):
        statement = (
            select(key, Orders.contact_id)
            .select_from(Links)
            .join(Orders, Orders.conversion_id == Links.conversion_id)
            .where(
                *link_conditions(flt, window.coverage),
                *stored_contact_filter(window),
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
        window = query_window(connection, flt)
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
