"""Tables of the business figures: conversions, leads and advertising spend.

Amounts are integer micros (millionths of the currency unit). Conversions and recorded
leads name their user and conversation by the source's own ids: ``channel`` plus
``user_id`` or ``conversation_external_id``. The metrics join them to contacts and
conversations when they run, so a conversion recorded before its chat is still
attributed once the chat arrives.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from chatmw.store.models import Base

__all__ = ["Conversion", "Lead", "Spend"]


class Conversion(Base):
    """A conversion; ``key`` is the caller's idempotency key."""

    __tablename__ = "conversions"
    __table_args__ = (
        UniqueConstraint("key", name="uq_conversions_key"),
        Index("ix_conversions_user", "channel", "user_id"),
        Index("ix_conversions_conversation", "channel", "conversation_external_id"),
        Index("ix_conversions_occurred", "occurred_at_ms"),
        Index("ix_conversions_currency", "currency"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(128))
    value_micros: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    channel: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str | None] = mapped_column(String(255))
    conversation_external_id: Mapped[str | None] = mapped_column(String(255))
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class Lead(Base):
    """Contact details a user gave, found in a message or recorded through the API.

    ``value_hash`` is the hex SHA-256 (or HMAC-SHA-256 with the configured key) of the
    normalised value; ``value`` is ``None`` when leads are redacted.
    """

    __tablename__ = "leads"
    __table_args__ = (
        UniqueConstraint("key", name="uq_leads_key"),
        Index("ix_leads_user", "channel", "user_id"),
        Index("ix_leads_conversation", "conversation_id"),
        Index("ix_leads_named", "channel", "conversation_external_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    channel: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(255))
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    conversation_external_id: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    value_hash: Mapped[str] = mapped_column(String(64))
    value: Mapped[str | None] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class Spend(Base):
    """Advertising spend of one day, channel and campaign (``""`` when there is none)."""

    __tablename__ = "spend"
    __table_args__ = (
        UniqueConstraint("day", "channel", "campaign", name="uq_spend_day_channel_campaign"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    channel: Mapped[str] = mapped_column(String(32))
    campaign: Mapped[str] = mapped_column(String(255))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)
