"""Growth: conversations, users, new users and messages per period, with the change."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from chatmw.metrics.buckets import bucket_range, bucket_start
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.growth_rollups import growth_counts
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.volume import series_rows, series_with_change
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message

__all__ = ["growth", "GROWTH", "PERIODS", "COUNTS"]

PERIODS = ("day", "week", "month")
COUNTS = ("conversations", "users", "new_users", "messages")


def _load(
    engine: Engine, flt: MetricFilter
) -> tuple[list[tuple[Any, int, int | None]], dict[int, int], list[tuple[Any, int]]]:
    scope = conversation_scope(flt).subquery()
    conversations = select(
        scope.c.group_key, Conversation.started_at_ms, Conversation.contact_id
    ).join(Conversation, Conversation.id == scope.c.conversation_id)
    # First conversation ever of each contact under the same channel, attribute and touch filters.
    unbounded = conversation_scope(flt, window=False).subquery()
    firsts = (
        select(Conversation.contact_id, func.min(Conversation.started_at_ms))
        .join(unbounded, Conversation.id == unbounded.c.conversation_id)
        .where(Conversation.contact_id.is_not(None))
        .group_by(Conversation.contact_id)
    )
    messages = (
        select(scope.c.group_key, Message.occurred_at_ms)
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.kind.not_in(UNTIMED_KINDS))
    )
    with engine.connect() as connection:
        started = [(row[0], int(row[1]), row[2]) for row in connection.execute(conversations)]
        first_ms = {
            contact_id: int(at)
            for contact_id, at in connection.execute(firsts)
            if contact_id is not None
        }
        sent = [(row[0], int(row[1])) for row in connection.execute(messages)]
    return started, first_ms, sent


def _counts(
    started: Iterable[tuple[Any, int, int | None]],
    first_ms: Mapping[int, int],
    sent: Iterable[tuple[Any, int]],
    period: str,
    flt: MetricFilter,
) -> dict[datetime, dict[str, int]]:
    counts: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    users: dict[datetime, set[int]] = defaultdict(set)
    new_users: dict[datetime, set[int]] = defaultdict(set)
    for _, at, contact_id in started:
        start = bucket_start(at, period, flt.tz)
        counts[start]["conversations"] += 1
        if contact_id is None:
            continue
        users[start].add(contact_id)
        if first_ms.get(contact_id) == at:
            new_users[start].add(contact_id)
    for _, at in sent:
        counts[bucket_start(at, period, flt.tz)]["messages"] += 1
    for start, contacts in users.items():
        counts[start]["users"] = len(contacts)
    for start, contacts in new_users.items():
        counts[start]["new_users"] = len(contacts)
    return counts


def _totals(series: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {
        name: sum(row[name] for row in series)
        for name in ("conversations", "new_users", "messages")
    }
    if len(series) >= 2:
        first, last = series[0], series[-1]
        for name in COUNTS:
            change = last[name] - first[name]
            totals[f"{name}_first_to_last_pct"] = (
                None if first[name] == 0 else round(change / first[name] * 100, 2)
            )
    return totals


def growth(engine: Engine, flt: MetricFilter, options: Mapping[str, Any]) -> dict[str, Any]:
    """Count conversations, users, new users and messages per period, with the change."""
    period = options.get("period") or "week"
    result: dict[str, Any] = {"metric": "growth", "filters": flt.describe(), "period": period}
    if flt.since_ms is not None and flt.until_ms is not None:
        try:
            starts = bucket_range(flt.since_ms, flt.until_ms, period, flt.tz)
        except ValueError as error:
            raise FilterError("period", str(error)) from None
        from_rollups = growth_counts(engine, flt, period, starts)
        if from_rollups is not None:
            overall, by_group = from_rollups
            result["series"] = series_with_change(starts, overall, COUNTS)
            result["totals"] = _totals(result["series"])
            if flt.group_by is not None:
                result["groups"] = []
                for key in sorted(by_group, key=group_label):
                    series = series_with_change(starts, by_group[key], COUNTS)
                    result["groups"].append(
                        {"group": group_label(key), "series": series, "totals": _totals(series)}
                    )
            return result

    started, first_ms, sent = _load(engine, flt)
    times = [at for _, at, _ in started]
    if not times and (flt.since_ms is None or flt.until_ms is None):
        result.update(series=[], totals=_totals([]))
        if flt.group_by is not None:
            result["groups"] = []
        return result
    first = flt.since_ms if flt.since_ms is not None else min(times)
    end = flt.until_ms if flt.until_ms is not None else max(times) + 1
    try:
        starts = bucket_range(first, end, period, flt.tz)
    except ValueError as error:
        raise FilterError("period", str(error)) from None

    result["series"] = series_with_change(
        starts, _counts(started, first_ms, sent, period, flt), COUNTS
    )
    result["totals"] = _totals(result["series"])
    if flt.group_by is not None:
        keys = sorted({key for key, _, _ in started}, key=group_label)
        result["groups"] = []
        for key in keys:
            counts = _counts(
                [row for row in started if row[0] == key],
                first_ms,
                [row for row in sent if row[0] == key],
                period,
                flt,
            )
            series = series_with_change(starts, counts, COUNTS)
            result["groups"].append(
                {"group": group_label(key), "series": series, "totals": _totals(series)}
            )
    return result


GROWTH = register(
    MetricSpec(
        name="growth",
        summary="Conversations, users, new users and messages per period, with the change",
        description=(
            "Per `period` (day, week starting Monday, or month, in `tz`) from the start of the "
            "window to its end:\n\n"
            "- `conversations`: conversations that started in the period;\n"
            "- `users`: distinct contacts who started a conversation in the period;\n"
            "- `new_users`: those of them whose first conversation ever (under the same channel, "
            "attribute and touch filters) is one that started in the period;\n"
            "- `messages`: messages of those conversations, whatever their own time (survey "
            "prompts and answers and reactions are not counted). Unlike `volume`, every figure "
            "follows the conversation's start.\n\n"
            "Each figure has `*_change` (minus the previous period) and `*_change_pct` (in "
            "percent of the previous period; `null` for the first period and where the previous "
            "period is 0). `totals` sums conversations, new users and messages over the window "
            "and gives the change from the first to the last period in percent (`null` when the "
            "first is 0). Empty periods are listed with zeros. The first and last periods may be "
            "partial when the window does not start or end on a period boundary."
        ),
        compute=growth,
        params=(Param("period", "Period length.", default="week", choices=PERIODS),),
        rows=series_rows,
    )
)
