"""The store side of surveys: deciding what is due, and claiming each send for one process.

Several processes may run these functions against one database at the same time:

- scheduling inserts at most one survey per conversation (a unique constraint decides);
- a send is claimed by one statement that moves it from ``due`` to ``sending`` (on
  PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so claimers skip each other's rows), and only
  the claimer sends it;
- the per-user cooldown is checked under a lock of the contact row (PostgreSQL) or the
  database write lock (SQLite), so two processes cannot both survey one user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from chatmw.store.changes import record_changes
from chatmw.store.identity import insert_ignore
from chatmw.store.models import Contact, Conversation, ConversationAttribute
from chatmw.store.models_surveys import SURVEY_SENDS, SURVEYS, Survey, SurveySend
from chatmw.surveys.addresses import find_address
from chatmw.surveys.config import SurveysConfig, SurveySettings

__all__ = [
    "Job",
    "ScheduleStats",
    "is_sampled",
    "schedule",
    "request_survey",
    "claim_jobs",
    "claim_one",
    "release_stale_claims",
    "complete_job",
    "SurveyExistsError",
    "MESSAGING_WINDOW_MS",
    "WINDOW_CHANNELS",
]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Meta allows free-form messages only within 24 hours of the user's last message, on
# WhatsApp (the customer service window, after which only approved templates may be sent:
# https://docs.360dialog.com/docs/whatsapp-api/whatsapp-api/template-messaging) and on
# Messenger (the standard messaging window:
# https://developers.facebook.com/documentation/business-messaging/messenger-platform/policy/).
# NOTE: Messenger opens a window of up to 7 days after a Click-to-Messenger ad; such users
# are still held to 24 hours here, so some surveys are skipped that Meta would allow.
MESSAGING_WINDOW_MS = DAY_MS
WINDOW_CHANNELS = frozenset({"whatsapp", "messenger"})
LOCALE_ATTRIBUTES = ("locale", "language")


class SurveyExistsError(ValueError):
    """The conversation already has a survey (at most one per conversation)."""


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed send, with what the dispatcher needs to render and record it.

    ``user_id`` and ``conversation_id`` are the ids as stored (pseudonyms when the store
    pseudonymises); ``address`` is the platform id the message goes to.
    """

    send_id: int
    survey_id: int
    purpose: str
    attempts: int
    channel: str
    user_id: str
    address: str
    conversation_id: str
    name: str
    kind: str
    locale: str
    score_range: str | None
    use_template: bool


@dataclass(slots=True)
class ScheduleStats:
    """Counts of one scheduling pass."""

    scheduled: int = 0
    not_sampled: int = 0
    rescheduled: int = 0
    expired: int = 0


def is_sampled(seed: str, channel: str, conversation_id: str, rate: float) -> bool:
    """Decide whether a conversation is surveyed: the same seed gives the same decision."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{channel}\x00{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _end_basis(
    survey: SurveySettings, ended_at_ms: int | None, last_message_at_ms: int, now_ms: int
) -> int | None:
    # The moment the conversation counts as ended for ``survey``'s trigger, or None if open.
    inactive_at = last_message_at_ms + int(survey.inactivity_minutes * 60_000)
    inactive = inactive_at if inactive_at <= now_ms else None
    if survey.trigger == "ended":
        return ended_at_ms
    if survey.trigger == "inactivity":
        return inactive
    if survey.trigger == "ended_or_inactivity":
        return ended_at_ms if ended_at_ms is not None else inactive
    return None


def _locales(session: Session, conversation_ids: Sequence[int]) -> dict[int, str]:
    if not conversation_ids:
        return {}
    rows = session.execute(
        select(
            ConversationAttribute.conversation_id,
            ConversationAttribute.name,
            ConversationAttribute.value,
        ).where(
            ConversationAttribute.conversation_id.in_(list(conversation_ids)),
            ConversationAttribute.name.in_(LOCALE_ATTRIBUTES),
        )
    ).all()
    found: dict[int, str] = {}
    for conversation_id, _name, value in sorted(rows, key=lambda row: row[1] != "locale"):
        found.setdefault(conversation_id, value)
    return found


def _pick_locale(survey: SurveySettings, value: str | None) -> str:
    if value is None:
        return survey.default_locale
    for candidate in (value, value.replace("_", "-"), value.split("-")[0].split("_")[0]):
        if candidate in survey.texts:
            return candidate
    return survey.default_locale


def _candidates(
    session: Session, survey: SurveySettings, now_ms: int, lookback_ms: int, limit: int
) -> list[Any]:
    conversation = Conversation
    has_survey = select(Survey.id).where(Survey.conversation_id == conversation.id).exists()
    inactivity_ms = int(survey.inactivity_minutes * 60_000)
    ended = and_(
        conversation.ended_at_ms.is_not(None), conversation.ended_at_ms >= now_ms - lookback_ms
    )
    inactive = and_(
        conversation.last_message_at_ms <= now_ms - inactivity_ms,
        conversation.last_message_at_ms >= now_ms - lookback_ms - inactivity_ms,
    )
    condition = {
        "ended": ended,
        "inactivity": inactive,
        "ended_or_inactivity": or_(ended, and_(conversation.ended_at_ms.is_(None), inactive)),
    }[survey.trigger]
    statement = (
        select(
            conversation.id,
            conversation.channel,
            conversation.external_id,
            conversation.contact_id,
            conversation.ended_at_ms,
            conversation.last_message_at_ms,
        )
        .where(
            conversation.channel.in_(survey.channels),
            conversation.contact_id.is_not(None),
            conversation.user_message_count >= 1,
            ~has_survey,
            condition,
        )
        .order_by(conversation.last_message_at_ms, conversation.id)
        .limit(limit)
    )
    return list(session.execute(statement).all())


def _comment_window_ms(survey: SurveySettings) -> int:
    # Without a follow-up question a later message is not read as a comment.
    if all(texts.follow_up is None for texts in survey.texts.values()):
        return 0
    return int(survey.comment_window_minutes * 60_000)


def _schedule_survey(
    session: Session,
    survey: SurveySettings,
    now_ms: int,
    lookback_ms: int,
    limit: int,
    stats: ScheduleStats,
) -> None:
    rows = _candidates(session, survey, now_ms, lookback_ms, limit)
    locales = _locales(session, [row.id for row in rows])
    delay_ms = int(survey.delay_minutes * 60_000)
    survey_rows = []
    for row in rows:
        basis = _end_basis(survey, row.ended_at_ms, row.last_message_at_ms, now_ms)
        if basis is None:
            continue
        sampled = is_sampled(
            survey.sampling_seed, row.channel, row.external_id, survey.sampling_rate
        )
        survey_rows.append(
            {
                "conversation_id": row.id,
                "contact_id": row.contact_id,
                "channel": row.channel,
                "name": survey.name,
                "kind": survey.kind,
                "trigger": survey.trigger,
                "state": "scheduled" if sampled else "skipped",
                "reason": None if sampled else "not sampled",
                "locale": _pick_locale(survey, locales.get(row.id)),
                "basis_ms": basis,
                "created_at_ms": now_ms,
                "due_at_ms": basis + delay_ms if sampled else None,
                "comment_window_ms": _comment_window_ms(survey),
                "reasks": 0,
                "used_template": False,
            }
        )
        if sampled:
            stats.scheduled += 1
        else:
            stats.not_sampled += 1
    insert_ignore(session, SURVEYS, survey_rows, ["conversation_id"])
    _log_surveys(session, [row["conversation_id"] for row in survey_rows])
    _add_prompt_sends(session, [row["conversation_id"] for row in survey_rows])


def _log_surveys(session: Session, conversation_ids: Iterable[int]) -> None:
    # Survey rows are data of their conversation, so the rollup refresher recounts it.
    record_changes(session.connection(), conversations=[(cid, None) for cid in conversation_ids])


def _add_prompt_sends(session: Session, conversation_ids: Sequence[int]) -> None:
    if not conversation_ids:
        return
    scheduled = session.execute(
        select(Survey.id, Survey.due_at_ms).where(
            Survey.conversation_id.in_(list(conversation_ids)), Survey.state == "scheduled"
        )
    ).all()
    rows = [
        {
            "survey_id": survey_id,
            "purpose": "prompt",
            "state": "due",
            "due_at_ms": due_at,
            "attempts": 0,
        }
        for survey_id, due_at in scheduled
    ]
    insert_ignore(session, SURVEY_SENDS, rows, ["survey_id", "purpose"])


def _drop_stale_waiting(session: Session, config: SurveysConfig, now_ms: int) -> None:
    # A reopened conversation that has not ended again within the lookback never will be
    # surveyed, so its survey stops being examined every round.
    longest_inactivity = max(
        (int(survey.inactivity_minutes * 60_000) for survey in config.surveys.values()), default=0
    )
    bound = now_ms - int(config.dispatcher.lookback_hours * HOUR_MS) - longest_inactivity
    stale = (
        select(Conversation.id)
        .where(
            Conversation.last_message_at_ms < bound,
            or_(Conversation.ended_at_ms.is_(None), Conversation.ended_at_ms < bound),
        )
        .scalar_subquery()
    )
    dropped_rows = session.execute(
        update(Survey)
        .where(Survey.state == "waiting", Survey.conversation_id.in_(stale))
        .values(state="skipped", reason="reopened and not ended again within lookback_hours")
        .returning(Survey.id, Survey.conversation_id)
    ).all()
    dropped = [survey_id for survey_id, _ in dropped_rows]
    _log_surveys(session, [conversation_id for _, conversation_id in dropped_rows])
    if dropped:
        session.execute(
            update(SurveySend)
            .where(SurveySend.survey_id.in_(list(dropped)), SurveySend.state == "waiting")
            .values(state="skipped", error="conversation not ended again")
        )


def _reschedule_waiting(
    session: Session, config: SurveysConfig, now_ms: int, stats: ScheduleStats
) -> None:
    _drop_stale_waiting(session, config, now_ms)
    waiting = session.execute(
        select(
            Survey.id,
            Survey.name,
            Conversation.ended_at_ms,
            Conversation.last_message_at_ms,
            Survey.conversation_id,
        )
        .join(Conversation, Conversation.id == Survey.conversation_id)
        .where(Survey.state == "waiting")
        .order_by(Conversation.last_message_at_ms.desc())
        .limit(config.dispatcher.batch_size * 10)
    ).all()
    for survey_id, name, ended_at, last_at, conversation_id in waiting:
        survey = config.surveys.get(name)
        if survey is None:
            continue
        basis = _end_basis(survey, ended_at, last_at, now_ms)
        if basis is None:
            continue
        due_at = basis + int(survey.delay_minutes * 60_000)
        moved = session.execute(
            update(Survey)
            .where(Survey.id == survey_id, Survey.state == "waiting")
            .values(state="scheduled", basis_ms=basis, due_at_ms=due_at)
            .returning(Survey.id)
        ).first()
        if moved is not None:
            _log_surveys(session, [conversation_id])
            session.execute(
                update(SurveySend)
                .where(
                    SurveySend.survey_id == survey_id,
                    SurveySend.purpose == "prompt",
                    SurveySend.state == "waiting",
                )
                .values(state="due", due_at_ms=due_at)
            )
            stats.rescheduled += 1


def _expire_answers(session: Session, now_ms: int, stats: ScheduleStats) -> None:
    expired = session.execute(
        update(Survey)
        .where(Survey.state == "sent", Survey.answer_deadline_ms < now_ms)
        .values(state="unanswered", reason="no answer within the answer window")
        .returning(Survey.conversation_id)
    ).scalars().all()
    stats.expired += len(expired)
    closed = session.execute(
        update(Survey)
        .where(Survey.state == "answered", Survey.comment_deadline_ms < now_ms)
        .values(comment_deadline_ms=None)
        .returning(Survey.conversation_id)
    ).scalars().all()
    _log_surveys(session, [*expired, *closed])


def schedule(session: Session, config: SurveysConfig, now_ms: int) -> ScheduleStats:
    """Create the surveys of conversations that ended, and close surveys past their window.

    Each pass looks at most ``10 * batch_size`` new conversations per survey; conversations
    that ended more than ``lookback_hours`` ago are left alone.
    """
    stats = ScheduleStats()
    dispatcher = config.dispatcher
    lookback_ms = int(dispatcher.lookback_hours * HOUR_MS)
    for survey in config.surveys.values():
        if survey.trigger == "on_demand":
            continue
        _schedule_survey(session, survey, now_ms, lookback_ms, dispatcher.batch_size * 10, stats)
    _reschedule_waiting(session, config, now_ms, stats)
    _expire_answers(session, now_ms, stats)
    return stats


def request_survey(
    session: Session,
    config: SurveysConfig,
    channel: str,
    conversation_id: str,
    now_ms: int,
    locale: str | None = None,
) -> int:
    """Schedule a survey of one conversation now (on demand); returns the survey id.

    Sampling does not apply; the per-user cooldown and the messaging window do. Raises
    ``LookupError`` for an unknown conversation, ``ValueError`` when no survey covers the
    channel, and :class:`SurveyExistsError` when the conversation already has a survey.
    """
    survey = config.for_channel(channel)
    if survey is None:
        raise ValueError(f"no survey is configured for channel {channel!r}")
    row = session.execute(
        select(Conversation.id, Conversation.contact_id).where(
            Conversation.channel == channel, Conversation.external_id == conversation_id
        )
    ).first()
    if row is None:
        raise LookupError(f"conversation {conversation_id!r} not found on channel {channel!r}")
    if row.contact_id is None:
        raise ValueError(f"conversation {conversation_id!r} has no user to survey")
    if locale is None:
        locale = _locales(session, [row.id]).get(row.id)
    values = {
        "conversation_id": row.id,
        "contact_id": row.contact_id,
        "channel": channel,
        "name": survey.name,
        "kind": survey.kind,
        "trigger": "on_demand",
        "state": "scheduled",
        "reason": None,
        "locale": _pick_locale(survey, locale),
        "basis_ms": None,
        "created_at_ms": now_ms,
        "due_at_ms": now_ms,
        "comment_window_ms": _comment_window_ms(survey),
        "reasks": 0,
        "used_template": False,
    }
    insert_ignore(session, SURVEYS, [values], ["conversation_id"])
    survey_id, trigger, created = session.execute(
        select(Survey.id, Survey.trigger, Survey.created_at_ms).where(
            Survey.conversation_id == row.id
        )
    ).one()
    if trigger != "on_demand" or created != now_ms:
        raise SurveyExistsError(f"conversation {conversation_id!r} already has survey {survey_id}")
    _log_surveys(session, [row.id])
    _add_prompt_sends(session, [row.id])
    return int(survey_id)


def release_stale_claims(session: Session, config: SurveysConfig, now_ms: int) -> int:
    """Mark sends claimed longer than ``claim_timeout_seconds`` ago as failed.

    Their process stopped between claiming and recording, so whether the platform got the
    message is unknown; failing them keeps every send at most once.
    """
    limit = now_ms - int(config.dispatcher.claim_timeout_seconds * 1000)
    stale = session.execute(
        select(SurveySend.id, SurveySend.survey_id, SurveySend.purpose).where(
            SurveySend.state == "sending", SurveySend.claimed_at_ms < limit
        )
    ).all()
    reason = "claim expired: the sending process stopped; outcome unknown"
    for send_id, survey_id, purpose in stale:
        session.execute(
            update(SurveySend)
            .where(SurveySend.id == send_id, SurveySend.state == "sending")
            .values(state="failed", error=reason)
        )
        if purpose == "prompt":
            failed = session.execute(
                update(Survey)
                .where(Survey.id == survey_id, Survey.state == "scheduled")
                .values(state="failed", reason=reason)
                .returning(Survey.conversation_id)
            ).scalars().all()
            _log_surveys(session, failed)
    return len(stale)


def _claim_statement(worker: str, now_ms: int, channels: Sequence[str]) -> Any:
    candidate = (
        select(SurveySend.id)
        .join(Survey, Survey.id == SurveySend.survey_id)
        .where(
            SurveySend.state == "due",
            SurveySend.due_at_ms <= now_ms,
            Survey.channel.in_(list(channels)),
        )
        .order_by(SurveySend.due_at_ms, SurveySend.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=SurveySend)
        .scalar_subquery()
    )
    # ``state == 'due'`` is repeated outside the subquery: PostgreSQL re-checks the outer
    # condition on a row another transaction changed meanwhile, so a lost race updates nothing.
    return (
        update(SurveySend)
        .where(SurveySend.id == candidate, SurveySend.state == "due")
        .values(state="sending", claimed_by=worker, claimed_at_ms=now_ms)
        .returning(SurveySend.id, SurveySend.survey_id, SurveySend.purpose, SurveySend.attempts)
    )


def _lock_contact(session: Session, contact_id: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Contact.id).where(Contact.id == contact_id).with_for_update())


def _in_cooldown(session: Session, survey: Survey, settings: SurveySettings, now_ms: int) -> bool:
    if settings.cooldown_days <= 0 or survey.contact_id is None:
        return False
    since = now_ms - int(settings.cooldown_days * DAY_MS)
    statement = (
        select(func.count())
        .select_from(SurveySend)
        .join(Survey, Survey.id == SurveySend.survey_id)
        .where(
            Survey.contact_id == survey.contact_id,
            Survey.id != survey.id,
            SurveySend.purpose == "prompt",
            SurveySend.state.in_(("sending", "sent")),
            func.coalesce(SurveySend.sent_at_ms, SurveySend.claimed_at_ms) >= since,
        )
    )
    return bool(session.execute(statement).scalar_one())


def _overtaken(survey: Survey, purpose: str) -> str | None:
    # The user may answer before a queued question goes out; the question is then dropped.
    if purpose in ("reask", "step2") and (survey.state != "sent" or survey.score is not None):
        return f"not needed: survey is {survey.state}"
    if purpose == "follow_up" and survey.comment is not None:
        return "not needed: comment already received"
    return None


def _skip(session: Session, send_id: int, survey_id: int | None, reason: str) -> None:
    session.execute(
        update(SurveySend).where(SurveySend.id == send_id).values(state="skipped", error=reason)
    )
    if survey_id is not None:
        skipped = session.execute(
            update(Survey)
            .where(Survey.id == survey_id)
            .values(state="skipped", reason=reason)
            .returning(Survey.conversation_id)
        ).scalars().all()
        _log_surveys(session, skipped)


def _check_prompt(
    session: Session, send_id: int, survey: Survey, settings: SurveySettings, now_ms: int
) -> bool:
    # Returns whether the prompt may go out now. Otherwise the survey and send rows store why not.
    if survey.trigger != "on_demand":
        ended_at, last_at = session.execute(
            select(Conversation.ended_at_ms, Conversation.last_message_at_ms).where(
                Conversation.id == survey.conversation_id
            )
        ).one()
        basis = _end_basis(settings, ended_at, last_at, now_ms)
        if basis is None:
            session.execute(update(Survey).where(Survey.id == survey.id).values(state="waiting"))
            _log_surveys(session, [survey.conversation_id])
            session.execute(
                update(SurveySend)
                .where(SurveySend.id == send_id)
                .values(state="waiting", claimed_by=None, claimed_at_ms=None)
            )
            return False
        if basis != survey.basis_ms:
            due_at = basis + int(settings.delay_minutes * 60_000)
            session.execute(
                update(Survey)
                .where(Survey.id == survey.id)
                .values(basis_ms=basis, due_at_ms=due_at)
            )
            _log_surveys(session, [survey.conversation_id])
            if due_at > now_ms:
                session.execute(
                    update(SurveySend)
                    .where(SurveySend.id == send_id)
                    .values(state="due", due_at_ms=due_at, claimed_by=None, claimed_at_ms=None)
                )
                return False
    if survey.contact_id is not None:
        _lock_contact(session, survey.contact_id)
    if _in_cooldown(session, survey, settings, now_ms):
        _skip(
            session,
            send_id,
            survey.id,
            f"cooldown: user surveyed within {settings.cooldown_days:g} days",
        )
        return False
    return True


def _outside_window(session: Session, channel: str, contact_id: int | None, now_ms: int) -> bool:
    if channel not in WINDOW_CHANNELS:
        return False
    last_user = None
    if contact_id is not None:
        last_user = session.execute(
            select(Contact.last_user_message_ms).where(Contact.id == contact_id)
        ).scalar_one_or_none()
    return last_user is None or now_ms - last_user > MESSAGING_WINDOW_MS


def claim_one(
    session: Session, config: SurveysConfig, worker: str, now_ms: int, channels: Sequence[str]
) -> Job | None | bool:
    """Claim the next due send of ``channels`` inside the open transaction of ``session``.

    Returns the :class:`Job`, ``True`` when a send was taken off the queue without sending
    (skipped, held back or rescheduled), or ``None`` when nothing is due.
    """
    claimed = session.execute(_claim_statement(worker, now_ms, channels)).first()
    if claimed is None:
        return None
    send_id, survey_id, purpose, attempts = claimed
    survey = session.get(Survey, survey_id)
    settings = config.surveys.get(survey.name) if survey is not None else None
    if survey is None or settings is None:
        _skip(session, send_id, None, "survey no longer configured")
        return True
    if purpose == "prompt" and not _check_prompt(session, send_id, survey, settings, now_ms):
        return True
    overtaken = _overtaken(survey, purpose)
    if overtaken is not None:
        _skip(session, send_id, None, overtaken)
        return True
    use_template = False
    if _outside_window(session, survey.channel, survey.contact_id, now_ms):
        if purpose == "prompt" and survey.channel == "whatsapp" and settings.whatsapp_template:
            use_template = True
        else:
            reason = "outside the 24-hour messaging window"
            if purpose == "prompt" and survey.channel == "whatsapp":
                reason += " and no WhatsApp template configured"
            _skip(session, send_id, survey.id if purpose == "prompt" else None, reason)
            return True
    user_id, conversation_id = session.execute(
        select(Contact.external_id, Conversation.external_id)
        .join(Conversation, Conversation.id == survey.conversation_id)
        .where(Contact.id == survey.contact_id)
    ).one()
    address = find_address(session, survey.channel, user_id)
    if address is None:
        reason = "no platform id stored for this pseudonymised user"
        _skip(session, send_id, survey.id if purpose == "prompt" else None, reason)
        return True
    return Job(
        send_id=send_id,
        survey_id=survey.id,
        purpose=purpose,
        attempts=attempts,
        channel=survey.channel,
        user_id=user_id,
        address=address,
        conversation_id=conversation_id,
        name=survey.name,
        kind=survey.kind,
        locale=survey.locale,
        score_range=survey.score_range,
        use_template=use_template,
    )


def claim_jobs(
    engine_session: Any,
    config: SurveysConfig,
    worker: str,
    now_ms: int,
    limit: int,
    channels: Sequence[str],
) -> list[Job]:
    """Claim up to ``limit`` due sends of ``channels``, each in its own short transaction.

    ``engine_session`` is a callable returning a new :class:`Session` (a sessionmaker).
    """
    jobs: list[Job] = []
    examined = 0
    while len(jobs) < limit and examined < limit * 4:
        examined += 1
        with engine_session() as session, session.begin():
            outcome = claim_one(session, config, worker, now_ms, channels)
        if outcome is None:
            break
        if isinstance(outcome, Job):
            jobs.append(outcome)
    return jobs


def complete_job(
    session: Session,
    job: Job,
    config: SurveysConfig,
    now_ms: int,
    ok: bool,
    platform_message_id: str | None = None,
    error: str | None = None,
    retryable: bool = False,
) -> str:
    """Store the outcome of a claimed send; returns the send's new state.

    A retryable failure goes back to ``due`` after ``retry_backoff_seconds``, doubled after
    each failure, until ``max_attempts`` tries were made; then the send is failed.
    """
    send, survey = SurveySend, Survey
    if ok:
        session.execute(
            update(send)
            .where(send.id == job.send_id)
            .values(
                state="sent",
                sent_at_ms=now_ms,
                attempts=job.attempts + 1,
                platform_message_id=platform_message_id,
                error=None,
            )
        )
        if job.purpose == "prompt":
            settings = config.surveys.get(job.name)
            window_ms = int((settings.answer_window_hours if settings else 24.0) * HOUR_MS)
            sent = session.execute(
                update(survey)
                .where(survey.id == job.survey_id)
                .values(
                    state="sent",
                    sent_at_ms=now_ms,
                    used_template=job.use_template,
                    answer_deadline_ms=now_ms + window_ms,
                    reason=None,
                )
                .returning(survey.conversation_id)
            ).scalars().all()
            _log_surveys(session, sent)
        return "sent"
    attempts = job.attempts + 1
    dispatcher = config.dispatcher
    if retryable and attempts < dispatcher.max_attempts:
        delay_ms = int(dispatcher.retry_backoff_seconds * 1000 * 2 ** (attempts - 1))
        session.execute(
            update(send)
            .where(send.id == job.send_id)
            .values(
                state="due",
                attempts=attempts,
                due_at_ms=now_ms + delay_ms,
                claimed_by=None,
                claimed_at_ms=None,
                error=error,
            )
        )
        return "due"
    session.execute(
        update(send)
        .where(send.id == job.send_id)
        .values(state="failed", attempts=attempts, error=error)
    )
    if job.purpose == "prompt":
        failed = session.execute(
            update(survey)
            .where(survey.id == job.survey_id)
            .values(state="failed", reason=error)
            .returning(survey.conversation_id)
        ).scalars().all()
        _log_surveys(session, failed)
    return "failed"
