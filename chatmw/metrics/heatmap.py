"""Heat map: conversations and messages by weekday and hour of the day in a time zone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Conversation, Message

__all__ = ["heatmap", "HEATMAP", "WEEKDAYS", "local_slot"]

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def local_slot(moment_ms: int, tz: ZoneInfo) -> tuple[int, int]:
    """Return (weekday with Monday 0, hour 0-23) of ``moment_ms`` on the wall clock of ``tz``."""
    local = datetime.fromtimestamp(moment_ms / 1000, UTC).astimezone(tz)
    return local.weekday(), local.hour


def _grid(times: Iterable[int], tz: ZoneInfo) -> list[list[int]]:
    grid = [[0] * 24 for _ in WEEKDAYS]
    for at in times:
        weekday, hour = local_slot(at, tz)
        grid[weekday][hour] += 1
    return grid


def _section(conversations: list[int], messages: list[int], tz: ZoneInfo) -> dict[str, Any]:
    return {
        "conversations": _grid(conversations, tz),
        "messages": _grid(messages, tz),
        "totals": {"conversations": len(conversations), "messages": len(messages)},
    }


def _grid_section(
    conversations: Mapping[tuple[int, int], int], messages: Mapping[tuple[int, int], int]
) -> dict[str, Any]:
    return {
        "conversations": [
            [conversations.get((day, hour), 0) for hour in range(24)] for day in range(7)
        ],
        "messages": [[messages.get((day, hour), 0) for hour in range(24)] for day in range(7)],
        "totals": {
            "conversations": sum(conversations.values()),
            "messages": sum(messages.values()),
        },
    }


def _from_grids(
    flt: MetricFilter, grids: Mapping[Any, Mapping[str, Mapping[tuple[int, int], int]]]
) -> dict[str, Any]:
    conversations: dict[tuple[int, int], int] = defaultdict(int)
    messages: dict[tuple[int, int], int] = defaultdict(int)
    for grid in grids.values():
        for cell, count in grid.get("conversations", {}).items():
            conversations[cell] += count
        for cell, count in grid.get("messages", {}).items():
            messages[cell] += count
    result: dict[str, Any] = {
        "metric": "heatmap",
        "filters": flt.describe(),
        "weekdays": list(WEEKDAYS),
        "hours": list(range(24)),
        **_grid_section(conversations, messages),
    }
    if flt.group_by is not None:
        keys = [key for key, grid in grids.items() if sum(grid.get("conversations", {}).values())]
        result["groups"] = [
            {
                "group": group_label(key),
                **_grid_section(
                    grids[key].get("conversations", {}), grids[key].get("messages", {})
                ),
            }
            for key in sorted(keys, key=group_label)
        ]
    return result


def heatmap(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Count conversations by start and messages by their own time per weekday and hour."""
    # Imported here: the rollup module reuses local_slot from this one.
    from chatmw.metrics.heatmap_rollups import heatmap_counts

    grids = heatmap_counts(engine, flt)
    if grids is not None:
        return _from_grids(flt, grids)
    scope = conversation_scope(flt).subquery()
    conversations = select(scope.c.group_key, Conversation.started_at_ms).join(
        Conversation, Conversation.id == scope.c.conversation_id
    )
    messages = (
        select(scope.c.group_key, Message.occurred_at_ms)
        .join(Message, Message.conversation_id == scope.c.conversation_id)
        .where(Message.kind.not_in(UNTIMED_KINDS))
    )
    with engine.connect() as connection:
        started = [(row[0], row[1]) for row in connection.execute(conversations)]
        sent = [(row[0], row[1]) for row in connection.execute(messages)]

    result: dict[str, Any] = {
        "metric": "heatmap",
        "filters": flt.describe(),
        "weekdays": list(WEEKDAYS),
        "hours": list(range(24)),
    }
    result.update(_section([at for _, at in started], [at for _, at in sent], flt.tz))
    if flt.group_by is not None:
        keys = sorted({key for key, _ in started}, key=group_label)
        result["groups"] = [
            {
                "group": group_label(key),
                **_section(
                    [at for k, at in started if k == key],
                    [at for k, at in sent if k == key],
                    flt.tz,
                ),
            }
            for key in keys
        ]
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(group["group"], group) for group in result.get("groups", [])]
    rows = []
    for group, section in sections:
        for weekday, name in enumerate(WEEKDAYS):
            for hour in range(24):
                rows.append(
                    {
                        "group": group,
                        "weekday": name,
                        "hour": hour,
                        "conversations": section["conversations"][weekday][hour],
                        "messages": section["messages"][weekday][hour],
                    }
                )
    return rows


HEATMAP = register(
    MetricSpec(
        name="heatmap",
        summary="Conversations and messages by weekday and hour",
        description=(
            "Two 7 x 24 grids of counts, indexed `[weekday][hour]` with Monday = 0 and hours 0 to "
            "23 of the wall clock in `tz`. `conversations` counts each conversation of the window "
            "at the time it started. `messages` counts the messages of those conversations at "
            "their own times (survey prompts and answers and reactions are not counted). On a "
            "daylight-saving change the skipped hour gets nothing, and both passes of the "
            "repeated hour count in the same cell. `totals` gives the sum of each grid. Counts "
            "are totals over the window, not averages per week."
        ),
        compute=heatmap,
        rows=_rows,
    )
)
