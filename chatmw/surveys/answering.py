"""Recognising survey answers among incoming messages, inside the writer's transaction.

:class:`SurveyAnswerPreprocessor` is a :class:`chatmw.store.writer.Writer` preprocessor.
A user message from a contact with a survey awaiting an answer is stored with
``kind="survey_answer"`` in the surveyed conversation, so it neither starts or reopens a
conversation nor counts in response times. The survey row is updated in the same
transaction, and the next message (re-ask, second step, follow-up or thanks) is queued for
the dispatcher.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import String, and_, or_, select, text, update
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.store.changes import record_changes
from chatmw.store.identity import derived_table, insert_ignore
from chatmw.store.models import Contact, Conversation
from chatmw.store.models_surveys import SURVEY_SENDS, Survey
from chatmw.surveys.addresses import ADDRESS_META_KEY, store_addresses
from chatmw.surveys.answers import Answer, parse_answer
from chatmw.surveys.config import SCALES

__all__ = ["SurveyAnswerPreprocessor", "PAYLOAD_META_KEYS"]

# Message meta keys where sources put the payload of a tapped button: the widget's
# ``payload``, Messenger's quick reply and postback payloads, WhatsApp's reply button or
# list row id (``reply_id``) and template button payload.
PAYLOAD_META_KEYS = (
    "payload",
    "quick_reply_payload",
    "postback_payload",
    "reply_id",
    "button_payload",
)


def _payload(message: ev.Message) -> str | None:
    for key in PAYLOAD_META_KEYS:
        value = message.meta.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


class SurveyAnswerPreprocessor:
    """Rewrites survey answers in a batch of messages and records them on their survey.

    ``clock`` returns the current time in epoch milliseconds; queued messages are due then.
    """

    def __init__(self, clock: Callable[[], int] = _now_ms) -> None:
        self.clock = clock

    def __call__(self, session: Session, messages: list[ev.Message]) -> list[ev.Message]:
        messages = self._take_addresses(session, messages)
        indexes = [i for i, m in enumerate(messages) if m.role == "user" and m.kind == "message"]
        if not indexes:
            return messages
        result = list(messages)
        awaiting, surveyed = self._awaiting(
            session, {(messages[i].channel, messages[i].user_id) for i in indexes}
        )
        # Only a user with a survey can have sent a message stored as its answer.
        stored = self._stored_answers(session, [
            messages[i].key for i in indexes
            if (messages[i].channel, messages[i].user_id) in surveyed])
        if not stored and not awaiting:
            # Most batches: no answer stored before and no survey waiting for one.
            return messages
        for index in sorted(indexes, key=lambda i: messages[i].occurred_at):
            message = messages[index]
            if message.key in stored:
                # Written before (a retried batch): store it the same way again.
                if stored[message.key] is not None:
                    result[index] = dataclasses.replace(
                        message, kind="survey_answer", conversation_id=stored[message.key]
                    )
                continue
            entry = awaiting.get((message.channel, message.user_id))
            if entry is None:
                continue
            survey, conversation_id = entry
            if not self._for_survey(message, survey, conversation_id):
                continue
            if self._apply(session, survey, message):
                meta = {**message.meta, "survey_id": survey.id}
                result[index] = dataclasses.replace(
                    message, kind="survey_answer", conversation_id=conversation_id, meta=meta
                )
        return result

    def _take_addresses(self, session: Session, messages: list[ev.Message]) -> list[ev.Message]:
        # Moves the platform ids that address capture put in the meta into their table.
        addresses: dict[tuple[str, str], str] = {}
        result = []
        for message in messages:
            if ADDRESS_META_KEY not in message.meta:
                result.append(message)
                continue
            meta = dict(message.meta)
            platform_id = meta.pop(ADDRESS_META_KEY)
            if isinstance(platform_id, str) and platform_id:
                addresses[(message.channel, message.user_id)] = platform_id
            result.append(dataclasses.replace(message, meta=meta))
        store_addresses(session, addresses, self.clock())
        return result

    def _stored_answers(self, session: Session, keys: Sequence[str]) -> dict[str, str | None]:
        if not keys:
            return {}
        source, parameters = derived_table(
            session, "batch", {"message_key": String()}, [{"message_key": key} for key in keys])
        rows = session.connection().execute(text(
            "SELECT m.key, m.kind, c.external_id "
            f"FROM {source} JOIN messages AS m ON m.key = batch.message_key "
            "JOIN conversations AS c ON c.id = m.conversation_id"), parameters).all()
        return {
            key: (external if kind == "survey_answer" else None) for key, kind, external in rows
        }

    def _awaiting(
        self, session: Session, identities: set[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], tuple[Survey, str]], set[tuple[str, str]]]:
        # The surveys awaiting an answer from these users, by user, and the users who have
        # a survey in any state.
        now_ms = self.clock()
        awaiting = or_(
            Survey.state == "sent",
            and_(
                Survey.state == "answered",
                Survey.comment.is_(None),
                Survey.comment_deadline_ms >= now_ms,
            ),
        )
        candidates, surveyed = self._awaiting_ids(session, identities, now_ms)
        if not candidates:
            return {}, surveyed
        statement = (
            select(Survey, Conversation.external_id, Contact.channel, Contact.external_id)
            .join(Contact, Contact.id == Survey.contact_id)
            .join(Conversation, Conversation.id == Survey.conversation_id)
            .where(Survey.id.in_(candidates), awaiting)
            .order_by(Survey.sent_at_ms, Survey.id)
        )
        found: dict[tuple[str, str], tuple[Survey, str]] = {}
        for survey, conversation_external, channel, user_id in session.execute(statement):
            # Detached, so that the writer's commit never flushes these copies: every
            # change goes through an explicit UPDATE in ``_set``.
            session.expunge(survey)
            # The latest survey sent to the user wins.
            found[(channel, user_id)] = (survey, conversation_external)
        return found, surveyed

    @staticmethod
    def _awaiting_ids(session: Session, identities: set[tuple[str, str]],
                      now_ms: int) -> tuple[list[int], set[tuple[str, str]]]:
        # Ids of the surveys awaiting an answer from these users, with the same condition as
        # ``_awaiting``, and the users who have a survey in any state: one statement whose
        # text is the same for every batch. Most batches find none, and then load no survey.
        source, parameters = derived_table(
            session, "users", {"channel": String(), "external_id": String()},
            [{"channel": channel, "external_id": external}
             for channel, external in sorted(identities)])
        statement = text(
            f"SELECT s.id, users.channel, users.external_id, "
            "s.state = 'sent' OR (s.state = 'answered' AND s.comment IS NULL "
            "AND s.comment_deadline_ms >= :now_ms) "
            f"FROM {source} JOIN contacts AS c "
            "ON c.channel = users.channel AND c.external_id = users.external_id "
            "JOIN surveys AS s ON s.contact_id = c.id")
        rows = session.connection().execute(statement, {**parameters, "now_ms": now_ms}).all()
        awaiting = sorted({survey_id for survey_id, _, _, waiting in rows if waiting})
        surveyed = {(channel, external) for _, channel, external, _ in rows}
        return awaiting, surveyed

    @staticmethod
    def _for_survey(message: ev.Message, survey: Survey, conversation_id: str) -> bool:
        # A message the source assigns to another conversation is not an answer, unless it
        # carries this survey's button payload.
        if message.conversation_id in (None, conversation_id):
            return True
        payload = _payload(message) or message.text or ""
        return payload.startswith(f"survey:{survey.id}:")

    def _apply(self, session: Session, survey: Survey, message: ev.Message) -> bool:
        at_ms = ev.to_ms(message.occurred_at)
        if survey.sent_at_ms is None or at_ms < survey.sent_at_ms:
            return False
        payload = _payload(message)
        if survey.state == "answered":
            return self._apply_comment(session, survey, message, payload, at_ms)
        if survey.answer_deadline_ms is not None and at_ms > survey.answer_deadline_ms:
            self._set(
                session, survey, state="unanswered", reason="no answer within the answer window"
            )
            return False
        answer = parse_answer(message.text, payload, SCALES[survey.kind])
        if answer is not None and answer.survey_id not in (None, survey.id):
            return False
        if answer is not None and answer.score is not None:
            self._record_score(session, survey, answer, at_ms)
            return True
        if answer is not None and answer.score_range is not None and survey.score_range is None:
            low, high = answer.score_range
            self._set(session, survey, score_range=f"{low}-{high}")
            self._queue(session, survey, "step2")
            return True
        if survey.reasks == 0:
            self._set(session, survey, reasks=1)
            self._queue(session, survey, "reask")
            return True
        # A second unclear reply is most likely a new request, so it stays an ordinary message.
        self._set(session, survey, state="unanswered", reason="unclear answer after one re-ask")
        return False

    def _record_score(self, session: Session, survey: Survey, answer: Answer, at_ms: int) -> None:
        values: dict[str, Any] = {
            "state": "answered",
            "score": answer.score,
            "answered_at_ms": at_ms,
            "reason": None,
        }
        if answer.comment is not None:
            values.update(comment=answer.comment, commented_at_ms=at_ms, comment_deadline_ms=None)
            self._set(session, survey, **values)
            self._queue(session, survey, "thanks")
            return
        window = survey.comment_window_ms or 0
        values["comment_deadline_ms"] = at_ms + window if window > 0 else None
        self._set(session, survey, **values)
        self._queue(session, survey, "follow_up" if window > 0 else "thanks")

    def _apply_comment(
        self, session: Session, survey: Survey, message: ev.Message, payload: str | None, at_ms: int
    ) -> bool:
        if survey.comment_deadline_ms is None or at_ms > survey.comment_deadline_ms:
            return False
        text = (message.text or "").strip()
        if payload is not None or not text or (survey.answered_at_ms or 0) > at_ms:
            # A second tap on a score button is part of the survey but changes nothing.
            return payload is not None and payload.startswith(f"survey:{survey.id}:")
        self._set(session, survey, comment=text, commented_at_ms=at_ms, comment_deadline_ms=None)
        self._queue(session, survey, "thanks")
        return True

    def _set(self, session: Session, survey: Survey, **values: Any) -> None:
        session.execute(update(Survey).where(Survey.id == survey.id).values(**values))
        record_changes(session.connection(), conversations=[(survey.conversation_id, None)])
        for name, value in values.items():
            setattr(survey, name, value)

    def _queue(self, session: Session, survey: Survey, purpose: str) -> None:
        insert_ignore(
            session,
            SURVEY_SENDS,
            [
                {
                    "survey_id": survey.id,
                    "purpose": purpose,
                    "state": "due",
                    "due_at_ms": self.clock(),
                    "attempts": 0,
                }
            ],
            ["survey_id", "purpose"],
        )
