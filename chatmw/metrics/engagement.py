"""Engagement: reached users who wrote, and conversations with a real exchange."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import aliased

from chatmw.metrics.engagement_rollups import ChannelReach, EngagementCounts, engagement_counts
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.metrics.stats import rate
from chatmw.store.models import Conversation, Exposure, Message

__all__ = ["engagement", "ENGAGEMENT"]


def _exposed(engine: Engine, flt: MetricFilter) -> tuple[dict[str, set[int]], set[str]]:
    """Return contacts exposed in the window per channel, and the channels with any exposure."""
    window = select(Exposure.channel, Exposure.contact_id).distinct()
    known = select(Exposure.channel).distinct()
    if flt.channels:
        window = window.where(Exposure.channel.in_(flt.channels))
        known = known.where(Exposure.channel.in_(flt.channels))
    if flt.since_ms is not None:
        window = window.where(Exposure.occurred_at_ms >= flt.since_ms)
    if flt.until_ms is not None:
        window = window.where(Exposure.occurred_at_ms < flt.until_ms)
    reached: dict[str, set[int]] = defaultdict(set)
    with engine.connect() as connection:
        for channel, contact_id in connection.execute(window):
            reached[channel].add(contact_id)
        channels = set(connection.execute(known).scalars())
    return reached, channels


def _conversations(
    engine: Engine, flt: MetricFilter
) -> list[tuple[Any, str, int | None, int, bool]]:
    """Return group key, channel, contact, user messages and whether a bot or agent opened it."""
    scope = conversation_scope(flt).subquery()
    first = aliased(Message)
    first_id = (
        select(first.id)
        .where(first.conversation_id == Conversation.id)
        .order_by(first.occurred_at_ms, first.id)
        .limit(1)
        .scalar_subquery()
    )
    opener = aliased(Message)
    statement = (
        select(
            scope.c.group_key,
            Conversation.channel,
            func.coalesce(Conversation.contact_id, opener.contact_id),
            Conversation.user_message_count,
            opener.role,
        )
        .join(Conversation, Conversation.id == scope.c.conversation_id)
        .outerjoin(opener, opener.id == first_id)
    )
    with engine.connect() as connection:
        return [
            (key, channel, contact, int(count or 0), role is not None and role != "user")
            for key, channel, contact, count, role in connection.execute(statement)
        ]


def _raw_counts(
    exposed: Mapping[str, set[int]],
    known: set[str],
    conversations: list[tuple[Any, str, int | None, int, bool]],
) -> EngagementCounts:
    """Count the engagement figures from the rows of :func:`_exposed` and :func:`_conversations`."""
    proactive: dict[str, set[int]] = defaultdict(set)
    writers: dict[str, set[int]] = defaultdict(set)
    counts = EngagementCounts(known=known)
    for _, channel, contact, user_messages, bot_opened in conversations:
        counts.conversations[channel] = counts.conversations.get(channel, 0) + 1
        if user_messages >= 2:
            engaged = counts.engaged_conversations
            engaged[channel] = engaged.get(channel, 0) + 1
        if contact is None:
            continue
        if bot_opened:
            proactive[channel].add(contact)
        if user_messages >= 1:
            writers[channel].add(contact)
    for channel in set(exposed) | set(proactive) | set(writers):
        reached = exposed.get(channel, set()) | proactive.get(channel, set())
        counts.reach[channel] = ChannelReach(
            exposed=len(exposed.get(channel, set())),
            proactive=len(proactive.get(channel, set())),
            writing=len(writers.get(channel, set())),
            reach=len(reached),
            engaged=len(reached & writers.get(channel, set())),
        )
    return counts


def _reach(flt: MetricFilter, counts: EngagementCounts) -> dict[str, Any]:
    known = counts.known
    channels = sorted(set(flt.channels) | known | set(counts.conversations))
    rows, notes = [], []
    total_reach = total_engaged = 0
    measured = False
    for channel in channels:
        figures = counts.reach.get(channel, ChannelReach())
        row: dict[str, Any] = {
            "channel": channel,
            "exposed_users": figures.exposed,
            "proactive_users": figures.proactive,
            "users_writing": figures.writing,
        }
        if channel not in known and not figures.proactive:
            note = f"no exposure data for channel {channel}"
            rows.append(
                {
                    **row,
                    "reach": None,
                    "reach_note": note,
                    "engaged_users": None,
                    "engagement_rate": None,
                }
            )
            notes.append(note)
            continue
        row.update(
            reach=figures.reach,
            engaged_users=figures.engaged,
            engagement_rate=rate(figures.engaged, figures.reach),
        )
        if channel not in known:
            row["reach_note"] = (
                f"no exposure data for channel {channel}; reach counts proactive conversations only"
            )
        rows.append(row)
        measured = True
        total_reach += figures.reach
        total_engaged += figures.engaged

    # With no channel that has reach data, a total of 0 would read as a measurement.
    return {
        "reach": total_reach if measured else None,
        "engaged_users": total_engaged if measured else None,
        "engagement_rate": rate(total_engaged, total_reach),
        "reach_notes": notes,
        "channels": rows,
    }


def _exchanges(conversations: int, engaged: int) -> dict[str, Any]:
    return {
        "conversations": conversations,
        "engaged_conversations": engaged,
        "conversation_engagement_rate": rate(engaged, conversations),
    }


def _counts(
    engine: Engine, flt: MetricFilter
) -> tuple[EngagementCounts, list[tuple[Any, str, int | None, int, bool]] | None]:
    """Return the engagement figures, and the raw conversation rows when they were read."""
    counted = engagement_counts(engine, flt)
    if counted is not None:
        return counted, None
    exposed, known = _exposed(engine, flt)
    conversations = _conversations(engine, flt)
    return _raw_counts(exposed, known, conversations), conversations


def _raw_groups(
    conversations: list[tuple[Any, str, int | None, int, bool]],
) -> list[dict[str, Any]]:
    by_group: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for key, _, _, user_messages, _ in conversations:
        by_group[key][0] += 1
        by_group[key][1] += 1 if user_messages >= 2 else 0
    return [
        {"group": group_label(key), **_exchanges(*totals)}
        for key, totals in sorted(by_group.items(), key=lambda item: group_label(item[0]))
    ]


def engagement(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute the user engagement rate per channel and the conversation engagement rate."""
    counts, conversations = _counts(engine, flt)
    result: dict[str, Any] = {
        "metric": "engagement",
        "filters": flt.describe(),
        "users": _reach(flt, counts),
        **_exchanges(
            sum(counts.conversations.values()), sum(counts.engaged_conversations.values())
        ),
    }
    if flt.attributes or flt.touch_filters:
        result["users"]["reach_notes"].append(
            "reach ignores attribute and touch filters (exposures have neither); "
            "engaged users are counted in the filtered conversations only"
        )
    if flt.group_by is None:
        return result
    if flt.group_by.kind == "channel":
        # Every channel with a conversation in the window is a group.
        result["groups"] = [
            {
                "group": group_label(channel),
                **_exchanges(total, counts.engaged_conversations.get(channel, 0)),
            }
            for channel, total in sorted(counts.conversations.items())
            if total
        ]
    else:
        # Rollups serve no other grouping, so the raw rows were read.
        result["groups"] = _raw_groups(conversations or [])
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    names = ("conversations", "engaged_conversations", "conversation_engagement_rate")
    rows = [
        {
            "split": "channel",
            "group": row["channel"],
            **{k: v for k, v in row.items() if k != "channel"},
        }
        for row in result["users"]["channels"]
    ]
    rows.append(
        {
            "split": "(all)",
            "group": "(all)",
            "reach": result["users"]["reach"],
            "engaged_users": result["users"]["engaged_users"],
            "engagement_rate": result["users"]["engagement_rate"],
            **{name: result[name] for name in names},
        }
    )
    rows.extend(
        {"split": "group_by", "group": group["group"], **{name: group[name] for name in names}}
        for group in result.get("groups", [])
    )
    return rows


ENGAGEMENT = register(
    MetricSpec(
        name="engagement",
        summary="Engagement rate of reached users and of conversations",
        description=(
            "**User engagement rate** (`users.engagement_rate`) = reached users who wrote / "
            "reached users, per channel (`users.channels`) and over the channels with reach "
            "data.\n\n"
            "- **Reached users** (`reach`): distinct users with a widget impression or open (an "
            "`exposures` row) in the window, plus users who received a proactive conversation "
            "(one whose first message came from the bot or an agent) that started in the "
            "window.\n"
            "- **Reached users who wrote** (`engaged_users`): those of them with a conversation "
            "that started in the window and has at least one user message.\n"
            "- A channel with no exposure rows at all and no proactive conversation in the "
            "window has `reach: null`, `engagement_rate: null` and a `reach_note` such as `no "
            "exposure data for channel messenger`; it is left out of the totals and listed in "
            "`reach_notes`. A channel with proactive conversations but no exposures counts only "
            "those, and says so in `reach_note`. When no channel has reach data, the totals "
            "are `null` as well.\n\n"
            "**Conversation engagement rate** (`conversation_engagement_rate`) = conversations "
            "with at least two user messages / conversations that started in the window; "
            "`group_by` splits this part (`groups`).\n\n"
            "Rates are `null` when their denominator is 0. Reach ignores attribute and touch "
            "filters, which exposures do not have."
        ),
        compute=engagement,
        rows=_rows,
    )
)
