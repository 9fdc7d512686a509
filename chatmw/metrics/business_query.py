"""Attributions, leads and orders of a query window, from the business rollups.

The window is split as ``chatmw.metrics.rollup_query.cover`` splits it. Link rows of the
served slots come from ``rollup_conversion_links`` and ``rollup_lead_links``, and those
of the conversations that started in the raw ranges are computed from raw rows by the
functions the refresher uses. The contacts changed since the last refresh are read from
raw rows too: their leads and orders may have moved since the rows were stored.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, and_, select

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
from chatmw.metrics.rollup_refresh import changes_after, time_in_ranges
from chatmw.metrics.started_query import add_conversations
from chatmw.store.models import Conversation
from chatmw.store.models_business import Lead
from chatmw.store.models_rollups import (
    RollupConversionLinks,
    RollupLeadLinks,
    RollupOrders,
    RollupState,
)

__all__ = [
    "Link",
    "LeadLink",
    "serves_days",
    "serves_filter",
    "rolled_conversions",
    "rolled_customers",
    "rolled_leads",
]

# Ids bound per statement, below SQLite's default limit of 32,766 bound parameters.
_IDS = 5_000


@dataclass(frozen=True, slots=True)
class Link:
    """One attribution of a conversion to a conversation of the window."""

    group_key: Any
    conversation_id: int
    conversion_id: int
    name: str
    value_micros: int


@dataclass(frozen=True, slots=True)
class LeadLink:
    """A lead that counts for a conversation of the window, with its group and source."""

    group_key: Any
    source: Any
    lead_id: int
    kind: str
    origin: str
    score: float | None
    occurred_at_ms: int
    contact_id: int | None


def serves_days(days: float) -> bool:
    """Return whether the link rows hold attributions for ``days``."""
    return int(days * DAY_MS) == LINK_WINDOW_MS


def serves_filter(flt: MetricFilter, group_kinds: Iterable[str | None] = (None, "channel")) -> bool:
    """Return whether rollups can serve ``flt``: no attribute or touch filter, a served grouping."""
    if flt.attributes or flt.touch_filters:
        return False
    return (None if flt.group_by is None else flt.group_by.kind) in set(group_kinds)


def _coverage(connection: Connection, flt: MetricFilter) -> Coverage | None:
    # Start slots are counted in UTC, and the callers check groupings and touch filters.
    plain = dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None, touch_filters={})
    return cover(connection, plain)


def _changed_contacts(connection: Connection) -> set[int]:
    watermark, conversations = connection.execute(
        select(RollupState.watermark_id, RollupState.conversation_watermark_id).where(
            RollupState.id == 1
        )
    ).one()
    return changes_after(connection, int(watermark), None, int(conversations)).contacts


def _raw_targets(flt: MetricFilter, coverage: Coverage) -> Any:
    return and_(
        time_in_ranges(Conversation.started_at_ms, coverage.raw),
        *channel_condition(Conversation.channel, flt),
    )


def _link_key(flt: MetricFilter, channel: str, first: str | None, last: str | None) -> Any:
    if flt.group_by is None:
        return None
    if flt.group_by.kind == "channel":
        return channel
    return first if flt.touch == "first" else last


def _links(connection: Connection, flt: MetricFilter, coverage: Coverage) -> list[Link]:
    columns = [
        RollupConversionLinks.conversion_id,
        RollupConversionLinks.conversation_id,
        RollupConversionLinks.channel,
        RollupConversionLinks.value_micros,
        RollupConversionLinks.name,
        RollupConversionLinks.first_campaign,
        RollupConversionLinks.last_campaign,
    ]
    served = select(*columns).where(
        *coverage.served_conditions(RollupConversionLinks.start_slot_ms),
        *channel_condition(RollupConversionLinks.channel, flt),
    )
    rows = [tuple(row) for row in connection.execute(served)]
    if coverage.raw:
        rows.extend(
            (
                link["conversion_id"],
                link["conversation_id"],
                link["channel"],
                link["value_micros"],
                link["name"],
                link["first_campaign"],
                link["last_campaign"],
            )
            for link in conversion_links(connection, _raw_targets(flt, coverage))
        )
    campaign = flt.touch_filters.get("campaign")
    links = []
    for conversion_id, conversation_id, channel, micros, name, first, last in rows:
        if campaign is not None and (first if flt.touch == "first" else last) != campaign:
            continue
        links.append(
            Link(_link_key(flt, channel, first, last), conversation_id, conversion_id, name, micros)
        )
    return links


def rolled_conversions(
    engine: Engine, flt: MetricFilter, counts: bool = True
) -> tuple[dict[Any, int], list[Link]] | None:
    """Return conversations per group key and the attributions, or None without rollups.

    The caller checks that rollups serve the filter and the attribution window
    (:func:`serves_filter`, :func:`serves_days`); groups are the channel or the campaign
    of the conversation's touch. Without ``counts`` no conversation is counted.
    """
    with engine.connect() as connection:
        coverage = _coverage(connection, flt)
        if coverage is None:
            return None
        totals: dict[Any, dict[str, int]] = {}
        if counts:
            add_conversations(connection, flt, coverage, totals)
        links = _links(connection, flt, coverage)
    return {key: group["conversations"] for key, group in totals.items()}, links


def _orders(
    connection: Connection, contacts: Iterable[int], changed: set[int]
) -> dict[int, list[tuple[int, int, int]]]:
    """Return ``(conversion id, time ms, micros)`` of the conversions of each of ``contacts``.

    Conversions of the ``changed`` contacts are resolved from raw rows, because their
    stored rows can name the contact they resolved to before the change.
    """
    moved = contact_orders(connection, changed) if changed else []
    moved_ids = {row["conversion_id"] for row in moved}
    wanted = set(contacts)
    orders: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for chunk in _chunks(sorted(wanted - changed)):
        statement = select(
            RollupOrders.contact_id,
            RollupOrders.conversion_id,
            RollupOrders.occurred_at_ms,
            RollupOrders.value_micros,
        ).where(RollupOrders.contact_id.in_(chunk))
        for contact_id, conversion_id, at_ms, micros in connection.execute(statement):
            if conversion_id not in moved_ids:
                orders[contact_id].append((conversion_id, at_ms, micros))
    for row in moved:
        if row["contact_id"] in wanted:
            orders[row["contact_id"]].append(
                (row["conversion_id"], row["occurred_at_ms"], row["value_micros"])
            )
    return orders


def _chunks(values: list[Any]) -> Iterable[list[Any]]:
    for first in range(0, len(values), _IDS):
        yield values[first : first + _IDS]


def _contacts_of(
    connection: Connection, conversion_ids: Iterable[int], changed: set[int]
) -> dict[int, int]:
    """Return the contact each of ``conversion_ids`` resolves to, where it resolves to one."""
    moved = {row["conversion_id"]: row["contact_id"] for row in contact_orders(connection, changed)}
    wanted = set(conversion_ids)
    found: dict[int, int] = {}
    for chunk in _chunks(sorted(wanted)):
        statement = select(RollupOrders.conversion_id, RollupOrders.contact_id).where(
            RollupOrders.conversion_id.in_(chunk)
        )
        for conversion_id, contact_id in connection.execute(statement):
            if contact_id not in changed:
                found[conversion_id] = contact_id
    for conversion_id in wanted:
        if conversion_id in moved:
            found[conversion_id] = moved[conversion_id]
    return found


def rolled_customers(
    engine: Engine, flt: MetricFilter
) -> tuple[dict[Any, set[int]], dict[int, list[tuple[int, int]]]] | None:
    """Return the customers per group key and their orders ``(time ms, micros)``, or None.

    Customers are the contacts of the conversions attributed to the window's
    conversations; orders are all their conversions, as the ``ltv`` metric defines them.
    """
    with engine.connect() as connection:
        coverage = _coverage(connection, flt)
        if coverage is None:
            return None
        links = _links(connection, flt, coverage)
        changed = _changed_contacts(connection)
        contact_of = _contacts_of(connection, (link.conversion_id for link in links), changed)
        customers: dict[Any, set[int]] = defaultdict(set)
        for link in links:
            contact_id = contact_of.get(link.conversion_id)
            if contact_id is not None:
                customers[link.group_key].add(contact_id)
        everyone = set().union(*customers.values()) if customers else set()
        orders = _orders(connection, everyone, changed)
    return customers, {
        contact_id: [(at_ms, micros) for _, at_ms, micros in items]
        for contact_id, items in orders.items()
    }


def _lead_rows(
    connection: Connection, flt: MetricFilter, coverage: Coverage, changed: set[int]
) -> list[tuple[Any, ...]]:
    columns = [RollupLeadLinks.__table__.c[name] for name in _LEAD_FIELDS]
    served = select(*columns).where(
        *coverage.served_conditions(RollupLeadLinks.start_slot_ms),
        *channel_condition(RollupLeadLinks.channel, flt),
    )
    moved = contact_leads(connection, changed) if changed else set()
    rows = {row[0]: tuple(row) for row in connection.execute(served) if row[0] not in moved}
    fresh = []
    if coverage.raw:
        fresh.extend(lead_links(connection, _raw_targets(flt, coverage)))
    if moved:
        # The changed contacts' leads may count for another conversation than stored.
        in_window = and_(
            Conversation.started_at_ms >= coverage.since_ms,
            Conversation.started_at_ms < coverage.until_ms,
            *channel_condition(Conversation.channel, flt),
        )
        for chunk in _chunks(sorted(moved)):
            fresh.extend(lead_links(connection, in_window, Lead.id.in_(chunk)))
    for row in fresh:
        rows[row["lead_id"]] = tuple(row[name] for name in _LEAD_FIELDS)
    return list(rows.values())


_LEAD_FIELDS = (
    "lead_id",
    "channel",
    "contact_id",
    "kind",
    "origin",
    "score",
    "occurred_at_ms",
    "first_source",
    "last_source",
)


def rolled_leads(
    engine: Engine, flt: MetricFilter
) -> tuple[list[LeadLink], Mapping[int, int]] | None:
    """Return the leads of the window and each lead contact's latest conversion time, or None.

    The caller checks that rollups serve the filter (:func:`serves_filter`).
    """
    with engine.connect() as connection:
        coverage = _coverage(connection, flt)
        if coverage is None:
            return None
        changed = _changed_contacts(connection)
        leads = []
        for lead_id, channel, contact_id, kind, origin, score, at_ms, first, last in _lead_rows(
            connection, flt, coverage, changed
        ):
            leads.append(
                LeadLink(
                    channel if flt.group_by is not None else None,
                    first if flt.touch == "first" else last,
                    lead_id,
                    kind,
                    origin,
                    score,
                    at_ms,
                    contact_id,
                )
            )
        contacts = {lead.contact_id for lead in leads if lead.contact_id is not None}
        orders = _orders(connection, contacts, changed)
    latest = {contact_id: max(at_ms for _, at_ms, _ in items) for contact_id, items in orders.items()}
    return leads, latest
