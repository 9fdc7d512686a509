"""Survey triggers and scheduling rules on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session
from surveys_support import Clock, Harness, survey_config

from chatmw import events as ev
from chatmw.store.models_surveys import SurveySend
from chatmw.surveys.dispatcher import Dispatcher
from chatmw.surveys.settings_store import ConfigSource, save_config_document


def _chat(
    harness: Harness,
    conversation: str,
    minutes_ago: float,
    user: str = "u1",
    attributes: dict[str, str] | None = None,
) -> None:
    at = harness.clock.at() - timedelta(minutes=minutes_ago)
    harness.writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=at,
                key=f"{conversation}-{minutes_ago}",
                role="user",
                user_id=user,
                text="hi",
                conversation_id=conversation,
                attributes=attributes or {},
            ),
        ]
    )


def test_inactivity_trigger_waits_for_silence(engine: Engine) -> None:
    config = survey_config(
        csat={"trigger": "inactivity", "inactivity_minutes": 30, "delay_minutes": 0}
    )
    harness = Harness(engine, config)
    _chat(harness, "quiet", minutes_ago=40)
    _chat(harness, "active", minutes_ago=10, user="u2")
    harness.round()
    assert [m.meta["conversation_id"] for m in harness.outbound["web"].sent] == ["quiet"]
    harness.clock.advance(minutes=21)
    harness.round()
    assert [m.meta["conversation_id"] for m in harness.outbound["web"].sent] == ["quiet", "active"]


def test_inactivity_trigger_ignores_explicit_end(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"trigger": "inactivity", "delay_minutes": 0}))
    harness.conversation("c1", minutes_ago=5)
    harness.round()
    assert harness.outbound["web"].sent == []
    harness.clock.advance(minutes=30)
    harness.round()
    assert len(harness.outbound["web"].sent) == 1


def test_ended_or_inactivity_takes_first(engine: Engine) -> None:
    harness = Harness(
        engine, survey_config(csat={"trigger": "ended_or_inactivity", "delay_minutes": 0})
    )
    harness.conversation("ended", minutes_ago=5)
    _chat(harness, "silent", minutes_ago=31, user="u2")
    _chat(harness, "open", minutes_ago=5, user="u3")
    harness.round()
    sent = sorted(m.meta["conversation_id"] for m in harness.outbound["web"].sent)
    assert sent == ["ended", "silent"]


def test_message_during_delay_reschedules_inactivity(engine: Engine) -> None:
    harness = Harness(
        engine,
        survey_config(
            csat={"trigger": "inactivity", "inactivity_minutes": 30, "delay_minutes": 10}
        ),
    )
    _chat(harness, "c1", minutes_ago=31)
    harness.round()
    assert harness.surveys()[0].state == "scheduled"
    harness.clock.advance(minutes=5)
    _chat(harness, "c1", minutes_ago=0)
    harness.clock.advance(minutes=5)
    harness.round()
    assert harness.outbound["web"].sent == []
    assert harness.surveys()[0].state == "waiting"
    harness.clock.advance(minutes=31)
    harness.round()
    assert harness.outbound["web"].sent == []
    harness.clock.advance(minutes=10)
    harness.round()
    assert len(harness.outbound["web"].sent) == 1


def test_old_and_bot_only_conversations_skipped(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("old", minutes_ago=3 * 24 * 60)
    start = harness.clock.at() - timedelta(minutes=5)
    harness.writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=start,
                key="bot-only",
                role="bot",
                user_id="u9",
                text="news",
                conversation_id="broadcast",
            ),
            ev.ConversationUpdate(
                channel="web",
                occurred_at=start,
                user_id="u9",
                conversation_id="broadcast",
                ended=True,
            ),
        ]
    )
    harness.round()
    assert harness.surveys() == []


def test_locale_from_conversation_attribute(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    _chat(harness, "fr", minutes_ago=5, attributes={"locale": "fr-CA"})
    _chat(harness, "de", minutes_ago=5, user="u2", attributes={"locale": "de"})
    for conversation, user in (("fr", "u1"), ("de", "u2")):
        harness.end(conversation, user=user)
    harness.round()
    texts = {m.meta["conversation_id"]: m.text for m in harness.outbound["web"].sent}
    assert texts == {"fr": "Comment était-ce ?", "de": "How did we do?"}


def test_stale_claim_failed_not_resent(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.dispatcher.channels.pop("web")
    harness.round()
    with Session(engine) as session, session.begin():
        session.execute(
            update(SurveySend).values(
                state="sending", claimed_by="dead", claimed_at_ms=harness.clock()
            )
        )
    harness.dispatcher.channels["web"] = harness.outbound["web"]
    harness.clock.advance(seconds=299)
    harness.round()
    assert harness.sends()[0].state == "sending"
    harness.clock.advance(seconds=2)
    harness.round()
    send, survey = harness.sends()[0], harness.surveys()[0]
    assert send.state == "failed"
    assert survey.state == "failed"
    assert survey.reason.startswith("claim expired")
    assert harness.outbound["web"].sent == []


def test_reopened_and_never_ended_dropped(engine: Engine) -> None:
    harness = Harness(engine, survey_config())
    harness.conversation("c1", minutes_ago=1)
    harness.round()
    _chat(harness, "c1", minutes_ago=0)
    harness.clock.advance(minutes=10)
    harness.round()
    assert harness.surveys()[0].state == "waiting"
    harness.clock.advance(hours=49)
    harness.round()
    survey = harness.surveys()[0]
    assert survey.state == "skipped"
    assert survey.reason == "reopened and not ended again within lookback_hours"


def test_stored_config_replaces_file(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    document = survey_config(csat={"delay_minutes": 0, "sampling_rate": 0.0}).to_document()
    save_config_document(engine, document)
    clock = Clock()
    dispatcher = Dispatcher(
        engine,
        ConfigSource(engine, harness.config),
        harness.outbound,
        record=harness.writer.write,
        clock=clock,
    )
    harness.dispatcher = dispatcher
    harness.conversation("c1")
    harness.round()
    assert harness.outbound["web"].sent == []
    assert harness.surveys()[0].reason == "not sampled"
