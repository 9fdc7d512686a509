"""Shared helpers of the survey tests: a controllable clock, a recording sender, fixtures."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.outbound import OutboundMessage, SendResult
from chatmw.store.models import Conversation
from chatmw.store.models_surveys import Survey, SurveySend
from chatmw.store.writer import Writer
from chatmw.surveys.answering import SurveyAnswerPreprocessor
from chatmw.surveys.config import SurveysConfig, parse_config
from chatmw.surveys.dispatcher import Dispatcher

T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand, in epoch milliseconds."""

    def __init__(self, start: datetime = T0) -> None:
        self.ms = ev.to_ms(start)

    def __call__(self) -> int:
        return self.ms

    def advance(self, **delta: float) -> None:
        self.ms += int(timedelta(**delta).total_seconds() * 1000)

    def at(self) -> datetime:
        return ev.from_ms(self.ms)


class RecordingOutbound:
    """A sender that keeps every message; ``results`` are returned in order, then success."""

    def __init__(self, channel: str, results: Sequence[SendResult] = ()) -> None:
        self.channel = channel
        self.sent: list[OutboundMessage] = []
        self.results = list(results)

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        if self.results:
            return self.results.pop(0)
        return SendResult(ok=True, platform_message_id=f"{self.channel}-mid-{len(self.sent)}")


def survey_config(**overrides: Any) -> SurveysConfig:
    """A CSAT survey on web and Messenger and an NPS survey on WhatsApp."""
    csat = {
        "kind": "csat",
        "channels": ["web", "messenger"],
        "trigger": "ended",
        "delay_minutes": 5,
        "cooldown_days": 0,
        "sampling_rate": 1.0,
        "texts": {
            "en": {
                "prompt": "How did we do?",
                "reask": "Please answer 1 to 5.",
                "follow_up": "Why?",
                "thanks": "Thanks!",
            },
            "fr": {"prompt": "Comment était-ce ?", "reask": "Répondez de 1 à 5."},
        },
    }
    nps = {
        "kind": "nps",
        "channels": ["whatsapp"],
        "trigger": "ended",
        "delay_minutes": 0,
        "cooldown_days": 0,
        "texts": {
            "en": {
                "prompt": "Would you recommend us?",
                "reask": "0 to 10 please.",
                "step2_prompt": "Which exactly?",
            }
        },
    }
    csat.update(overrides.pop("csat", {}))
    nps.update(overrides.pop("nps", {}))
    document = {
        "dispatcher": {
            "retry_backoff_seconds": 10,
            "max_attempts": 3,
            **overrides.pop("dispatcher", {}),
        },
        "surveys": {"csat": csat, "nps": nps},
    }
    return parse_config(document)


class Harness:
    """A writer with the answer preprocessor, a dispatcher and senders on one engine."""

    def __init__(
        self,
        engine: Engine,
        config: SurveysConfig,
        clock: Clock | None = None,
        results: dict[str, Sequence[SendResult]] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock or Clock()
        self.config = config
        self.writer = Writer(engine, preprocessors=[SurveyAnswerPreprocessor(self.clock)])
        results = results or {}
        self.outbound = {
            name: RecordingOutbound(name, results.get(name, ()))
            for name in ("web", "messenger", "whatsapp")
        }
        self.dispatcher = Dispatcher(
            engine,
            config,
            self.outbound,
            record=self.writer.write,
            worker_id="test",
            clock=self.clock,
        )

    def conversation(
        self,
        conversation_id: str,
        user: str = "u1",
        channel: str = "web",
        end: bool = True,
        minutes_ago: float = 10,
    ) -> None:
        """Write a user message and a bot reply, then end the conversation."""
        start = self.clock.at() - timedelta(minutes=minutes_ago)
        batch: list[ev.Event] = [
            ev.Message(
                channel=channel,
                occurred_at=start,
                key=f"{conversation_id}-u",
                role="user",
                user_id=user,
                text="hi",
                conversation_id=conversation_id,
            ),
            ev.Message(
                channel=channel,
                occurred_at=start + timedelta(seconds=3),
                key=f"{conversation_id}-b",
                role="bot",
                user_id=user,
                text="hello",
                conversation_id=conversation_id,
            ),
        ]
        if end:
            batch.append(
                ev.ConversationUpdate(
                    channel=channel,
                    occurred_at=start + timedelta(seconds=5),
                    user_id=user,
                    conversation_id=conversation_id,
                    ended=True,
                    ended_reason="bot",
                )
            )
        self.writer.write(batch)

    def user_says(
        self,
        key: str,
        text: str | None,
        user: str = "u1",
        channel: str = "web",
        payload: str | None = None,
        conversation_id: str | None = None,
    ) -> None:
        meta = {"payload": payload} if payload else {}
        self.writer.write(
            [
                ev.Message(
                    channel=channel,
                    occurred_at=self.clock.at(),
                    key=key,
                    role="user",
                    user_id=user,
                    text=text,
                    meta=meta,
                    conversation_id=conversation_id,
                )
            ]
        )

    def end(self, conversation_id: str, user: str = "u1", channel: str = "web") -> None:
        self.writer.write(
            [
                ev.ConversationUpdate(
                    channel=channel,
                    occurred_at=self.clock.at(),
                    user_id=user,
                    conversation_id=conversation_id,
                    ended=True,
                )
            ]
        )

    def round(self) -> Any:
        import asyncio

        return asyncio.run(self.dispatcher.run_once())

    def surveys(self) -> list[Survey]:
        with Session(self.engine) as session:
            return list(session.scalars(select(Survey).order_by(Survey.id)))

    def sends(self) -> list[SurveySend]:
        with Session(self.engine) as session:
            return list(session.scalars(select(SurveySend).order_by(SurveySend.id)))


def add_random_surveys(engine: Engine, rng: random.Random) -> None:
    """Insert a survey of a random kind and state for about two thirds of the conversations."""
    with engine.begin() as connection:
        conversations = connection.execute(
            select(
                Conversation.id,
                Conversation.contact_id,
                Conversation.channel,
                Conversation.started_at_ms,
            ).order_by(Conversation.id)
        ).all()
        rows = []
        for conversation_id, contact_id, channel, started_ms in conversations:
            if rng.random() < 0.35:
                continue
            kind = rng.choice(("csat", "nps"))
            sent = rng.random() < 0.8
            low, high = (1, 5) if kind == "csat" else (0, 10)
            # Some unsent surveys have a score. csat and nps do not count it as an answer,
            # but query-types counts the CSAT ones.
            score = rng.randint(low, high) if rng.random() < 0.7 else None
            rows.append(
                {
                    "conversation_id": conversation_id,
                    "contact_id": contact_id,
                    "channel": channel,
                    "name": kind,
                    "kind": kind,
                    "trigger": "ended",
                    "state": "answered" if score is not None else "sent",
                    "locale": "en",
                    "created_at_ms": started_ms,
                    "sent_at_ms": started_ms + 60_000 if sent else None,
                    "score": score,
                    "comment_window_ms": 0,
                    "reasks": 0,
                    "used_template": False,
                }
            )
        connection.execute(insert(Survey), rows)
