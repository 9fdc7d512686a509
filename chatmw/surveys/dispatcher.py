"""The survey dispatcher: schedules due surveys, sends each claimed message, records it.

One round (:meth:`Dispatcher.run_once`) schedules surveys of ended conversations and
claims the due sends of the channels this process can send on. It renders each one and
sends it through the channel's :class:`chatmw.outbound.OutboundChannel`. Then it stores
the outcome and records each sent message as a ``survey_prompt`` message of the surveyed
conversation. Any number
of processes may run rounds against one database; each send goes out at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from chatmw import events as ev
from chatmw.outbound import OutboundChannel, OutboundMessage, SendResult
from chatmw.store.writer import Writer
from chatmw.surveys.config import SurveysConfig
from chatmw.surveys.render import RenderRequest, render
from chatmw.surveys.scheduler import (
    Job,
    claim_jobs,
    complete_job,
    release_stale_claims,
    schedule,
)
from chatmw.surveys.settings_store import ConfigSource

__all__ = ["Dispatcher", "RoundStats", "EventSink"]

logger = logging.getLogger("chatmw")

EventSink = Callable[[Sequence[ev.Event]], None]


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class RoundStats:
    """Counts of one round: surveys scheduled, sends made, retried, failed or skipped."""

    scheduled: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0
    claimed_stale: int = 0
    by_purpose: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """Sends due survey messages through ``channels`` (a channel name to its sender).

    ``config`` is a fixed configuration or a :class:`ConfigSource` read every round.
    ``record`` stores the sent messages as events, by default through a :class:`Writer` on
    ``engine``. The events carry the user and conversation ids as stored, so they must not
    pass through the recorder's transform (pseudonymisation) again. A sender whose attribute
    ``records_sends`` is true records its own sends, and the dispatcher does not record them.
    """

    def __init__(
        self,
        engine: Engine,
        config: SurveysConfig | ConfigSource,
        channels: Mapping[str, OutboundChannel],
        record: EventSink | None = None,
        worker_id: str | None = None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.engine = engine
        self.config_source = config
        self.channels = dict(channels)
        self.sessions = sessionmaker(engine)
        self.clock = clock
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._record = record or Writer(engine).write

    @property
    def config(self) -> SurveysConfig:
        source = self.config_source
        return source.current() if isinstance(source, ConfigSource) else source

    async def run_once(self) -> RoundStats:
        """Run one round. A failed send is stored on its row; database errors propagate."""
        config = self.config
        stats = RoundStats()
        await asyncio.to_thread(self._maintain, config, stats)
        if not self.channels:
            return stats
        jobs = await asyncio.to_thread(
            claim_jobs,
            self.sessions,
            config,
            self.worker_id,
            self.clock(),
            config.dispatcher.batch_size,
            sorted(self.channels),
        )
        for job in jobs:
            await self._dispatch(config, job, stats)
        return stats

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds every ``poll_seconds`` until ``stop`` is set."""
        logger.info(
            "survey dispatcher %s started for channels %s",
            self.worker_id,
            ", ".join(sorted(self.channels)) or "(none)",
        )
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - a failed round is logged and the next one runs
                logger.exception("survey dispatcher round failed; retrying after the poll interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.dispatcher.poll_seconds)
        logger.info("survey dispatcher %s stopped", self.worker_id)

    def _maintain(self, config: SurveysConfig, stats: RoundStats) -> None:
        now_ms = self.clock()
        with self.sessions() as session, session.begin():
            stats.claimed_stale = release_stale_claims(session, config, now_ms)
        with self.sessions() as session, session.begin():
            stats.scheduled = schedule(session, config, now_ms).scheduled

    async def _dispatch(self, config: SurveysConfig, job: Job, stats: RoundStats) -> None:
        settings = config.surveys.get(job.name)
        message = None
        if settings is not None:
            request = RenderRequest(
                survey_id=job.survey_id,
                kind=job.kind,
                channel=job.channel,
                user_id=job.address,
                conversation_id=job.conversation_id,
                purpose=job.purpose,
                texts=settings.texts_for(job.locale),
                score_range=_parse_range(job.score_range),
                template=settings.whatsapp_template if job.use_template else None,
            )
            try:
                message = render(request)
            except ValueError as error:
                result = SendResult(ok=False, error=f"not sent: {error}")
        else:
            result = SendResult(ok=False, error=f"survey {job.name!r} is no longer configured")
        if message is not None:
            result = await self._send(job, message)
        state = await asyncio.to_thread(self._complete, config, job, result)
        if state == "sent" and message is not None:
            stats.sent += 1
            stats.by_purpose[job.purpose] = stats.by_purpose.get(job.purpose, 0) + 1
            await asyncio.to_thread(self._record_sent, job, message, result)
        elif state == "due":
            stats.retried += 1
            logger.warning(
                "survey %s %s send failed, will retry: %s", job.survey_id, job.purpose, result.error
            )
        else:
            stats.failed += 1
            logger.error("survey %s %s send failed: %s", job.survey_id, job.purpose, result.error)

    async def _send(self, job: Job, message: OutboundMessage) -> SendResult:
        channel = self.channels[job.channel]
        try:
            return await channel.send(message)
        except Exception as error:  # noqa: BLE001 - the protocol says send never raises
            logger.exception("outbound %s raised instead of returning a result", job.channel)
            return SendResult(ok=False, error=f"{type(error).__name__}: {error}", retryable=True)

    def _complete(self, config: SurveysConfig, job: Job, result: SendResult) -> str:
        with self.sessions() as session, session.begin():
            return complete_job(
                session,
                job,
                config,
                self.clock(),
                result.ok,
                platform_message_id=result.platform_message_id,
                error=result.error,
                retryable=result.retryable,
            )

    def _record_sent(self, job: Job, message: OutboundMessage, result: SendResult) -> None:
        if getattr(self.channels[job.channel], "records_sends", False):
            return
        text = message.text
        if message.template is not None:
            text = f"[template {message.template.name}]"
        event = ev.Message(
            channel=job.channel,
            occurred_at=ev.from_ms(self.clock()),
            key=f"survey:{job.survey_id}:{job.purpose}",
            role="bot",
            user_id=job.user_id,
            text=text,
            conversation_id=job.conversation_id,
            platform_message_id=result.platform_message_id,
            kind="survey_prompt",
            meta=dict(message.meta),
        )
        try:
            self._record([event])
        except Exception:  # noqa: BLE001 - the send happened; a lost record must not undo it
            logger.exception(
                "survey %s %s was sent but could not be recorded", job.survey_id, job.purpose
            )


def _parse_range(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    low, _, high = value.partition("-")
    return int(low), int(high)
