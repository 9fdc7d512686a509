"""Rollup tables: counts per 15-minute UTC slot, recomputed from raw rows.

Every row is a pure function of the raw rows whose times fall in its slots, so the
refresher (``chatmw.metrics.rollup_refresh``) can rebuild any slot from scratch. See
docs/rollups.md for the design.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from chatmw.store.models import Base

__all__ = [
    "RollupConversations",
    "RollupMessages",
    "RollupUsers",
    "RollupStarters",
    "RollupFirsts",
    "RollupStarted",
    "RollupParticipants",
    "RollupResponses",
    "RollupContactSets",
    "RollupSentiment",
    "RollupEngaged",
    "RollupProactive",
    "RollupWriters",
    "RollupExposed",
    "RollupState",
    "SLOT_MS",
    "LEVEL_SLOT",
    "LEVEL_HOUR",
    "LEVEL_DAY",
    "LEVEL_WEEK",
    "LEVEL_WIDTH_MS",
]

# The width of a rollup slot. Slots start at multiples of it after the Unix epoch (UTC).
SLOT_MS = 15 * 60 * 1000

# Levels of rollup_responses: rows per slot, and sums of them per UTC hour, per UTC day and
# per 7 days from the Unix epoch (weeks that start on a Thursday, 00:00 UTC).
LEVEL_SLOT = 0
LEVEL_HOUR = 1
LEVEL_DAY = 2
LEVEL_WEEK = 3
LEVEL_WIDTH_MS = {
    LEVEL_SLOT: SLOT_MS,
    LEVEL_HOUR: 3_600_000,
    LEVEL_DAY: 86_400_000,
    LEVEL_WEEK: 7 * 86_400_000,
}


class RollupConversations(Base):
    """Conversations that started in a slot, per conversation channel."""

    __tablename__ = "rollup_conversations"

    slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)


class RollupMessages(Base):
    """Timed messages per conversation start slot, message slot and conversation channel.

    Survey prompts, survey answers and reactions are not counted, as in the metrics.
    """

    __tablename__ = "rollup_messages"
    __table_args__ = (Index("ix_rollup_messages_slot", "slot_ms", "channel"),)

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    messages: Mapped[int] = mapped_column(Integer)


class RollupUsers(Base):
    """A contact that sent a timed user message in a slot, per conversation channel."""

    __tablename__ = "rollup_users"

    slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupStarters(Base):
    """A contact whose conversation started in a slot, per conversation channel."""

    __tablename__ = "rollup_starters"

    slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupFirsts(Base):
    """The start of a contact's first conversation on a channel (not slotted: exact ms).

    ``first_rank`` compares it with the contact's first start on any channel. Rank 0 marks
    the one row that counts the contact as new over all channels (the earliest, then the
    first channel by name). Rank 1 marks other rows at that same start, and 2 later ones.
    """

    __tablename__ = "rollup_firsts"
    __table_args__ = (
        Index("ix_rollup_firsts_started", "first_started_ms"),
        Index("ix_rollup_firsts_rank", "first_rank", "first_started_ms"),
        Index("ix_rollup_firsts_rank_channel", "first_rank", "channel"),
        # Covering indexes for retention cohorts: over all channels, and on one channel.
        Index(
            "ix_rollup_firsts_cohort",
            "first_rank",
            "first_started_ms",
            "channel",
            "contact_id",
            "second_any_ms",
        ),
        Index(
            "ix_rollup_firsts_channel_cohort",
            "channel",
            "first_started_ms",
            "contact_id",
            "second_started_ms",
        ),
    )

    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    first_started_ms: Mapped[int] = mapped_column(BigInteger)
    first_rank: Mapped[int] = mapped_column(SmallInteger, default=2, server_default="2")
    # The start of the contact's second conversation on this channel, and over all channels
    # (the same on every row of the contact). Each is null when there is no such conversation.
    second_started_ms: Mapped[int | None] = mapped_column(BigInteger)
    second_any_ms: Mapped[int | None] = mapped_column(BigInteger)


class RollupStarted(Base):
    """Timed messages by role, per conversation start slot and conversation channel."""

    __tablename__ = "rollup_started"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    messages: Mapped[int] = mapped_column(Integer)
    user_messages: Mapped[int] = mapped_column(Integer)
    bot_messages: Mapped[int] = mapped_column(Integer)
    agent_messages: Mapped[int] = mapped_column(Integer)


class RollupParticipants(Base):
    """A contact that sent a timed user message in a conversation that started in a slot."""

    __tablename__ = "rollup_participants"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupResponses(Base):
    """Histograms of first-response and reply times per conversation start and channel.

    ``level`` is :data:`LEVEL_SLOT` (``start_ms`` is a slot), :data:`LEVEL_HOUR`,
    :data:`LEVEL_DAY` or :data:`LEVEL_WEEK` (the sum of the rows one level below in that
    hour, day or week). ``figure`` is
    ``first_response`` or ``reply_time``, ``role`` the responding message's role and
    ``bucket`` a bucket of ``chatmw.metrics.histogram``. Durations are in ms.
    """

    __tablename__ = "rollup_responses"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    figure: Mapped[str] = mapped_column(String(16), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    total_ms: Mapped[float] = mapped_column(Float)
    min_ms: Mapped[float] = mapped_column(Float)
    max_ms: Mapped[float] = mapped_column(Float)


class RollupSentiment(Base):
    """Sentiment sums of the conversations that started in a slot, per conversation channel.

    Message figures count user messages of kind ``message``; ``score_sum`` sums their
    scores. Conversation means and shifts are rounded to 4 decimals and summed in units of
    1/10,000 (``*_e4``). See ``chatmw.metrics.sentiment_rollups``.
    """

    __tablename__ = "rollup_sentiment"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    messages: Mapped[int] = mapped_column(Integer)
    scored: Mapped[int] = mapped_column(Integer)
    score_sum: Mapped[float] = mapped_column(Float)
    positive: Mapped[int] = mapped_column(Integer)
    neutral: Mapped[int] = mapped_column(Integer)
    negative: Mapped[int] = mapped_column(Integer)
    conv_scored: Mapped[int] = mapped_column(Integer)
    conv_mean_e4: Mapped[int] = mapped_column(BigInteger)
    conv_positive: Mapped[int] = mapped_column(Integer)
    conv_neutral: Mapped[int] = mapped_column(Integer)
    conv_negative: Mapped[int] = mapped_column(Integer)
    shift_count: Mapped[int] = mapped_column(Integer)
    shift_e4: Mapped[int] = mapped_column(BigInteger)
    improved: Mapped[int] = mapped_column(Integer)
    worsened: Mapped[int] = mapped_column(Integer)
    unchanged: Mapped[int] = mapped_column(Integer)


class RollupEngaged(Base):
    """Conversations with at least two user messages, per start slot and conversation channel."""

    __tablename__ = "rollup_engaged"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)


class RollupProactive(Base):
    """A contact that received a conversation whose first message came from the bot or an agent.

    Keyed by the conversation's start slot and channel. The contact is the conversation's,
    or the first message's when the conversation has none, as in the ``engagement`` metric.
    """

    __tablename__ = "rollup_proactive"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupWriters(Base):
    """A contact with a conversation that has at least one user message, by its start slot.

    The contact is chosen as in :class:`RollupProactive`.
    """

    __tablename__ = "rollup_writers"

    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupExposed(Base):
    """A contact with an exposure (widget impression or open) in a slot, per channel."""

    __tablename__ = "rollup_exposed"

    slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class RollupContactSets(Base):
    """The contacts of a slot contact table over one UTC day or epoch week, as a bitset.

    ``kind`` names the table (``users``, ``starters``, ``participants``, ``proactive``,
    ``writers`` or ``exposed``); ``contacts``
    is a zlib-compressed little-endian bitset whose bit ``i`` is contact id ``i``
    (``chatmw.metrics.contact_sets``).
    """

    __tablename__ = "rollup_contact_sets"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    contacts: Mapped[bytes] = mapped_column(LargeBinary)


class RollupState(Base):
    """The refresher's progress: one row, ``id`` 1.

    ``watermark_id`` is the highest message id the rollups include. ``rescan_from_id`` is a
    watermark at least one overlap period old. Each refresh reads the messages above it
    again, so it picks up rows that committed after rows with higher ids.
    """

    __tablename__ = "rollup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    built: Mapped[bool] = mapped_column(Boolean, default=False)
    watermark_id: Mapped[int] = mapped_column(BigInteger, default=0)
    rescan_from_id: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_id: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_at_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    refreshed_at_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    rebuild_token: Mapped[str | None] = mapped_column(String(32))
    rebuild_started_at_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    # The same three watermarks over conversation ids: the writer creates some conversation
    # rows without a message (an update or a touch naming a new conversation).
    conversation_watermark_id: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    conversation_rescan_from_id: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    conversation_pending_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The same three watermarks over exposure ids, for rollup_exposed.
    exposure_watermark_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    exposure_rescan_from_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    exposure_pending_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
