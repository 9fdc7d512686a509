"""SQLAlchemy models of the store.

Times are integer milliseconds since the Unix epoch in UTC (columns ending in ``_ms``), so
that SQLite and PostgreSQL compare, sort and bucket them the same way. The schema changes
only through the Alembic migrations in ``migrations/``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Contact",
    "Conversation",
    "ConversationAttribute",
    "Message",
    "MessageStatus",
    "Touch",
    "Exposure",
    "RawPayload",
]


class Base(DeclarativeBase):
    """Declarative base of every chatmw table."""


class Contact(Base):
    """A person as one channel identity (a Messenger PSID, a WhatsApp number, a web visitor)."""

    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("channel", "external_id", name="uq_contacts_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(255))
    first_seen_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_ms: Mapped[int] = mapped_column(BigInteger)
    last_user_message_ms: Mapped[int | None] = mapped_column(BigInteger)
    first_touch_id: Mapped[int | None] = mapped_column(Integer)
    last_touch_id: Mapped[int | None] = mapped_column(Integer)


class Conversation(Base):
    """A conversation: a source's own conversation id, or a session of one contact."""

    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("channel", "external_id", name="uq_conversations_external"),
        Index("ix_conversations_started", "started_at_ms"),
        Index("ix_conversations_contact", "contact_id", "started_at_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(255))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id", ondelete="SET NULL"))
    started_at_ms: Mapped[int] = mapped_column(BigInteger)
    last_message_at_ms: Mapped[int] = mapped_column(BigInteger)
    ended_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    ended_reason: Mapped[str | None] = mapped_column(String(64))
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    user_message_count: Mapped[int] = mapped_column(Integer, default=0)
    first_response_ms: Mapped[float | None] = mapped_column(Float)
    first_response_role: Mapped[str | None] = mapped_column(String(16))
    resolved: Mapped[bool | None] = mapped_column(Boolean)
    handed_off: Mapped[bool] = mapped_column(Boolean, default=False)
    intent: Mapped[str | None] = mapped_column(String(128))
    last_step: Mapped[str | None] = mapped_column(String(128))
    first_touch_id: Mapped[int | None] = mapped_column(Integer)
    last_touch_id: Mapped[int | None] = mapped_column(Integer)


class ConversationAttribute(Base):
    """A named attribute of a conversation (``company``, ``plan``, ...), filterable and groupable."""

    __tablename__ = "conversation_attributes"
    __table_args__ = (Index("ix_conversation_attributes_value", "name", "value"),)

    # A conversation id without a foreign key, as in messages: the writer resolves it in the
    # transaction that inserts the row. Erasure and retention delete a conversation's
    # attributes themselves (chatmw/security/erasure.py).
    conversation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Message(Base):
    """One stored message.

    ``response_ms`` is set on a bot or agent message that answers a run of user messages:
    the time from the first user message of that run. ``is_first_response`` marks the
    conversation's first such answer. Both are recomputed whenever the conversation changes,
    so late and out-of-order messages give the same figures as ordered ones.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("key", name="uq_messages_key"),
        Index("ix_messages_conversation", "conversation_id", "occurred_at_ms"),
        Index("ix_messages_occurred", "occurred_at_ms"),
        Index("ix_messages_platform_id", "channel", "platform_message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    # Ids of a conversation and a contact without foreign keys, which would only repeat the
    # writer's own lookups on every insert. Erasure and retention delete a conversation's
    # messages and a contact's messages themselves (chatmw/security/erasure.py).
    conversation_id: Mapped[int] = mapped_column(Integer)
    contact_id: Mapped[int | None] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32), default="message")
    text: Mapped[str | None] = mapped_column(Text)
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    platform_message_id: Mapped[str | None] = mapped_column(String(255))
    reply_to: Mapped[str | None] = mapped_column(String(255))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    response_ms: Mapped[float | None] = mapped_column(Float)
    is_first_response: Mapped[bool] = mapped_column(Boolean, default=False)
    intent: Mapped[str | None] = mapped_column(String(128))
    sentiment: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str | None] = mapped_column(String(16))
    status_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class MessageStatus(Base):
    """One delivery status of an outbound message; each status keeps its own time."""

    __tablename__ = "message_statuses"
    __table_args__ = (
        UniqueConstraint("channel", "platform_message_id", "status", name="uq_message_statuses"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    platform_message_id: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_title: Mapped[str | None] = mapped_column(Text)


class Touch(Base):
    """An attribution touch on a contact and, where known, a conversation."""

    __tablename__ = "touches"
    __table_args__ = (
        UniqueConstraint("key", name="uq_touches_key"),
        Index("ix_touches_contact", "contact_id", "occurred_at_ms"),
        Index("ix_touches_conversation", "conversation_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    channel: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str | None] = mapped_column(String(255))
    medium: Mapped[str | None] = mapped_column(String(255))
    campaign: Mapped[str | None] = mapped_column(String(255))
    term: Mapped[str | None] = mapped_column(String(255))
    content: Mapped[str | None] = mapped_column(String(255))
    ad_id: Mapped[str | None] = mapped_column(String(255))
    ref: Mapped[str | None] = mapped_column(String(255))
    click_id: Mapped[str | None] = mapped_column(String(512))
    referrer: Mapped[str | None] = mapped_column(Text)
    landing_url: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class Exposure(Base):
    """A user reached without writing: widget impressions and opens, proactive sends."""

    __tablename__ = "exposures"
    __table_args__ = (
        UniqueConstraint("key", name="uq_exposures_key"),
        Index("ix_exposures_occurred", "occurred_at_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class RawPayload(Base):
    """A body a source accepted but could not parse, kept for inspection."""

    __tablename__ = "raw_payloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(64))
    received_at_ms: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    body: Mapped[bytes] = mapped_column(LargeBinary)
