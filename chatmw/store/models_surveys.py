"""Tables of post-chat surveys: one survey per conversation, its sends, the web outbox.

``survey_addresses`` keeps the platform ids of users whose stored ids are pseudonyms.

A survey row follows one conversation from scheduling to its answer. Every message the
dispatcher sends for it (the prompt, a re-ask, the follow-up, the thanks) is a row of
``survey_sends``, claimed by exactly one dispatcher before it goes out. The web widget has
no push channel, so messages for it wait in ``web_outbox`` until the widget fetches them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from chatmw.store.models import Base

__all__ = [
    "Survey",
    "SurveySend",
    "WebOutboxMessage",
    "SurveyConfigDocument",
    "SurveyAddress",
    "SURVEY_STATES",
    "SEND_STATES",
]

# scheduled: prompt waiting for its time; waiting: conversation reopened, not surveyed until
# it ends again; sent: prompt out, score awaited; answered: score stored; unanswered: no
# usable score in time; failed: the prompt could not be sent; skipped: not sent (sampling,
# cooldown, messaging window), with the reason in ``reason``.
SURVEY_STATES = ("scheduled", "waiting", "sent", "answered", "unanswered", "failed", "skipped")
# due: may be claimed once due_at_ms has passed; sending: claimed by one dispatcher; waiting:
# held back while the conversation is open again.
SEND_STATES = ("due", "sending", "sent", "failed", "skipped", "waiting")


class Survey(Base):
    """One survey of one conversation (at most one per conversation)."""

    __tablename__ = "surveys"
    __table_args__ = (
        UniqueConstraint("conversation_id", name="uq_surveys_conversation"),
        Index("ix_surveys_contact", "contact_id", "sent_at_ms"),
        Index("ix_surveys_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id", ondelete="SET NULL"))
    channel: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    trigger: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str] = mapped_column(String(16))
    # The conversation end (explicit or by inactivity) the schedule was computed from.
    basis_ms: Mapped[int | None] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    due_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    sent_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    answer_deadline_ms: Mapped[int | None] = mapped_column(BigInteger)
    comment_window_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    comment_deadline_ms: Mapped[int | None] = mapped_column(BigInteger)
    answered_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    score: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    commented_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    reasks: Mapped[int] = mapped_column(Integer, default=0)
    # The NPS range ("0-6", "7-8", "9-10") chosen in the first step of a two-step question.
    score_range: Mapped[str | None] = mapped_column(String(8))
    used_template: Mapped[bool] = mapped_column(Boolean, default=False)


class SurveySend(Base):
    """One message sent for a survey; ``purpose`` is prompt, reask, step2, follow_up or thanks."""

    __tablename__ = "survey_sends"
    __table_args__ = (
        UniqueConstraint("survey_id", "purpose", name="uq_survey_sends_purpose"),
        Index("ix_survey_sends_due", "state", "due_at_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    survey_id: Mapped[int] = mapped_column(ForeignKey("surveys.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    due_at_ms: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    sent_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    platform_message_id: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)


class WebOutboxMessage(Base):
    """A message for a web widget visitor, kept until the widget fetches it."""

    __tablename__ = "web_outbox"
    __table_args__ = (Index("ix_web_outbox_pending", "user_id", "delivered_at_ms"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    delivered_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class SurveyAddress(Base):
    """The platform id to send surveys to, for a user whose stored id is a pseudonym.

    ``user_id`` is the id as stored in ``contacts.external_id``; ``platform_id`` is the
    id the platform needs (a PSID, a phone number, a widget visitor id).
    """

    __tablename__ = "survey_addresses"
    __table_args__ = (UniqueConstraint("channel", "user_id", name="uq_survey_addresses_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(255))
    platform_id: Mapped[str] = mapped_column(String(255))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class SurveyConfigDocument(Base):
    """The survey configuration set through the API; when present it replaces the file's."""

    __tablename__ = "survey_config"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


# The tables as ``Table`` objects, for core statements (a mapped class types ``__table__``
# as a plain ``FromClause``).
SURVEYS: Table = Base.metadata.tables["surveys"]
SURVEY_SENDS: Table = Base.metadata.tables["survey_sends"]
SURVEY_CONFIG: Table = Base.metadata.tables["survey_config"]
SURVEY_ADDRESSES: Table = Base.metadata.tables["survey_addresses"]
