"""Volume: conversations, messages and distinct users per calendar bucket."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from chatmw.metrics.buckets import INTERVALS, bucket_range, bucket_start
from chatmw.metrics.filters import FilterError, MetricFilter
from chatmw.metrics.registry import MetricSpec, Param, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.volume_rollups import volume_counts
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message

__all__ = ["volume", "VOLUME", "series_with_change", "series_rows"]

COUNTS = ("conversations", "messages", "users")


def _conversation_rows(engine: Engine, flt: MetricFilter) -> list[tuple[Any, int]]:
    scope = conversation_scope(flt).subquery()
    statement = select(scope.c.group_key, Conversation.started_at_ms).join(
        Conversation, Conversation.id == scope.c.conversation_id
    )
    with engine.connect() as connection:
        return [(row[0], row[1]) for row in connection.execute(statement)]


def _message_rows(engine: Engine, flt: MetricFilter) -> list[tuple[Any, int, str, int | None]]:
    scope = conversation_scope(flt, window=False).subquery()
    statement = (
        select(scope.c.group_key, Message.occurred_at_ms, Message.role, Message.contact_id)
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.kind.not_in(UNTIMED_KINDS))
    )
    if flt.since_ms is not None:
        statement = statement.where(Message.occurred_at_ms >= flt.since_ms)
    if flt.until_ms is not None:
        statement = statement.where(Message.occurred_at_ms < flt.until_ms)
    with engine.connect() as connection:
        return [(row[0], row[1], row[2], row[3]) for row in connection.execute(statement)]


def series_with_change(
    starts: Iterable[datetime], counts: Mapping[datetime, Mapping[str, int]], names: Iterable[str]
) -> list[dict[str, Any]]:
    """Return one row per bucket with each count, its change and its change in percent."""
    names = tuple(names)
    series: list[dict[str, Any]] = []
    previous: Mapping[str, int] | None = None
    for start in starts:
        current = {name: counts.get(start, {}).get(name, 0) for name in names}
        row: dict[str, Any] = {"bucket": start.isoformat()}
        for name in names:
            row[name] = current[name]
            if previous is None:
                row[f"{name}_change"] = None
                row[f"{name}_change_pct"] = None
            else:
                change = current[name] - previous[name]
                row[f"{name}_change"] = change
                row[f"{name}_change_pct"] = (
                    None if previous[name] == 0 else round(change / previous[name] * 100, 2)
                )
        series.append(row)
        previous = current
    return series


def volume(engine: Engine, flt: MetricFilter, options: Mapping[str, Any]) -> dict[str, Any]:
    """Count conversations (by start), messages and distinct users (by message time) per bucket.

    Users are the distinct contacts that sent at least one user message in the bucket.
    Survey prompts, survey answers and reactions are not counted as messages.
    """
    interval = options.get("interval") or "day"
    result: dict[str, Any] = {"metric": "volume", "filters": flt.describe(), "interval": interval}
    if flt.since_ms is not None and flt.until_ms is not None:
        try:
            starts = bucket_range(flt.since_ms, flt.until_ms, interval, flt.tz)
        except ValueError as error:
            raise FilterError("interval", str(error)) from None
        from_rollups = volume_counts(engine, flt, interval, starts)
        if from_rollups is not None:
            overall, by_group = from_rollups
            result["series"] = series_with_change(starts, overall, COUNTS)
            if flt.group_by is not None:
                result["groups"] = [
                    {
                        "group": group_label(key),
                        "series": series_with_change(starts, by_group[key], COUNTS),
                    }
                    for key in sorted(by_group, key=group_label)
                ]
            return result

    conversations = _conversation_rows(engine, flt)
    messages = _message_rows(engine, flt)
    times = [at for _, at in conversations] + [at for _, at, _, _ in messages]
    first_ms, end_ms = flt.since_ms, flt.until_ms
    if first_ms is None and times:
        first_ms = min(times)
    if end_ms is None and times:
        end_ms = max(times) + 1
    if first_ms is None or end_ms is None:
        result["series"] = []
        if flt.group_by is not None:
            result["groups"] = []
        return result
    try:
        starts = bucket_range(first_ms, end_ms, interval, flt.tz)
    except ValueError as error:
        raise FilterError("interval", str(error)) from None

    counts: dict[Any, dict[datetime, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int))
    )
    users: dict[Any, dict[datetime, set[int]]] = defaultdict(lambda: defaultdict(set))
    for group_key, started in conversations:
        start = bucket_start(started, interval, flt.tz)
        counts[group_key][start]["conversations"] += 1
    for group_key, at, role, contact_id in messages:
        start = bucket_start(at, interval, flt.tz)
        counts[group_key][start]["messages"] += 1
        if role == "user" and contact_id is not None:
            users[group_key][start].add(contact_id)

    def totals(keys: Iterable[Any]) -> dict[datetime, dict[str, int]]:
        merged: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        merged_users: dict[datetime, set[int]] = defaultdict(set)
        for key in keys:
            for start, values in counts.get(key, {}).items():
                for name, value in values.items():
                    merged[start][name] += value
            for start, contacts in users.get(key, {}).items():
                merged_users[start] |= contacts
        for start, contacts in merged_users.items():
            merged[start]["users"] = len(contacts)
        return merged

    group_keys = list(set(counts) | set(users))
    result["series"] = series_with_change(starts, totals(group_keys), COUNTS)
    if flt.group_by is not None:
        result["groups"] = [
            {"group": group_label(key), "series": series_with_change(starts, totals([key]), COUNTS)}
            for key in sorted(group_keys, key=group_label)
        ]
    return result


def series_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a result's overall and per-group series into table rows with a ``group``."""
    rows = [{"group": "(all)", **row} for row in result["series"]]
    for group in result.get("groups", []):
        rows.extend({"group": group["group"], **row} for row in group["series"])
    return rows


VOLUME = register(
    MetricSpec(
        name="volume",
        summary="Conversations, messages and users per period",
        description=(
            "Per bucket of `interval` in `tz`: conversations that started, messages sent (by "
            "their own time, for conversations matching the channel, attribute and touch "
            "filters), and distinct users who sent a message, each with the change from the "
            "previous bucket (absolute and in percent; null where the previous bucket is 0)."
        ),
        compute=volume,
        params=(Param("interval", "Bucket size.", default="day", choices=INTERVALS),),
        rows=series_rows,
    )
)
