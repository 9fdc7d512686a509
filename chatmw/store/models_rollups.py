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
    Text,
    UniqueConstraint,
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
    "RollupBusinessResponses",
    "RollupBusinessSchedule",
    "RollupContactSets",
    "RollupSentiment",
    "RollupOutcomes",
    "RollupSurveys",
    "RollupQueryTypes",
    "RollupDropoff",
    "RollupDropoffOpen",
    "RollupDropoffSteps",
    "RollupStepSets",
    "RollupConversionLinks",
    "RollupLeadLinks",
    "RollupOrders",
    "RollupEngaged",
    "RollupProactive",
    "RollupWriters",
    "RollupExposed",
    "RollupAttribution",
    "RollupAttributionSets",
    "RollupState",
    "RollupChange",
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


class RollupBusinessResponses(Base):
    """Histograms of first-response and reply times counted in business hours.

    The columns are those of :class:`RollupResponses`. Durations are the business
    milliseconds of each answer under the schedule stored in
    :class:`RollupBusinessSchedule`, with each answer timed by its message's channel
    schedule. Rows are keyed by conversation start and conversation channel.
    """

    __tablename__ = "rollup_business_responses"

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


class RollupBusinessSchedule(Base):
    """The business hours that ``rollup_business_responses`` counts: one row, ``id`` 1.

    ``schedule`` is the canonical JSON of the registered business hours and
    ``fingerprint`` its SHA-256. ``built_fingerprint`` equals ``fingerprint`` once every
    row has been counted with that schedule, and is NULL while the rows still need a
    rebuild. ``rebuild_token`` and ``rebuild_started_at_ms`` claim a running rebuild of
    the table, as in :class:`RollupState`.
    """

    __tablename__ = "rollup_business_schedule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    built_fingerprint: Mapped[str | None] = mapped_column(String(64))
    rebuild_token: Mapped[str | None] = mapped_column(String(32))
    rebuild_started_at_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


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


class RollupOutcomes(Base):
    """Resolution counts of the conversations that started in a slot, hour, day or week.

    ``level`` and ``start_ms`` are as in :class:`RollupResponses`. ``resolved_repeated``
    and ``first_contact_resolved`` use the default repeat window of the ``resolution``
    metric (``chatmw.metrics.resolution.DEFAULT_REPEAT_HOURS``).
    """

    __tablename__ = "rollup_outcomes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)
    resolved: Mapped[int] = mapped_column(Integer)
    resolved_handed_off: Mapped[int] = mapped_column(Integer)
    resolved_repeated: Mapped[int] = mapped_column(Integer)
    first_contact_resolved: Mapped[int] = mapped_column(Integer)


class RollupSurveys(Base):
    """Surveys of the conversations that started in a slot, hour, day or week, by score.

    ``answered`` is true when the survey was sent and has a score, which is then
    ``score``. Other surveys have ``answered`` false and ``score`` 0. ``surveys`` counts
    all the surveys of the row and ``sent`` those whose prompt went out.
    """

    __tablename__ = "rollup_surveys"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    answered: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    score: Mapped[int] = mapped_column(Integer, primary_key=True)
    surveys: Mapped[int] = mapped_column(Integer)
    sent: Mapped[int] = mapped_column(Integer)


class RollupQueryTypes(Base):
    """Conversations per intent and rule type that started in a slot, hour, day or week.

    ``intent`` is the conversation's intent and ``rule_type`` its ``query_type``
    attribute, each ``""`` when missing or empty. The ``csat_*`` columns count the CSAT
    surveys with a score, sent or not, as the ``query-types`` metric does.
    """

    __tablename__ = "rollup_query_types"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    intent: Mapped[str] = mapped_column(String(128), primary_key=True)
    rule_type: Mapped[str] = mapped_column(String(255), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)
    resolved: Mapped[int] = mapped_column(Integer)
    csat_responses: Mapped[int] = mapped_column(Integer)
    csat_satisfied: Mapped[int] = mapped_column(Integer)
    csat_score_sum: Mapped[int] = mapped_column(BigInteger)


class RollupDropoff(Base):
    """Conversations per last step that started in a slot, hour, day or week.

    ``step`` is the step a conversation stopped at (its ``last_step``, else the intent of
    its last bot message, else ``(unknown)``). ``ended`` counts the conversations without
    an outcome (not resolved, no attributed conversion with the default window) whose end
    was reported, and ``open`` those without an outcome and without a reported end, which
    are dropped once idle. See ``chatmw.metrics.dropoff_rollups``.
    """

    __tablename__ = "rollup_dropoff"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    step: Mapped[str] = mapped_column(String(128), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)
    ended: Mapped[int] = mapped_column(Integer)
    open: Mapped[int] = mapped_column(Integer)


class RollupDropoffOpen(Base):
    """The ``open`` conversations of :class:`RollupDropoff` slot rows, by last message slot.

    The primary key starts with ``last_slot_ms``, so a query reads the few rows whose last
    message is not older than its idle cut-off as one index range.
    """

    __tablename__ = "rollup_dropoff_open"
    __table_args__ = (Index("ix_rollup_dropoff_open_start", "start_slot_ms"),)

    last_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    start_slot_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    step: Mapped[str] = mapped_column(String(128), primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)


class RollupDropoffSteps(Base):
    """Conversations per set of steps seen that started in a slot, hour, day or week.

    ``step_set_id`` is a :class:`RollupStepSets` row: the bot message intents and the
    ``last_step`` of the conversation that a ``steps`` list of ``dropoff`` can name.
    """

    __tablename__ = "rollup_dropoff_steps"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    step_set_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversations: Mapped[int] = mapped_column(Integer)


class RollupStepSets(Base):
    """A distinct set of steps: its sorted steps as a JSON array and their SHA-256."""

    __tablename__ = "rollup_step_sets"
    __table_args__ = (UniqueConstraint("fingerprint", name="uq_rollup_step_sets_fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    steps: Mapped[str] = mapped_column(Text)


# Columns of the slot indexes of the link tables.
CONVERSION_LINK_INDEX = (
    "start_slot_ms",
    "channel",
    "by_user",
    "first_link",
    "conversion_id",
    "conversation_id",
    "value_micros",
    "name",
    "first_campaign",
    "last_campaign",
)
LEAD_LINK_INDEX = (
    "start_slot_ms",
    "channel",
    "contact_id",
    "occurred_at_ms",
    "kind",
    "origin",
    "score",
    "first_source",
    "last_source",
    "lead_id",
)


class RollupConversionLinks(Base):
    """One attribution of a conversion to a conversation, with the default attribution window.

    ``start_slot_ms`` and ``channel`` are the conversation's start slot and channel; the
    campaigns are those of its first and last touch. See ``chatmw.metrics.conversion_rollups``.
    """

    __tablename__ = "rollup_conversion_links"
    # The slot index contains every column the queries read, so they scan it alone.
    __table_args__ = (Index("ix_rollup_conversion_links_slot", *CONVERSION_LINK_INDEX),)

    conversion_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_slot_ms: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str] = mapped_column(String(32))
    value_micros: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    first_campaign: Mapped[str | None] = mapped_column(String(255))
    last_campaign: Mapped[str | None] = mapped_column(String(255))
    # 1 when the conversion names only a user (it may have several rows), else 0.
    by_user: Mapped[int] = mapped_column(SmallInteger)
    # 1 on the row of the conversation's lowest conversion id, else 0.
    first_link: Mapped[int] = mapped_column(SmallInteger)


class RollupLeadLinks(Base):
    """A lead with the conversation it counts for (the ``leads`` metric's rule).

    ``start_slot_ms`` and ``channel`` are the conversation's; ``contact_id`` is the lead's
    user; the sources are those of the conversation's first and last touch.
    """

    __tablename__ = "rollup_lead_links"
    __table_args__ = (
        # The slot index contains every column the queries read, so they scan it alone.
        Index("ix_rollup_lead_links_slot", *LEAD_LINK_INDEX),
        Index("ix_rollup_lead_links_contact", "contact_id"),
    )

    lead_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(Integer)
    start_slot_ms: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str] = mapped_column(String(32))
    contact_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    first_source: Mapped[str | None] = mapped_column(String(255))
    last_source: Mapped[str | None] = mapped_column(String(255))


class RollupOrders(Base):
    """A conversion with the contact it resolves to (not slotted: kept per contact).

    Conversions that resolve to no contact have no row. ``chatmw.metrics.conversion_rollups``
    recomputes the rows of the contacts that the refresher finds changed.
    """

    __tablename__ = "rollup_orders"
    __table_args__ = (
        Index(
            "ix_rollup_orders_contact",
            "contact_id",
            "occurred_at_ms",
            "value_micros",
            "conversion_id",
        ),
    )

    conversion_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contact_id: Mapped[int] = mapped_column(Integer)
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)
    value_micros: Mapped[int] = mapped_column(BigInteger)


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


class RollupAttribution(Base):
    """A conversation's start slot, channel, contact and touch labels, for ``attribution``.

    Each touch column contains the label the metric shows for that field of the first or last
    touch: the value, or ``(none)`` when the conversation has no such touch or value. See
    ``chatmw.metrics.attribution_rollups``.
    """

    __tablename__ = "rollup_attribution"
    __table_args__ = (Index("ix_rollup_attribution_slot", "start_slot_ms", "channel"),)

    conversation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_slot_ms: Mapped[int] = mapped_column(BigInteger)
    channel: Mapped[str] = mapped_column(String(32))
    contact_id: Mapped[int | None] = mapped_column(Integer)
    first_source: Mapped[str] = mapped_column(String(255))
    first_medium: Mapped[str] = mapped_column(String(255))
    first_campaign: Mapped[str] = mapped_column(String(255))
    first_ad: Mapped[str] = mapped_column(String(255))
    last_source: Mapped[str] = mapped_column(String(255))
    last_medium: Mapped[str] = mapped_column(String(255))
    last_campaign: Mapped[str] = mapped_column(String(255))
    last_ad: Mapped[str] = mapped_column(String(255))


class RollupAttributionSets(Base):
    """The conversations and contacts of one touch label over a UTC day or epoch week.

    ``level`` is ``LEVEL_DAY`` or ``LEVEL_WEEK`` for the rows of one channel, and 10 more
    for the rows over all channels, whose ``channel`` is empty. ``touch`` is ``first`` or
    ``last``, ``field`` a touch field (``source``, ``medium``, ``campaign``, ``ad``) and
    ``value`` its label, as in ``rollup_attribution``. ``named_conversions`` and
    ``named_micros`` count the conversions that name one of these conversations, and the
    sum of their values in micros as decimal digits (the sum can exceed 64 bits).
    ``contacts`` is a serialized Roaring bitmap of contact ids
    (``chatmw.metrics.contact_sets.encode``).
    """

    __tablename__ = "rollup_attribution_sets"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    touch: Mapped[str] = mapped_column(String(8), primary_key=True)
    field: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), primary_key=True)
    conversations: Mapped[int] = mapped_column(BigInteger)
    named_conversions: Mapped[int] = mapped_column(BigInteger)
    named_micros: Mapped[str] = mapped_column(String(64))
    contacts: Mapped[bytes] = mapped_column(LargeBinary)


class RollupContactSets(Base):
    """The contacts of a slot contact table over one UTC day or epoch week, as a bitmap.

    ``kind`` names the table (``users``, ``starters``, ``participants``, ``proactive``,
    ``writers`` or ``exposed``). ``contacts`` is a serialized Roaring bitmap of contact ids
    (``chatmw.metrics.contact_sets.encode``).
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
    conversation_pending_id: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    # The same three watermarks over ``rollup_changes`` ids.
    change_watermark_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    change_rescan_from_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    change_pending_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    # The same three watermarks over exposure ids, for rollup_exposed.
    exposure_watermark_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    exposure_rescan_from_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    exposure_pending_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class RollupChange(Base):
    """A conversation or contact whose raw rows changed without a new message (the change log).

    The writer, the survey service and the business API add a row in the transaction
    that makes the change (``chatmw.store.changes.record_changes``). The refresher marks
    dirty the slots of the conversation, or of every conversation of the contact, and
    deletes the rows it has consumed. ``start_ms`` is the conversation's start before the
    change, when the change may have moved it.
    """

    __tablename__ = "rollup_changes"
    # Ids must never be reused once the consumed rows are deleted, which SQLite does for a
    # plain INTEGER PRIMARY KEY whose highest rows are gone.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int | None] = mapped_column(Integer)
    contact_id: Mapped[int | None] = mapped_column(Integer)
    start_ms: Mapped[int | None] = mapped_column(BigInteger)
    at_ms: Mapped[int] = mapped_column(BigInteger)
