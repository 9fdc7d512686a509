"""Retention: cohorts of users by the period of their first conversation, and who came back."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, func, select

from chatmw.events import to_ms
from chatmw.metrics.buckets import bucket_range
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.retention_rollups import CohortCounts, retention_counts
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.sql import disable_jit
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation

__all__ = ["retention", "RETENTION", "PERIODS", "MAX_FOLLOWING"]

PERIODS = ("day", "week", "month")
# The maximum number of following periods per cohort row.
MAX_FOLLOWING = 60


def _scoped_starts(flt: MetricFilter) -> Select[Any]:
    # The window is applied to cohorts afterwards: a user's first conversation is the first
    # one ever that matches the channel, attribute and touch filters.
    # The scope selects from ``conversations`` itself, so its rows take the columns directly.
    scope = conversation_scope(flt, window=False).add_columns(
        Conversation.contact_id, Conversation.started_at_ms
    )
    statement = scope.where(Conversation.contact_id.is_not(None))
    if flt.until_ms is not None:
        statement = statement.where(Conversation.started_at_ms < flt.until_ms)
    return statement


def _conversations_by_contact(
    engine: Engine, flt: MetricFilter
) -> dict[int, list[tuple[int, Any]]]:
    """Return the conversations of each contact whose first conversation is not before ``since``.

    Contacts that started earlier belong to no cohort, so their conversations are not read.
    """
    statement = _scoped_starts(flt)
    if flt.since_ms is not None:
        starts = statement.subquery()
        new_contacts = (
            select(starts.c.contact_id)
            .group_by(starts.c.contact_id)
            .having(func.min(starts.c.started_at_ms) >= flt.since_ms)
        )
        statement = statement.where(Conversation.contact_id.in_(new_contacts))
    by_contact: dict[int, list[tuple[int, Any]]] = defaultdict(list)
    with engine.connect() as connection:
        disable_jit(connection)
        for _, key, contact_id, started in connection.execute(statement):
            by_contact[contact_id].append((started, key))
    for starts_of_contact in by_contact.values():
        starts_of_contact.sort(key=lambda item: item[0])
    return by_contact


def _first_group_keys(engine: Engine, flt: MetricFilter) -> set[Any]:
    """Return the group key of every contact's first conversation, whenever it started."""
    # NOTE: two first conversations that started in the same millisecond are ordered by the
    # database here and in _conversations_by_contact alike, so either may name the group.
    starts = _scoped_starts(flt).subquery()
    first = (
        func.row_number()
        .over(partition_by=starts.c.contact_id, order_by=starts.c.started_at_ms)
        .label("position")
    )
    ranked = select(starts.c.group_key, first).subquery()
    statement = select(ranked.c.group_key).where(ranked.c.position == 1).distinct()
    with engine.connect() as connection:
        return set(connection.execute(statement).scalars())


def _cohort_table(
    contacts: Sequence[list[tuple[int, Any]]],
    starts: Sequence[datetime],
    cohorts: int,
    following: int,
    end_ms: int,
) -> list[dict[str, Any]]:
    start_ms = [int(start.timestamp() * 1000) for start in starts]
    counts = CohortCounts()
    for conversations in contacts:
        cohort = bisect_right(start_ms, conversations[0][0]) - 1
        counts.sizes[cohort] += 1
        offsets = {bisect_right(start_ms, started) - 1 - cohort for started, _ in conversations[1:]}
        if 0 in offsets:
            counts.same_period[cohort] += 1
        for offset in offsets - {0}:
            counts.returned[cohort][offset] += 1
    return _cohort_rows(counts, starts, cohorts, following, end_ms)


def _cohort_rows(
    counts: CohortCounts,
    starts: Sequence[datetime],
    cohorts: int,
    following: int,
    end_ms: int,
) -> list[dict[str, Any]]:
    start_ms = [int(start.timestamp() * 1000) for start in starts]
    rows = []
    for index in range(cohorts):
        size = counts.sizes.get(index, 0)
        same_period = counts.same_period.get(index, 0)
        returned = counts.returned.get(index, {})
        cells: list[dict[str, Any]] = []
        for offset in range(1, following + 1):
            position = index + offset
            if position >= len(starts) or start_ms[position] >= end_ms:
                cells.append({"period": offset, "users": None, "share": None})
                continue
            count = returned.get(offset, 0)
            cells.append({"period": offset, "users": count, "share": rate(count, size)})
        rows.append(
            {
                "cohort": starts[index].isoformat(),
                "users": size,
                "returned_same_period": same_period,
                "returned_same_period_share": rate(same_period, size),
                "following": cells,
            }
        )
    return rows


def _table_for(
    contacts: Sequence[list[tuple[int, Any]]],
    flt: MetricFilter,
    period: str,
    following: int,
    end_ms: int,
) -> list[dict[str, Any]]:
    in_window = [
        conversations
        for conversations in contacts
        if (flt.since_ms is None or conversations[0][0] >= flt.since_ms)
        and conversations[0][0] < end_ms
    ]
    firsts = [conversations[0][0] for conversations in in_window]
    if flt.since_ms is None and not firsts:
        return []
    first_ms = flt.since_ms if flt.since_ms is not None else min(firsts)
    # Cohort rows run to the window's end, or to the last cohort with users when unbounded.
    last_cohort_ms = end_ms - 1 if flt.until_ms is not None or not firsts else max(firsts)
    cohorts = len(bucket_range(first_ms, last_cohort_ms + 1, period, flt.tz))
    # Return periods run to the end of observation, or to the latest return if later.
    last_ms = max([end_ms - 1, *(conversations[-1][0] for conversations in in_window)])
    starts = bucket_range(first_ms, last_ms + 1, period, flt.tz)
    return _cohort_table(in_window, starts, cohorts, following, end_ms)


def _from_rollups(
    engine: Engine, flt: MetricFilter, period: str, following: int, result: dict[str, Any]
) -> bool:
    """Fill the cohort tables of ``result`` from rollups; return False where they do not apply."""
    if flt.since_ms is None or flt.until_ms is None:
        return False
    # With both bounds set, cohorts and return periods run from since to until.
    starts = bucket_range(flt.since_ms, flt.until_ms, period, flt.tz)
    counted = retention_counts(engine, flt, starts, period)
    if counted is None:
        return False
    counts, keys = counted
    cohorts = len(starts)

    def table(key: Any) -> list[dict[str, Any]]:
        return _cohort_rows(
            counts.get(key, CohortCounts()), starts, cohorts, following, flt.until_ms or 0
        )

    result["cohorts"] = table(None)
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), "cohorts": table(key)}
            for key in sorted(keys, key=group_label)
        ]
    return True


def retention(engine: Engine, flt: MetricFilter, options: Mapping[str, Any]) -> dict[str, Any]:
    """Build the cohort table of users by the period of their first conversation."""
    period = options.get("period") or "week"
    following = int(options.get("periods") or 12)
    if not 1 <= following <= MAX_FOLLOWING:
        raise FilterError("periods", f"must be between 1 and {MAX_FOLLOWING}, got {following}")
    result: dict[str, Any] = {
        "metric": "retention",
        "filters": flt.describe(),
        "period": period,
        "periods": following,
    }
    try:
        if _from_rollups(engine, flt, period, following, result):
            return result
    except ValueError as error:
        raise FilterError("period", str(error)) from None
    by_contact = _conversations_by_contact(engine, flt)
    end_ms = flt.until_ms if flt.until_ms is not None else to_ms(datetime.now(UTC))
    try:
        result["cohorts"] = _table_for(list(by_contact.values()), flt, period, following, end_ms)
        if flt.group_by is not None:
            # Groups whose users all started before the window still get (empty) cohorts.
            members: dict[Any, list[list[tuple[int, Any]]]] = {
                key: [] for key in _first_group_keys(engine, flt)
            }
            for conversations in by_contact.values():
                members.setdefault(conversations[0][1], []).append(conversations)
            result["groups"] = [
                {
                    "group": group_label(key),
                    "cohorts": _table_for(items, flt, period, following, end_ms),
                }
                for key, items in sorted(members.items(), key=lambda item: group_label(item[0]))
            ]
    except ValueError as error:
        raise FilterError("period", str(error)) from None
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result["cohorts"])] + [
        (g["group"], g["cohorts"]) for g in result.get("groups", [])
    ]
    rows = []
    for group, cohorts in sections:
        for cohort in cohorts:
            row: dict[str, Any] = {
                "group": group,
                "cohort": cohort["cohort"],
                "users": cohort["users"],
                "returned_same_period": cohort["returned_same_period"],
            }
            for cell in cohort["following"]:
                row[f"period_{cell['period']}_users"] = cell["users"]
                row[f"period_{cell['period']}_share"] = cell["share"]
            rows.append(row)
    return rows


RETENTION = register(
    MetricSpec(
        name="retention",
        summary="Cohorts of users by first conversation, and the share who come back",
        description=(
            "Users are contacts. A user's **cohort** is the `period` (day, week starting Monday, "
            "or month, in `tz`) of their first conversation: the first ever that matches the "
            "channel, attribute and touch filters, whether or not it lies in the window. Cohorts "
            "are the periods whose users' first conversation started in the window, named by "
            "the local start of the period; the first and last cohorts are partial when the "
            "window does not start or end on a period boundary.\n\n"
            "For each cohort and each following period k = 1..`periods`, `users` is the number of "
            "cohort users who started at least one conversation in the k-th period after the "
            "cohort's own. `share` is that number divided by the cohort size. "
            "`returned_same_period` counts users who started a second conversation within the "
            "cohort period itself.\n\n"
            "Only conversations that started before `until` (or before now, when `until` is not "
            "given) count. A cell whose period starts at or after that end is `null`: not yet "
            "observable, which differs from 0. A cohort without users has `users` 0 and `null` "
            "shares. Conversations without a contact are left out. With `group_by`, a user belongs "
            "to the group of their first conversation; their returns count in any group."
        ),
        compute=retention,
        params=(
            Param("period", "Cohort and return period.", default="week", choices=PERIODS),
            Param(
                "periods",
                f"Following periods per cohort (1 to {MAX_FOLLOWING}).",
                default=12,
                kind=int,
            ),
        ),
        rows=_rows,
    )
)
