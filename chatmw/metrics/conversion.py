"""Conversion rate, conversions and revenue, and the attribution the other business metrics share.

A conversion is attributed to conversations in one of two ways:

- It names a conversation: it is attributed to that conversation only, and to none while
  that conversation is not stored.
- It names a user: it is attributed to every conversation of that user (contact) that
  started at most ``attribution_days`` before the conversion, and not after it.

A conversion attributed to several conversations counts in full for each of them; totals
over all conversations count it once.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Engine, Select, and_, func, or_, select, true, union
from sqlalchemy.orm import aliased

from chatmw.events_business import format_micros
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_business import Conversion, Spend

if TYPE_CHECKING:
    from chatmw.metrics.business_query import ConversionSums

__all__ = [
    "ATTRIBUTION_PARAM",
    "ROLLUP_NOTE",
    "AttributedConversion",
    "attribution_days",
    "ResolvedConversion",
    "load_conversions",
    "resolved_conversions",
    "attributed_conversions",
    "conversation_counts",
    "currency_of",
    "conversion_rate",
    "rolled_figures",
    "CONVERSION",
]

DAY_MS = 86_400_000
# Ids bound per query, below SQLite's default limit of 32,766 bound parameters
# (SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32.0).
IDS_PER_QUERY = 10_000
DEFAULT_ATTRIBUTION_DAYS = 7.0
MAX_ATTRIBUTION_DAYS = 366.0
# Appended to the descriptions of the metrics that read the business rollups.
ROLLUP_NOTE = (
    "\n\nOn a store whose rollups are built, the queries that `docs/rollups.md` lists read "
    "them. Conversions, leads and touches recorded since the last refresh are counted from "
    "raw rows, so answers include them at once."
)
ATTRIBUTION_PARAM = Param(
    "attribution_days",
    "Attribution window in days: a conversion counts for the user's conversations that started "
    f"at most this long before it (default {DEFAULT_ATTRIBUTION_DAYS:g}).",
    default=DEFAULT_ATTRIBUTION_DAYS,
    kind=float,
)


def attribution_days(options: Mapping[str, Any]) -> float:
    """Return the validated ``attribution_days`` option."""
    days = options.get("attribution_days", DEFAULT_ATTRIBUTION_DAYS)
    if days is None:
        return DEFAULT_ATTRIBUTION_DAYS
    if not 0 <= days <= MAX_ATTRIBUTION_DAYS:
        raise FilterError(
            "attribution_days", f"must be between 0 and {MAX_ATTRIBUTION_DAYS:g}, got {days:g}"
        )
    return float(days)


def resolved_conversions() -> Select[*tuple[Any, ...]]:
    """Select each conversion with its contact and its named conversation, where found.

    The contact is the user's contact on the conversion's channel, or else the named
    conversation's contact.
    """
    contact = aliased(Contact)
    named = aliased(Conversation)
    return (
        select(
            Conversion.id.label("conversion_id"),
            Conversion.name,
            Conversion.value_micros,
            Conversion.occurred_at_ms,
            Conversion.conversation_external_id,
            func.coalesce(contact.id, named.contact_id).label("contact_id"),
            named.id.label("linked_conversation_id"),
        )
        .outerjoin(
            contact,
            and_(contact.channel == Conversion.channel, contact.external_id == Conversion.user_id),
        )
        .outerjoin(
            named,
            and_(
                named.channel == Conversion.channel,
                named.external_id == Conversion.conversation_external_id,
            ),
        )
    )


@dataclass(frozen=True, slots=True)
class ResolvedConversion:
    """A stored conversion with its contact and the conversation it names, where found."""

    conversion_id: int
    name: str
    value_micros: int
    occurred_at_ms: int
    names_conversation: bool
    contact_id: int | None
    linked_conversation_id: int | None


def load_conversions(
    engine: Engine, flt: MetricFilter | None = None, days: float = 0.0
) -> list[ResolvedConversion]:
    """Return the stored conversions, resolved as :func:`resolved_conversions` selects it.

    With ``flt``, conversions naming a user are left out when they cannot be attributed
    (within ``days``) to a conversation that started in the window of ``flt``.
    """
    statement = resolved_conversions()
    if flt is not None:
        statement = statement.where(_may_reach_window(flt, days))
    with engine.connect() as connection:
        return [
            ResolvedConversion(
                row.conversion_id,
                row.name,
                row.value_micros,
                row.occurred_at_ms,
                row.conversation_external_id is not None,
                row.contact_id,
                row.linked_conversation_id,
            )
            for row in connection.execute(statement)
        ]


def _may_reach_window(flt: MetricFilter, days: float) -> ColumnElement[bool]:
    # A conversion at t reaches conversations that started in [t - days, t], so one naming a
    # user reaches the window [since, until) only when since <= t < until + days.
    bounds = []
    if flt.since_ms is not None:
        bounds.append(Conversion.occurred_at_ms >= flt.since_ms)
    if flt.until_ms is not None:
        bounds.append(Conversion.occurred_at_ms < flt.until_ms + int(days * DAY_MS))
    if not bounds:
        return true()
    return or_(Conversion.conversation_external_id.is_not(None), and_(*bounds))


@dataclass(frozen=True, slots=True)
class AttributedConversion:
    """One attribution of a conversion to a conversation of the filter's scope."""

    group_key: Any
    conversation_id: int
    conversion_id: int
    name: str
    value_micros: int
    occurred_at_ms: int
    contact_id: int | None


def _scoped_conversations(
    engine: Engine, flt: MetricFilter, conversions: Sequence[ResolvedConversion]
) -> list[tuple[int, Any, int | None, int]]:
    """Return id, group key, contact and start of the scoped conversations ``conversions`` reach.

    Those are the conversations of contacts with a conversion naming a user, and the
    conversations that conversions name, because no other conversation gets an attribution.
    They are read by id and by contact, in chunks under SQLite's limit on bound parameters.
    """
    contacts = sorted(
        {c.contact_id for c in conversions if not c.names_conversation and c.contact_id is not None}
    )
    linked = sorted(
        {
            c.linked_conversation_id
            for c in conversions
            if c.names_conversation and c.linked_conversation_id is not None
        }
    )
    found: dict[int, tuple[int, Any, int | None, int]] = {}
    with engine.connect() as connection:
        for column, values in ((Conversation.contact_id, contacts), (Conversation.id, linked)):
            for first in range(0, len(values), IDS_PER_QUERY):
                chunk = values[first : first + IDS_PER_QUERY]
                statement = conversation_scope(flt).add_columns(
                    Conversation.contact_id, Conversation.started_at_ms
                )
                for row in connection.execute(statement.where(column.in_(chunk))):
                    found[row[0]] = (row[0], row[1], row[2], row[3])
    return list(found.values())


def attributed_conversions(
    engine: Engine,
    flt: MetricFilter,
    days: float,
    conversions: Sequence[ResolvedConversion] | None = None,
) -> list[AttributedConversion]:
    """Return every attribution (see the module doc) to a conversation that ``flt`` covers.

    The matching runs here rather than in SQL, because SQLite joins two derived tables as a
    nested loop without an index, which is quadratic in their sizes. Two indexed reads and
    a binary search per conversion are not.
    """
    if conversions is None:
        conversions = load_conversions(engine, flt, days)
    scoped = _scoped_conversations(engine, flt, conversions)
    group_of = {conversation_id: group_key for conversation_id, group_key, _, _ in scoped}
    by_contact: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for conversation_id, _, contact_id, started_ms in scoped:
        if contact_id is not None:
            by_contact[contact_id].append((started_ms, conversation_id))
    for entries in by_contact.values():
        entries.sort()
    window_ms = int(days * DAY_MS)

    rows: list[AttributedConversion] = []
    for conversion in conversions:
        targets: list[int] = []
        if conversion.names_conversation:
            linked = conversion.linked_conversation_id
            if linked is not None and linked in group_of:
                targets.append(linked)
        elif conversion.contact_id is not None:
            entries = by_contact.get(conversion.contact_id, [])
            low = bisect_left(entries, (conversion.occurred_at_ms - window_ms, -1))
            high = bisect_right(entries, (conversion.occurred_at_ms, sys.maxsize))
            targets.extend(conversation_id for _, conversation_id in entries[low:high])
        rows.extend(
            AttributedConversion(
                group_of[target],
                target,
                conversion.conversion_id,
                conversion.name,
                conversion.value_micros,
                conversion.occurred_at_ms,
                conversion.contact_id,
            )
            for target in targets
        )
    return rows


def conversation_counts(engine: Engine, flt: MetricFilter) -> dict[Any, int]:
    """Return the number of conversations per group key."""
    scope = conversation_scope(flt).subquery()
    statement = select(scope.c.group_key, func.count()).group_by(scope.c.group_key)
    with engine.connect() as connection:
        return {key: int(count) for key, count in connection.execute(statement)}


def currency_of(engine: Engine) -> dict[str, Any]:
    """Return ``{"currency": code}`` for the stored amounts, with a note if they mix currencies."""
    # The lowest and highest codes come from the index, and only a mix needs the full list.
    bounds = union(
        select(func.min(Conversion.currency)),
        select(func.max(Conversion.currency)),
        select(func.min(Spend.currency)),
        select(func.max(Spend.currency)),
    )
    with engine.connect() as connection:
        codes = sorted(code for code in connection.execute(bounds).scalars() if code is not None)
        if len(codes) > 1:
            statement = union(select(Conversion.currency), select(Spend.currency))
            codes = sorted(connection.execute(statement).scalars())
    if len(codes) <= 1:
        return {"currency": codes[0] if codes else None}
    return {
        "currency": None,
        "currency_note": f"amounts are stored in several currencies ({', '.join(codes)}); "
        "sums add them as they are",
    }


def _figures(conversations: int, rows: Iterable[AttributedConversion]) -> dict[str, Any]:
    converted: set[int] = set()
    values: dict[int, int] = {}
    names: dict[int, str] = {}
    for row in rows:
        converted.add(row.conversation_id)
        values[row.conversion_id] = row.value_micros
        names[row.conversion_id] = row.name
    by_name: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for conversion_id, value in values.items():
        by_name[names[conversion_id]][0] += 1
        by_name[names[conversion_id]][1] += value
    return _section(conversations, len(converted), by_name)


def _section(
    conversations: int, converted: int, by_name: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """Return the figures of one group, where ``by_name`` maps a name to [conversions, micros]."""
    return {
        "conversations": conversations,
        "converted_conversations": converted,
        "conversion_rate": rate(converted, conversations),
        "conversions": sum(count for count, _ in by_name.values()),
        "revenue": format_micros(sum(micros for _, micros in by_name.values())),
        "by_name": [
            {"name": name, "conversions": count, "revenue": format_micros(micros)}
            for name, (count, micros) in sorted(by_name.items())
        ],
    }


def _rolled_result(engine: Engine, flt: MetricFilter, days: float) -> dict[str, Any] | None:
    """Return the figures and groups from rollups, or None where rollups do not apply."""
    # Imported here: the rollup modules import this one.
    from chatmw.metrics.business_query import rolled_conversions, serves_days, serves_filter

    if not (serves_days(days) and serves_filter(flt)):
        return None
    sums = rolled_conversions(engine, flt)
    if sums is None:
        return None
    return rolled_figures(sums, flt)


def rolled_figures(sums: ConversionSums, flt: MetricFilter) -> dict[str, Any]:
    """Return the figures, and the groups when ``flt`` groups, of attributions summed by rollups."""
    result = _section(sum(sums.conversations.values()), sum(sums.converted.values()), sums.overall)
    if flt.group_by is not None:
        keys = set(sums.conversations) | {key for key, count in sums.converted.items() if count}
        result["groups"] = [
            {
                "group": group_label(key),
                **_section(
                    sums.conversations.get(key, 0), sums.converted.get(key, 0), sums.names[key]
                ),
            }
            for key in sorted(keys, key=group_label)
        ]
    return result


def conversion_rate(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute the conversion rate, conversions and revenue of the conversations of ``flt``."""
    days = attribution_days(options or {})
    result: dict[str, Any] = {
        "metric": "conversion",
        "filters": flt.describe(),
        "attribution_days": days,
        **currency_of(engine),
    }
    rolled = _rolled_result(engine, flt, days)
    if rolled is not None:
        result.update(rolled)
        return result
    counts = conversation_counts(engine, flt)
    rows = attributed_conversions(engine, flt, days)
    result.update(_figures(sum(counts.values()), rows))
    if flt.group_by is not None:
        by_group: dict[Any, list[AttributedConversion]] = defaultdict(list)
        for row in rows:
            by_group[row.group_key].append(row)
        result["groups"] = [
            {"group": group_label(key), **_figures(counts.get(key, 0), by_group[key])}
            for key in sorted(set(counts) | set(by_group), key=group_label)
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    names = (
        "conversations",
        "converted_conversations",
        "conversion_rate",
        "conversions",
        "revenue",
    )
    return [
        {
            "group": group,
            **{name: section[name] for name in names},
            "currency": result.get("currency"),
        }
        for group, section in sections
    ]


CONVERSION = register(
    MetricSpec(
        name="conversion",
        summary="Conversion rate, conversions and revenue",
        description=(
            "**Conversion rate** = conversations with at least one attributed conversion / "
            "conversations that started in the window.\n\n"
            "Conversions are recorded through `POST /business/conversions` or "
            "`chatmw.business.record_conversion`. A conversion that names a conversation is "
            "attributed to that conversation only, from the time it is stored (even when the "
            "conversion was recorded first). One that names a user is attributed to each "
            "conversation of that user (same channel) that started at most `attribution_days` "
            "(default 7) before the conversion, the conversion time included, and not after it.\n\n"
            "- `conversions`: distinct conversions attributed to conversations in the window.\n"
            "- `revenue`: the sum of their values, a decimal string in `currency` (each "
            "conversion once, however many conversations it is attributed to).\n"
            "- `by_name`: conversions and revenue per conversion name.\n"
            "- `groups` (with `group_by`): the same per group. A conversion attributed to "
            "conversations of two groups counts in both, so group totals may exceed the total.\n\n"
            "An empty window gives `conversion_rate: null` with `conversations: 0`." + ROLLUP_NOTE
        ),
        compute=conversion_rate,
        params=(ATTRIBUTION_PARAM,),
        rows=_rows,
    )
)
