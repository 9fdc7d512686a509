"""The change log: changes without a new message dirty their conversations' slots.

Each test makes a change that stores no message: a conversation update, a survey
answer, a conversion or a lead. It then reads the change log alone through
``changes_after``, with the message and conversation watermarks at their current
maximum, so that only logged rows can dirty a slot. The expected slots are computed in
the test from the stored messages and conversation starts.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select
from surveys_support import Harness, survey_config
from test_rollups_attack import (
    EPOCH,
    EPOCH_WEEK_EDGE,
    HOUR_MS,
    Store,
    assert_same_as_raw,
    fresh_store,
)

from chatmw import events as ev
from chatmw.business import BusinessSettings, install
from chatmw.events_business import Conversion, Lead
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.rollup_query import cover
from chatmw.metrics.rollup_refresh import OVERLAP_MS, changes_after, rebuild, refresh, slot_of
from chatmw.store.models import Contact, Conversation, Message
from chatmw.store.models_rollups import RollupChange, RollupState
from chatmw.surveys.answers import score_payload

DAY_MS = 86_400_000
EDGE = ev.to_ms(EPOCH_WEEK_EDGE)


def _at(at_ms: int) -> object:
    return EPOCH + timedelta(milliseconds=at_ms)


def _window(since_ms: int, until_ms: int) -> MetricFilter:
    return MetricFilter(since=_at(since_ms), until=_at(until_ms), tz=ZoneInfo("UTC"))


def _marks(engine: Engine) -> tuple[int, int, int]:
    """Return the highest message, conversation and change-log ids."""
    with engine.connect() as connection:
        return (
            connection.execute(select(func.coalesce(func.max(Message.id), 0))).scalar_one(),
            connection.execute(select(func.coalesce(func.max(Conversation.id), 0))).scalar_one(),
            connection.execute(select(func.coalesce(func.max(RollupChange.id), 0))).scalar_one(),
        )


def _logged_slots(engine: Engine, changes_from: int) -> set[int]:
    """Return the slots that change-log rows above ``changes_from`` dirty, and nothing else."""
    messages, conversations, _ = _marks(engine)
    with engine.connect() as connection:
        return changes_after(
            connection, messages, None, conversations, after_change_id=changes_from
        ).slots


def _message_slots(engine: Engine, external_id: str) -> set[int]:
    """Return the slots of every message and of the start of one conversation."""
    with engine.connect() as connection:
        conversation_id, started = connection.execute(
            select(Conversation.id, Conversation.started_at_ms).where(
                Conversation.external_id == external_id
            )
        ).one()
        times = connection.execute(
            select(Message.occurred_at_ms).where(Message.conversation_id == conversation_id)
        ).scalars()
        return {slot_of(at_ms) for at_ms in times} | {slot_of(started)}


def _start_slots(engine: Engine, user: str) -> set[int]:
    """Return the start slots of every conversation of one user on the web channel."""
    with engine.connect() as connection:
        starts = connection.execute(
            select(Conversation.started_at_ms)
            .join(Contact, Contact.id == Conversation.contact_id)
            .where(Contact.channel == "web", Contact.external_id == user)
        ).scalars()
        return {slot_of(at_ms) for at_ms in starts}


def _change_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(RollupChange)).scalar_one()


def _three_conversations(store: Store) -> None:
    """u1 owns c1 (two slots); u2 owns c2 (two slots) and c3 (one slot a day later)."""
    store.write(
        store.message(EDGE + HOUR_MS, "c1", "u1"),
        store.message(EDGE + 3 * HOUR_MS, "c1", "u1", "bot"),
        store.message(EDGE + 5 * HOUR_MS, "c2", "u2"),
        store.message(EDGE + 7 * HOUR_MS, "c2", "u2", "bot"),
        store.message(EDGE + DAY_MS + HOUR_MS, "c3", "u2"),
    )


def test_update_alone_dirties_its_conversation(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        _three_conversations(store)
        assert refresh(store.engine).rebuilt
        before = _marks(store.engine)[2]
        assert _logged_slots(store.engine, before) == set()
        store.write(
            ev.ConversationUpdate(
                channel="web",
                occurred_at=_at(EDGE + 4 * HOUR_MS),
                user_id="u1",
                conversation_id="c1",
                resolved=True,
                ended=True,
                ended_reason="done",
                intent="refund",
                step="closing",
            )
        )
        expected = _message_slots(store.engine, "c1")
        assert len(expected) == 2
        assert _logged_slots(store.engine, before) == expected
        report = refresh(store.engine)
        assert not report.rebuilt
        assert report.slots == len(expected)
        with store.engine.connect() as connection:
            state = connection.execute(select(RollupState.change_watermark_id)).scalar_one()
        assert state == _marks(store.engine)[2]
        assert_same_as_raw(store.engine, _window(EDGE, EDGE + 2 * DAY_MS), ("summary", "heatmap"))


def test_survey_answer_logs_its_conversation(engine: Engine) -> None:
    harness = Harness(engine, survey_config(csat={"delay_minutes": 0}))
    harness.conversation("c1")
    harness.round()
    survey = harness.surveys()[0]
    assert survey.state == "sent"
    before = _marks(engine)[2]
    harness.clock.advance(minutes=1)
    harness.user_says("a1", "4", payload=score_payload(survey.id, 4))
    assert harness.surveys()[0].state == "answered"
    assert _logged_slots(engine, before) == _message_slots(engine, "c1")


def test_conversion_by_conversation_and_by_user(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        install(store.writer, BusinessSettings(currency="EUR"))
        _three_conversations(store)
        assert refresh(store.engine).rebuilt
        before = _marks(store.engine)[2]
        store.write(
            Conversion(
                channel="web",
                occurred_at=_at(EDGE + 8 * HOUR_MS),
                key="v1",
                name="purchase",
                value_micros=5_000_000,
                currency="EUR",
                conversation_id="c1",
            )
        )
        assert _logged_slots(store.engine, before) == _message_slots(store.engine, "c1")

        before = _marks(store.engine)[2]
        store.write(
            Conversion(
                channel="web",
                occurred_at=_at(EDGE + 2 * DAY_MS),
                key="v2",
                name="purchase",
                value_micros=7_000_000,
                currency="EUR",
                user_id="u2",
            )
        )
        expected = _start_slots(store.engine, "u2")
        assert len(expected) == 2
        assert _logged_slots(store.engine, before) == expected

        rows = _change_rows(store.engine)
        store.write(
            Conversion(
                channel="web",
                occurred_at=_at(EDGE + 2 * DAY_MS),
                key="v3",
                name="purchase",
                value_micros=1,
                currency="EUR",
                user_id="nobody",
                conversation_id="missing",
            )
        )
        assert _change_rows(store.engine) == rows
        refresh(store.engine)
        assert_same_as_raw(store.engine, _window(EDGE, EDGE + 2 * DAY_MS), ("summary",))


def test_api_lead_by_user_and_by_conversation(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        install(store.writer, BusinessSettings(currency="EUR"))
        _three_conversations(store)
        assert refresh(store.engine).rebuilt
        before = _marks(store.engine)[2]
        store.write(
            Lead(
                channel="web",
                occurred_at=_at(EDGE + 2 * DAY_MS),
                key="l1",
                user_id="u2",
                kind="email",
                value="someone@example.com",
            )
        )
        assert _logged_slots(store.engine, before) == _start_slots(store.engine, "u2")

        before = _marks(store.engine)[2]
        store.write(
            Lead(
                channel="web",
                occurred_at=_at(EDGE + 2 * DAY_MS),
                key="l2",
                user_id="u2",
                kind="phone",
                value="+33100000000",
                conversation_id="c1",
            )
        )
        assert _logged_slots(store.engine, before) == _message_slots(store.engine, "c1")


def test_consumed_change_rows_are_pruned(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        _three_conversations(store)
        now = ev.to_ms(ev.now_utc())
        assert refresh(store.engine, now).rebuilt
        update = ev.ConversationUpdate(
            channel="web",
            occurred_at=_at(EDGE + 4 * HOUR_MS),
            user_id="u1",
            conversation_id="c1",
            resolved=True,
        )
        store.write(update)
        first = _marks(store.engine)[2]
        assert _change_rows(store.engine) == 1
        # A row is deleted once two overlap periods have passed: the first moves the rescan
        # point to the watermark it saw, the second moves it past the row.
        assert refresh(store.engine, now + 1).slots == 2
        refresh(store.engine, now + OVERLAP_MS)
        assert _change_rows(store.engine) == 1
        refresh(store.engine, now + 2 * OVERLAP_MS)
        assert _change_rows(store.engine) == 0

        # Ids are not reused after the delete, so the watermarks still find the next row.
        store.write(update)
        assert _marks(store.engine)[2] > first
        assert refresh(store.engine, now + 2 * OVERLAP_MS + 1).slots == 2


def test_cover_sees_change_rows_before_refresh(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        _three_conversations(store)
        assert refresh(store.engine).rebuilt
        window = _window(EDGE, EDGE + 2 * DAY_MS)
        with store.engine.connect() as connection:
            assert cover(connection, window).dirty == set()
        store.write(
            ev.ConversationUpdate(
                channel="web",
                occurred_at=_at(EDGE + 9 * HOUR_MS),
                user_id="u2",
                conversation_id="c2",
                ended=True,
            )
        )
        with store.engine.connect() as connection:
            coverage = cover(connection, window)
        assert coverage.dirty == _message_slots(store.engine, "c2")
        assert not coverage.dirty & coverage.served
        assert slot_of(EDGE + HOUR_MS) in coverage.served


def test_moved_start_fresh_before_refresh(database_url: str, tmp_path: Path) -> None:
    # An update creates c2 at its own time; the first message, 3 hours later, moves the
    # start. The old start slot has no message, and only the log names it.
    with fresh_store(database_url, tmp_path) as store:
        store.write(store.message(EDGE + HOUR_MS, "c1", "u1"))
        store.write(
            ev.ConversationUpdate(
                channel="web",
                occurred_at=_at(EDGE + 2 * HOUR_MS),
                user_id="u2",
                conversation_id="c2",
                step="welcome",
            )
        )
        assert refresh(store.engine).rebuilt
        store.write(store.message(EDGE + 5 * HOUR_MS, "c2", "u2"))
        window = _window(EDGE, EDGE + DAY_MS)
        with store.engine.connect() as connection:
            assert slot_of(EDGE + 2 * HOUR_MS) in cover(connection, window).dirty
        assert_same_as_raw(store.engine, window, ("summary", "heatmap", "volume-day"))
        refresh(store.engine)
        assert_same_as_raw(store.engine, window, ("summary", "heatmap", "volume-day"))


def test_rebuild_consumes_change_rows(database_url: str, tmp_path: Path) -> None:
    with fresh_store(database_url, tmp_path) as store:
        _three_conversations(store)
        assert refresh(store.engine).rebuilt
        store.write(
            ev.ConversationUpdate(
                channel="web",
                occurred_at=_at(EDGE + 4 * HOUR_MS),
                user_id="u1",
                conversation_id="c1",
                ended=True,
            )
        )
        logged = _marks(store.engine)[2]
        assert logged > 0
        assert rebuild(store.engine).rebuilt
        assert _change_rows(store.engine) == 0
        with store.engine.connect() as connection:
            marks = connection.execute(
                select(
                    RollupState.change_watermark_id,
                    RollupState.change_rescan_from_id,
                    RollupState.change_pending_id,
                )
            ).one()
        assert tuple(marks) == (logged, logged, logged)
        assert refresh(store.engine).slots == 0
        assert_same_as_raw(store.engine, _window(EDGE, EDGE + 2 * DAY_MS))
