"""Rollups of the business metrics: conversion attributions, leads and orders.

``rollup_conversion_links`` keeps one row per attribution of a conversion to a
conversation, with the default attribution window (``attribution_days`` 7), keyed by the
conversation's start slot. A row depends only on its conversation (start, channel,
contact, touches) and on the raw conversions. Recomputing a dirty start slot from the raw
tables therefore gives the rows a rebuild gives, even for a conversion that names a user
and counts for conversations in several slots.

``rollup_lead_links`` keeps one row per lead that counts for a conversation, keyed by
lead. A lead that names no conversation counts for its user's latest conversation that
started at or before it, so its row moves when that user gets a new conversation. The
refresher therefore recomputes the leads of changed contacts as well as those of dirty
start slots.

``rollup_orders`` keeps each conversion with the contact it resolves to (the user's
contact on the conversion's channel, else the named conversation's contact). It is kept
per contact: the refresher recomputes the conversions of changed contacts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    delete,
    exists,
    insert,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.orm import aliased

from chatmw.metrics.conversion import DAY_MS, DEFAULT_ATTRIBUTION_DAYS, resolved_conversions
from chatmw.metrics.rollup_refresh import slot_expression, time_in_ranges
from chatmw.store.models import Contact, Conversation, Touch
from chatmw.store.models_business import Conversion, Lead
from chatmw.store.models_rollups import RollupConversionLinks, RollupLeadLinks, RollupOrders

__all__ = [
    "BUSINESS_TABLES",
    "LINK_WINDOW_MS",
    "conversion_links",
    "lead_links",
    "contact_leads",
    "contact_orders",
    "delete_business",
    "insert_business",
    "recompute_business_contacts",
    "rebuild_orders",
]

BUSINESS_TABLES = (RollupConversionLinks, RollupLeadLinks, RollupOrders)
# The attribution window of the stored links. Queries with another window read raw rows.
LINK_WINDOW_MS = int(DEFAULT_ATTRIBUTION_DAYS * DAY_MS)
# Ids bound per statement, below SQLite's default limit of 32,766 bound parameters.
_IDS = 5_000
# Ranges per statement, as in chatmw.metrics.rollup_refresh.
_RANGES = 50

LINK_COLUMNS = (
    "conversion_id",
    "conversation_id",
    "start_slot_ms",
    "channel",
    "value_micros",
    "name",
    "first_campaign",
    "last_campaign",
)
LEAD_COLUMNS = (
    "lead_id",
    "conversation_id",
    "start_slot_ms",
    "channel",
    "contact_id",
    "kind",
    "origin",
    "score",
    "occurred_at_ms",
    "first_source",
    "last_source",
)


def _chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for first in range(0, len(values), size):
        yield values[first : first + size]


def _touch_joins(statement: Any, field: str) -> tuple[Any, list[Any]]:
    """Outer-join the conversation's first and last touch, and return ``field`` of both."""
    first, last = aliased(Touch), aliased(Touch)
    statement = statement.outerjoin(first, first.id == Conversation.first_touch_id).outerjoin(
        last, last.id == Conversation.last_touch_id
    )
    return statement, [getattr(first, field), getattr(last, field)]


def _link_statements(targets: ColumnElement[bool]) -> list[Any]:
    """Select the attributions to the conversations ``targets`` selects, in LINK_COLUMNS order."""
    statements = []
    head = [
        Conversion.id,
        Conversation.id,
        slot_expression(Conversation.started_at_ms),
        Conversation.channel,
        Conversion.value_micros,
        Conversion.name,
    ]
    named = (
        select(*head)
        .select_from(Conversation)
        .join(
            Conversion,
            and_(
                Conversion.channel == Conversation.channel,
                Conversion.conversation_external_id == Conversation.external_id,
            ),
        )
    )
    # A conversion naming only a user counts for the user's conversations that started
    # at most LINK_WINDOW_MS before it, as in chatmw.metrics.conversion.
    by_user = (
        select(*head)
        .select_from(Conversation)
        .join(Contact, Contact.id == Conversation.contact_id)
        .join(
            Conversion,
            and_(
                Conversion.channel == Contact.channel,
                Conversion.user_id == Contact.external_id,
                Conversion.conversation_external_id.is_(None),
                Conversion.occurred_at_ms >= Conversation.started_at_ms,
                Conversion.occurred_at_ms
                <= Conversation.started_at_ms + literal_column(str(LINK_WINDOW_MS)),
            ),
        )
    )
    for statement in (named, by_user):
        statement, campaigns = _touch_joins(statement, "campaign")
        statements.append(statement.add_columns(*campaigns).where(targets))
    return statements


def conversion_links(connection: Connection, targets: ColumnElement[bool]) -> list[dict[str, Any]]:
    """Return the link rows of the conversations ``targets`` selects, from raw rows.

    ``by_user`` marks the attributions of conversions that name only a user, the only ones
    a conversion can have several of. ``first_link`` marks one row per conversation (its
    lowest conversion id), so that summing it counts converted conversations.
    """
    rows: list[dict[str, Any]] = []
    for by_user, statement in enumerate(_link_statements(targets)):
        for row in connection.execute(statement):
            link = dict(zip(LINK_COLUMNS, row, strict=True))
            link["by_user"] = by_user
            rows.append(link)
    first: dict[int, int] = {}
    for link in rows:
        known = first.get(link["conversation_id"])
        if known is None or link["conversion_id"] < known:
            first[link["conversation_id"]] = link["conversion_id"]
    for link in rows:
        link["first_link"] = int(first[link["conversation_id"]] == link["conversion_id"])
    return rows


def _lead_statements(targets: ColumnElement[bool], leads: ColumnElement[bool]) -> list[Any]:
    """Select the leads ``leads`` selects that count for conversations ``targets`` selects.

    A lead counts for the conversation it was found in, else the one it names, else its
    user's latest conversation on the channel that started at or before it (latest by
    start, then by id), as ``chatmw.metrics.leads.lead_conversations`` selects.
    """
    user = aliased(Contact)
    head = [
        Lead.id,
        Conversation.id,
        slot_expression(Conversation.started_at_ms),
        Conversation.channel,
        user.id,
        Lead.kind,
        Lead.origin,
        Lead.score,
        Lead.occurred_at_ms,
    ]
    same_user = and_(user.channel == Lead.channel, user.external_id == Lead.user_id)
    found_in = (
        select(*head)
        .select_from(Conversation)
        .join(Lead, Lead.conversation_id == Conversation.id)
        .outerjoin(user, same_user)
    )
    named = (
        select(*head)
        .select_from(Conversation)
        .join(
            Lead,
            and_(
                Lead.conversation_id.is_(None),
                Lead.channel == Conversation.channel,
                Lead.conversation_external_id == Conversation.external_id,
            ),
        )
        .outerjoin(user, same_user)
    )
    other_named = aliased(Conversation)
    later = aliased(Conversation)
    latest = (
        select(*head)
        .select_from(Conversation)
        .join(user, user.id == Conversation.contact_id)
        .join(
            Lead,
            and_(
                same_user,
                Lead.conversation_id.is_(None),
                Lead.channel == Conversation.channel,
                Conversation.started_at_ms <= Lead.occurred_at_ms,
            ),
        )
        .where(
            ~exists().where(
                other_named.channel == Lead.channel,
                other_named.external_id == Lead.conversation_external_id,
            ),
            ~exists().where(
                later.contact_id == user.id,
                later.channel == Lead.channel,
                later.started_at_ms <= Lead.occurred_at_ms,
                or_(
                    later.started_at_ms > Conversation.started_at_ms,
                    and_(
                        later.started_at_ms == Conversation.started_at_ms,
                        later.id > Conversation.id,
                    ),
                ),
            ),
        )
    )
    statements = []
    for statement in (found_in, named, latest):
        statement, sources = _touch_joins(statement, "source")
        statements.append(statement.add_columns(*sources).where(targets, leads))
    return statements


def lead_links(
    connection: Connection,
    targets: ColumnElement[bool],
    leads: ColumnElement[bool] | None = None,
) -> list[dict[str, Any]]:
    """Return the rows of the leads ``leads`` selects that count for conversations ``targets``."""
    rows = []
    for statement in _lead_statements(targets, true() if leads is None else leads):
        rows.extend(
            dict(zip(LEAD_COLUMNS, row, strict=True)) for row in connection.execute(statement)
        )
    return rows


def contact_leads(connection: Connection, contacts: Iterable[int]) -> set[int]:
    """Return the ids of the leads whose user is one of ``contacts``."""
    found: set[int] = set()
    for chunk in _chunks(sorted(contacts), _IDS):
        statement = (
            select(Lead.id)
            .join(
                Contact, and_(Contact.channel == Lead.channel, Contact.external_id == Lead.user_id)
            )
            .where(Contact.id.in_(chunk))
        )
        found.update(connection.execute(statement).scalars())
    return found


def contact_orders(connection: Connection, contacts: Iterable[int]) -> list[dict[str, Any]]:
    """Return the conversions that resolve to one of ``contacts``, from raw rows.

    A conversion resolves to its user's contact on its channel or, when that contact does
    not exist, to the contact of the conversation it names (as
    ``chatmw.metrics.conversion.resolved_conversions`` selects).
    """
    rows: list[dict[str, Any]] = []
    user = aliased(Contact)
    named = aliased(Conversation)
    for chunk in _chunks(sorted(contacts), _IDS):
        by_user = (
            select(Conversion.id, user.id, Conversion.occurred_at_ms, Conversion.value_micros)
            .join(
                user,
                and_(user.channel == Conversion.channel, user.external_id == Conversion.user_id),
            )
            .where(user.id.in_(chunk))
        )
        by_conversation = (
            select(
                Conversion.id, named.contact_id, Conversion.occurred_at_ms, Conversion.value_micros
            )
            .join(
                named,
                and_(
                    named.channel == Conversion.channel,
                    named.external_id == Conversion.conversation_external_id,
                ),
            )
            .outerjoin(
                user,
                and_(user.channel == Conversion.channel, user.external_id == Conversion.user_id),
            )
            .where(named.contact_id.in_(chunk), user.id.is_(None))
        )
        for statement in (by_user, by_conversation):
            rows.extend(
                {
                    "conversion_id": conversion_id,
                    "contact_id": contact_id,
                    "occurred_at_ms": at_ms,
                    "value_micros": micros,
                }
                for conversion_id, contact_id, at_ms, micros in connection.execute(statement)
            )
    return rows


def delete_business(connection: Connection, ranges: list[tuple[int | None, int]]) -> None:
    """Delete the link rows of the conversations that started in the slots of ``ranges``."""
    for index in range(0, len(ranges), _RANGES):
        part = ranges[index : index + _RANGES]
        for table in (RollupConversionLinks, RollupLeadLinks):
            connection.execute(delete(table).where(time_in_ranges(table.start_slot_ms, part)))


def _replace_leads(connection: Connection, rows: list[dict[str, Any]]) -> None:
    # A lead's row can sit in a slot that is not recomputed (its latest conversation was
    # another one before), so rows are replaced by lead id.
    for chunk in _chunks(sorted(row["lead_id"] for row in rows), _IDS):
        connection.execute(delete(RollupLeadLinks).where(RollupLeadLinks.lead_id.in_(chunk)))
    if rows:
        connection.execute(insert(RollupLeadLinks), rows)


def insert_business(connection: Connection, ranges: list[tuple[int | None, int]]) -> None:
    """Insert the link rows of the conversations that started in ``ranges`` (rows emptied)."""
    for index in range(0, len(ranges), _RANGES):
        part = ranges[index : index + _RANGES]
        targets = time_in_ranges(Conversation.started_at_ms, part)
        links = conversion_links(connection, targets)
        if links:
            connection.execute(insert(RollupConversionLinks), links)
        _replace_leads(connection, lead_links(connection, targets))


def recompute_business_contacts(connection: Connection, contacts: set[int]) -> None:
    """Recompute the orders and leads of ``contacts`` from raw rows."""
    if not contacts:
        return
    orders = contact_orders(connection, contacts)
    for chunk in _chunks(sorted(contacts), _IDS):
        connection.execute(delete(RollupOrders).where(RollupOrders.contact_id.in_(chunk)))
    # A conversion's row may name a contact that is not in ``contacts`` any more.
    for chunk in _chunks(sorted(row["conversion_id"] for row in orders), _IDS):
        connection.execute(delete(RollupOrders).where(RollupOrders.conversion_id.in_(chunk)))
    if orders:
        connection.execute(insert(RollupOrders), orders)
    leads = sorted(contact_leads(connection, contacts))
    rows: list[dict[str, Any]] = []
    for chunk in _chunks(leads, _IDS):
        connection.execute(delete(RollupLeadLinks).where(RollupLeadLinks.lead_id.in_(chunk)))
        rows.extend(lead_links(connection, true(), Lead.id.in_(chunk)))
    if rows:
        connection.execute(insert(RollupLeadLinks), rows)


def rebuild_orders(connection: Connection) -> None:
    """Insert every conversion that resolves to a contact into the emptied ``rollup_orders``."""
    resolved = resolved_conversions().subquery()
    connection.execute(
        insert(RollupOrders).from_select(
            ["conversion_id", "contact_id", "occurred_at_ms", "value_micros"],
            select(
                resolved.c.conversion_id,
                resolved.c.contact_id,
                resolved.c.occurred_at_ms,
                resolved.c.value_micros,
            ).where(resolved.c.contact_id.is_not(None)),
        )
    )
