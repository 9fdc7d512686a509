"""Surveys end to end on SQLite and PostgreSQL: schedule, send, answer, record."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from datetime import timedelta

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from surveys_support import Harness, survey_config

from chatmw import events as ev
from chatmw.outbound import SendResult
from chatmw.store.models import Contact, Conversation, Message
from chatmw.store.models_surveys import SurveyAddress
from chatmw.surveys.addresses import ADDRESS_META_KEY, capture_addresses
from chatmw.surveys.answers import score_payload
from chatmw.surveys.scheduler import SurveyExistsError, is_sampled, request_survey
from chatmw.surveys.service import SurveyService
from chatmw.surveys.web import WebOutbound, fetch_web_messages


def _messages(engine: Engine, conversation: str) -> list[tuple[str, str, str | None]]:
    with Session(engine) as session:
        return list(
            session.execute(
                select(Message.role, Message.kind, Message.text)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.external_id == conversation)
                .order_by(Message.occurred_at_ms, Message.id)
            ).all()
        )


def _conversation(engine: Engine, external_id: str) -> Conversation:
    with Session(engine) as session:
        return session.scalars(
            select(Conversation).where(Conversation.external_id == external_id)
        ).one()


def test_prompt_waits_for_delay_then_sends_once(engine: Engine) -> None:
    harness = Harness(engine, survey_config())
    harness.conversation("c1", minutes_ago=2)
    harness.round()
    assert harness.outbound["web"].sent == []
    assert harness.surveys()[0].state == "scheduled"
    harness.clock.advance(minutes=5)
    harness.round()
    harness.round()
    sent = harness.outbound["web"].sent
    assert len(sent) == 1
    assert sent[0].text == "How did we do?"
    assert [choice.title for choice in sent[0].quick_replies] == ["⭐" * n for n in range(1, 6)]
    assert harness.surveys()[0].state == "sent"
    assert ("bot", "survey_prompt", "How did we do?") in _messages(engine, "c1")


def test_answer_recorded_without_touching_timings(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    before = _conversation(engine, "c1")
    harness.round()
    survey = harness.surveys()[0]
    harness.clock.advance(minutes=1)
    harness.user_says("a1", "⭐⭐⭐⭐", payload=score_payload(survey.id, 4))
    harness.round()
    harness.clock.advance(minutes=1)
    harness.user_says("a2", "Quick and friendly")
    after = _conversation(engine, "c1")
    survey = harness.surveys()[0]
    assert survey.state == "answered"
    assert survey.score == 4
    assert survey.comment == "Quick and friendly"
    assert after.message_count == before.message_count
    assert after.user_message_count == before.user_message_count
    assert after.first_response_ms == before.first_response_ms
    assert after.ended_at_ms == before.ended_at_ms
    kinds = [kind for _, kind, _ in _messages(engine, "c1")]
    assert kinds.count("survey_answer") == 2
    with Session(engine) as session:
        assert (
            session.scalar(select(Conversation.id).where(Conversation.external_id != "c1")) is None
        )
    harness.round()
    purposes = [message.meta["purpose"] for message in harness.outbound["web"].sent]
    assert purposes == ["prompt", "follow_up", "thanks"]


def test_retried_batch_stores_answer_once(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("a1", "5")
    harness.user_says("a1", "5")
    survey = harness.surveys()[0]
    assert survey.score == 5
    assert survey.comment is None
    assert [kind for _, kind, _ in _messages(engine, "c1")].count("survey_answer") == 1


def test_inline_comment_kept_with_score(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("a1", "2 - took too long")
    survey = harness.surveys()[0]
    assert survey.score == 2
    assert survey.comment == "took too long"


def test_unclear_answer_asked_again_once(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("x1", "maybe")
    harness.round()
    assert harness.outbound["web"].sent[-1].meta["purpose"] == "reask"
    assert harness.outbound["web"].sent[-1].text == "Please answer 1 to 5."
    harness.user_says("x2", "7")
    survey = harness.surveys()[0]
    assert survey.state == "unanswered"
    assert survey.score is None
    with Session(engine) as session:
        kinds = dict(session.execute(select(Message.key, Message.kind)).all())
    assert kinds["x1"] == "survey_answer"
    assert kinds["x2"] == "message"


def test_out_of_range_then_valid_answer(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("x1", "10/10")
    harness.user_says("x2", "four")
    survey = harness.surveys()[0]
    assert survey.reasks == 1
    assert survey.score == 4


def test_reopened_conversation_waits_until_ended_again(engine: Engine) -> None:
    harness = Harness(engine, survey_config())
    harness.conversation("c1", minutes_ago=1)
    harness.round()
    harness.clock.advance(minutes=1)
    harness.user_says("more", "one more thing", conversation_id="c1")
    harness.clock.advance(minutes=10)
    harness.round()
    assert harness.outbound["web"].sent == []
    assert harness.surveys()[0].state == "waiting"
    harness.end("c1")
    harness.clock.advance(minutes=4)
    harness.round()
    assert harness.outbound["web"].sent == []
    harness.clock.advance(minutes=1)
    harness.round()
    assert len(harness.outbound["web"].sent) == 1
    assert len(harness.surveys()) == 1


def test_one_survey_per_conversation(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    with Session(engine) as session, session.begin():
        try:
            request_survey(session, harness.config, "web", "c1", harness.clock())
        except SurveyExistsError:
            pass
        else:
            raise AssertionError("a second survey of c1 was accepted")
    harness.round()
    assert len(harness.outbound["web"].sent) == 1


def test_on_demand_survey_of_open_conversation(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"trigger": "on_demand"}))
    harness.conversation("c1", end=False)
    harness.round()
    assert harness.surveys() == []
    with Session(engine) as session, session.begin():
        survey_id = request_survey(
            session, harness.config, "web", "c1", harness.clock(), locale="fr"
        )
    harness.round()
    sent = harness.outbound["web"].sent
    assert len(sent) == 1
    assert sent[0].meta["survey_id"] == survey_id
    assert sent[0].text == "Comment était-ce ?"


def test_cooldown_skips_second_survey(engine: Engine) -> None:
    harness = Harness(
        engine,
        survey_config(
            csat={"delay_minutes": 0, "cooldown_days": 7, "answer_window_hours": 24 * 30}
        ),
    )
    harness.conversation("c1", minutes_ago=60)
    harness.round()
    harness.clock.advance(days=2)
    harness.conversation("c2", minutes_ago=10)
    harness.conversation("c3", user="u2", minutes_ago=10)
    harness.round()
    states = {s.conversation_id: (s.state, s.reason) for s in harness.surveys()}
    assert sorted(state for state, _ in states.values()) == ["sent", "sent", "skipped"]
    skipped = [reason for state, reason in states.values() if state == "skipped"]
    assert skipped[0].startswith("cooldown")
    harness.clock.advance(days=6)
    harness.conversation("c4", minutes_ago=10)
    harness.round()
    assert len(harness.outbound["web"].sent) == 3


def test_sampling_follows_seed(engine: Engine) -> None:
    harness = Harness(
        engine,
        survey_config(csat={"delay_minutes": 0, "sampling_rate": 0.5, "sampling_seed": "s1"}),
    )
    for index in range(20):
        harness.conversation(f"c{index}", user=f"u{index}")
    harness.round()
    expected = {f"c{index}" for index in range(20) if is_sampled("s1", "web", f"c{index}", 0.5)}
    assert 0 < len(expected) < 20
    sent = {message.meta["conversation_id"] for message in harness.outbound["web"].sent}
    assert sent == expected
    skipped = [s for s in harness.surveys() if s.state == "skipped"]
    assert len(skipped) == 20 - len(expected)
    assert {s.reason for s in skipped} == {"not sampled"}


def test_retry_with_backoff_then_failed(engine: Engine) -> None:
    failure = SendResult(ok=False, error="HTTP 503", retryable=True)
    harness = Harness(
        engine,
        survey_config(csat={"delay_minutes": 0}),
        results={"web": [failure, failure, failure]},
    )
    harness.conversation("c1")
    harness.round()
    send = harness.sends()[0]
    assert (send.state, send.attempts) == ("due", 1)
    assert send.due_at_ms == harness.clock() + 10_000
    harness.clock.advance(seconds=9)
    harness.round()
    assert len(harness.outbound["web"].sent) == 1
    harness.clock.advance(seconds=1)
    harness.round()
    send = harness.sends()[0]
    assert (send.state, send.attempts) == ("due", 2)
    assert send.due_at_ms == harness.clock() + 20_000
    harness.clock.advance(seconds=20)
    harness.round()
    send = harness.sends()[0]
    assert (send.state, send.attempts, send.error) == ("failed", 3, "HTTP 503")
    assert harness.surveys()[0].state == "failed"
    harness.clock.advance(minutes=10)
    harness.round()
    assert len(harness.outbound["web"].sent) == 3


def test_permanent_failure_not_retried(engine: Engine) -> None:
    harness = Harness(
        engine,
        survey_config(csat={"delay_minutes": 0}),
        results={"messenger": [SendResult(ok=False, error="HTTP 400")]},
    )
    harness.conversation("c1", channel="messenger")
    harness.round()
    assert harness.sends()[0].state == "failed"
    assert harness.surveys()[0].reason == "HTTP 400"


def _set_last_user_message(engine: Engine, hours_ago: float, now_ms: int) -> None:
    with Session(engine) as session, session.begin():
        for contact in session.scalars(select(Contact)):
            contact.last_user_message_ms = now_ms - int(hours_ago * 3_600_000)


def test_whatsapp_outside_window_without_template_skipped(engine: Engine) -> None:
    harness = Harness(engine, survey_config())
    harness.conversation("w1", channel="whatsapp")
    _set_last_user_message(engine, 24.5, harness.clock())
    harness.round()
    survey = harness.surveys()[0]
    assert harness.outbound["whatsapp"].sent == []
    assert survey.state == "skipped"
    assert (
        survey.reason == "outside the 24-hour messaging window and no WhatsApp template configured"
    )


def test_whatsapp_outside_window_uses_template(engine: Engine) -> None:
    template = {
        "name": "nps_survey",
        "language": "en_US",
        "components": [{"type": "body", "parameters": []}],
    }
    harness = Harness(engine, survey_config(nps={"whatsapp_template": template}))
    harness.conversation("w1", channel="whatsapp")
    _set_last_user_message(engine, 30, harness.clock())
    harness.round()
    sent = harness.outbound["whatsapp"].sent
    assert len(sent) == 1
    assert sent[0].template is not None
    assert sent[0].template.name == "nps_survey"
    assert harness.surveys()[0].used_template is True


def test_whatsapp_inside_window_two_step_nps(engine: Engine) -> None:
    harness = Harness(engine, survey_config())
    harness.conversation("w1", channel="whatsapp")
    _set_last_user_message(engine, 23.5, harness.clock())
    harness.round()
    prompt = harness.outbound["whatsapp"].sent[0]
    assert prompt.template is None
    assert [reply.title for reply in prompt.quick_replies] == ["0-6", "7-8", "9-10"]
    survey_id = prompt.meta["survey_id"]
    harness.user_says("r1", "9-10", channel="whatsapp", payload=f"survey:{survey_id}:range:9-10")
    harness.round()
    step2 = harness.outbound["whatsapp"].sent[1]
    assert step2.text == "Which exactly?"
    assert [row.title for row in step2.list_rows] == ["9", "10"]
    harness.user_says("r2", "10", channel="whatsapp", payload=f"survey:{survey_id}:10")
    assert harness.surveys()[0].score == 10


def test_messenger_outside_window_skipped(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("m1", channel="messenger")
    _set_last_user_message(engine, 25, harness.clock())
    harness.round()
    assert harness.outbound["messenger"].sent == []
    assert harness.surveys()[0].reason == "outside the 24-hour messaging window"


def test_answer_after_window_is_ordinary_message(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0, "answer_window_hours": 1}))
    harness.conversation("c1")
    harness.round()
    harness.clock.advance(hours=2)
    harness.user_says("late", "5")
    survey = harness.surveys()[0]
    assert survey.state == "unanswered"
    with Session(engine) as session:
        assert session.scalar(select(Message.kind).where(Message.key == "late")) == "message"


def test_web_outbox_delivers_each_message_once(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.outbound["web"] = WebOutbound(engine, clock=harness.clock)  # type: ignore[assignment]
    harness.dispatcher.channels["web"] = harness.outbound["web"]
    harness.conversation("c1", user="visitor-1")
    harness.round()
    first = fetch_web_messages(engine, "visitor-1")
    second = fetch_web_messages(engine, "visitor-1")
    assert len(first) == 1
    assert second == []
    assert first[0]["text"] == "How did we do?"
    assert [button["title"] for button in first[0]["buttons"]] == ["⭐" * n for n in range(1, 6)]
    assert first[0]["buttons"][4]["payload"] == score_payload(first[0]["meta"]["survey_id"], 5)
    with Session(engine) as session:
        stored = session.scalar(
            select(Message.platform_message_id).where(Message.kind == "survey_prompt")
        )
    assert stored == first[0]["id"]


def test_message_for_other_conversation_not_answer(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("n1", "5", conversation_id="c2")
    survey = harness.surveys()[0]
    assert survey.state == "sent"
    assert survey.score is None
    with Session(engine) as session:
        assert session.scalar(select(Message.kind).where(Message.key == "n1")) == "message"


def test_service_thread_sends_and_stops(engine: Engine) -> None:
    config = survey_config(csat={"delay_minutes": 0}, dispatcher={"poll_seconds": 0.05})
    harness = Harness(engine, config)
    harness.conversation("c1")
    service = SurveyService(harness.dispatcher)
    service.start()
    try:
        for _ in range(200):
            if harness.outbound["web"].sent:
                break
            time.sleep(0.02)
    finally:
        stopped = service.stop(timeout=5)
    assert stopped
    assert len(harness.outbound["web"].sent) == 1


def _pseudonymise(event: ev.Event) -> ev.Event:
    # Stands in for the privacy transform: a keyed, irreversible pseudonym of each id.
    changes = {}
    for name in ("user_id", "conversation_id"):
        value = getattr(event, name, None)
        if value:
            digest = hmac.new(b"test-key", f"{name}\x00{value}".encode(), hashlib.sha256)
            changes[name] = "ps_" + digest.hexdigest()[:32]
    return dataclasses.replace(event, **changes)


def test_pseudonymised_user_surveyed_at_platform_id(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    transform = capture_addresses(_pseudonymise, ["web", "messenger"])
    start = harness.clock.at() - timedelta(minutes=5)
    raw = [
        ev.Message(
            channel="messenger",
            occurred_at=start,
            key="in",
            role="user",
            user_id="psid-77",
            text="hi",
            conversation_id="c1",
        ),
        ev.ConversationUpdate(
            channel="messenger",
            occurred_at=start + timedelta(seconds=5),
            user_id="psid-77",
            conversation_id="c1",
            ended=True,
        ),
    ]
    harness.writer.write([transform(event) for event in raw])
    harness.round()
    sent = harness.outbound["messenger"].sent
    assert len(sent) == 1
    assert sent[0].user_id == "psid-77"
    answer = ev.Message(
        channel="messenger",
        occurred_at=harness.clock.at(),
        key="answer",
        role="user",
        user_id="psid-77",
        text="4",
    )
    harness.writer.write([transform(answer)])
    assert harness.surveys()[0].score == 4
    with Session(engine) as session:
        stored = session.execute(select(SurveyAddress.user_id, SurveyAddress.platform_id)).all()
        metas = session.scalars(select(Message.meta)).all()
        prompt_user = session.scalar(
            select(Contact.external_id)
            .join(Message, Message.contact_id == Contact.id)
            .where(Message.kind == "survey_prompt")
        )
    assert [platform_id for _, platform_id in stored] == ["psid-77"]
    assert stored[0][0].startswith("ps_")
    assert prompt_user == stored[0][0]
    assert all(ADDRESS_META_KEY not in (meta or {}) for meta in metas)


def test_pseudonymised_user_without_address_skipped(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.writer.write(
        [
            _pseudonymise(event)
            for event in (
                ev.Message(
                    channel="web",
                    occurred_at=harness.clock.at() - timedelta(minutes=5),
                    key="in",
                    role="user",
                    user_id="visitor",
                    text="hi",
                    conversation_id="c1",
                ),
                ev.ConversationUpdate(
                    channel="web",
                    occurred_at=harness.clock.at() - timedelta(minutes=4),
                    user_id="visitor",
                    conversation_id="c1",
                    ended=True,
                ),
            )
        ]
    )
    harness.round()
    assert harness.outbound["web"].sent == []
    assert harness.surveys()[0].reason == "no platform id stored for this pseudonymised user"


def test_queued_question_dropped_once_answered(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    harness.user_says("x1", "hmm")
    harness.user_says("x2", "5")
    harness.user_says("x3", "Great help")
    harness.round()
    purposes = [message.meta["purpose"] for message in harness.outbound["web"].sent]
    reasons = {send.purpose: (send.state, send.error) for send in harness.sends()}
    assert purposes == ["prompt", "thanks"]
    assert reasons["reask"] == ("skipped", "not needed: survey is answered")
    assert reasons["follow_up"] == ("skipped", "not needed: comment already received")
    assert harness.surveys()[0].comment == "Great help"
