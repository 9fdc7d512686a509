"""The conversations a filter selects, as a SQL subquery every metric joins on."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, literal, select
from sqlalchemy.orm import aliased

from chatmw.metrics.filters import TOUCH_FIELDS, MetricFilter
from chatmw.store.models import Conversation, ConversationAttribute, Touch

__all__ = ["conversation_scope", "UNKNOWN_GROUP"]

# The group key of conversations that lack the grouped attribute or touch field.
UNKNOWN_GROUP = "(none)"


def conversation_scope(flt: MetricFilter, window: bool = True) -> Select[Any]:
    """Select ``conversation_id`` and ``group_key`` of the conversations ``flt`` covers.

    With ``window`` false the time window is ignored (for metrics that bound their own
    rows by time, such as message volume).
    """
    conversation = Conversation
    touch_column = (
        conversation.first_touch_id if flt.touch == "first" else conversation.last_touch_id
    )
    touch = aliased(Touch)
    needs_touch = bool(flt.touch_filters) or (
        flt.group_by is not None and flt.group_by.kind in TOUCH_FIELDS
    )

    group_key: Any = literal(None)
    if flt.group_by is not None:
        if flt.group_by.kind == "channel":
            group_key = conversation.channel
        elif flt.group_by.kind == "attr":
            grouped = aliased(ConversationAttribute)
            group_key = (
                select(grouped.value)
                .where(
                    grouped.conversation_id == conversation.id, grouped.name == flt.group_by.name
                )
                .scalar_subquery()
            )
        else:
            group_key = getattr(touch, TOUCH_FIELDS[flt.group_by.kind])

    statement = select(conversation.id.label("conversation_id"), group_key.label("group_key"))
    if needs_touch:
        statement = statement.outerjoin(touch, touch.id == touch_column)
    conditions = []
    if window and flt.since_ms is not None:
        conditions.append(conversation.started_at_ms >= flt.since_ms)
    if window and flt.until_ms is not None:
        conditions.append(conversation.started_at_ms < flt.until_ms)
    if flt.channels:
        conditions.append(conversation.channel.in_(flt.channels))
    for name, value in flt.attributes.items():
        attribute = aliased(ConversationAttribute)
        statement = statement.join(
            attribute,
            and_(
                attribute.conversation_id == conversation.id,
                attribute.name == name,
                attribute.value == value,
            ),
        )
    for name, value in flt.touch_filters.items():
        conditions.append(getattr(touch, TOUCH_FIELDS[name]) == value)
    if conditions:
        statement = statement.where(*conditions)
    return statement


def group_label(value: Any) -> str:
    """Return the group key as shown in results."""
    return UNKNOWN_GROUP if value is None else str(value)
