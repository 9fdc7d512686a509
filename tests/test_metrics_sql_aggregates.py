"""Metrics that aggregate in SQL return the same JSON as the earlier row-by-row code.

The earlier code is kept in ``metrics_reference``, and each case runs both on the same
store. The store is the generated business world (three channels, touches, conversions
naming users and conversations, leads, spend, CSAT and NPS surveys) with a ``plan``
attribute and conversations written late. Cases cover SQLite and PostgreSQL, and windows
in zones with whole, half and quarter-hour offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import metrics_reference as reference
import pytest
from business_support import DAY, T0, world_engine
from sqlalchemy import Engine, insert, select, update

from chatmw import events as ev
from chatmw.metrics import business_hours, conversion, cpa, ltv
from chatmw.metrics.filters import FilterError, GroupBy, MetricFilter
from chatmw.metrics.leads import leads
from chatmw.metrics.query_types import query_types
from chatmw.metrics.resolution import first_contact_resolution
from chatmw.metrics.retention import retention
from chatmw.store.models import Conversation, ConversationAttribute
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer
from chatmw.surveys.metrics import csat, nps

UTC_ZONE = ZoneInfo("UTC")
KOLKATA = ZoneInfo("Asia/Kolkata")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
NEW_YORK = ZoneInfo("America/New_York")


def _local(day: int, tz: ZoneInfo) -> datetime:
    moment = T0 + day * DAY
    return datetime(moment.year, moment.month, moment.day, tzinfo=tz)


def _window(first: int, last: int, tz: ZoneInfo = UTC_ZONE, **fields: Any) -> MetricFilter:
    return MetricFilter(since=_local(first, tz), until=_local(last, tz), tz=tz, **fields)


FILTERS = {
    "utc": _window(0, 10),
    "utc-channel": _window(0, 21, group_by=GroupBy("channel")),
    "kolkata-plan": _window(3, 17, KOLKATA, group_by=GroupBy("attr", "plan")),
    "kathmandu-source": _window(2, 30, KATHMANDU, group_by=GroupBy("source")),
    "new-york-first-campaign": _window(
        1, 16, NEW_YORK, touch="first", group_by=GroupBy("campaign")
    ),
    "web-only": _window(0, 25, channels=("web",), group_by=GroupBy("attr", "query_type")),
    "plan-pro": _window(-3, 25, KOLKATA, attributes={"plan": "pro"}),
    "touch-google": _window(0, 25, touch_filters={"source": "google"}, group_by=GroupBy("channel")),
    "campaign-spring": _window(0, 25, touch_filters={"campaign": "spring"}),
    "empty": _window(100, 101),
    "unbounded": MetricFilter(group_by=GroupBy("channel")),
    "until-only": MetricFilter(until=T0 + 12 * DAY, tz=KOLKATA),
}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    for engine, _ in world_engine(request.param, str(tmp_path_factory.mktemp("world"))):
        _add_late_conversations(engine)
        _add_plans_and_nps(engine)
        yield engine


def _add_late_conversations(engine: Engine) -> None:
    # Written after everything else, but earlier than most of the stored history.
    writer = Writer(engine)
    for user, day in (("w1", -2), ("m2", 4), ("w5", 9)):
        channel = "messenger" if user.startswith("m") else "web"
        started = T0 + day * DAY + timedelta(hours=5)
        writer.write(
            [
                ev.Message(
                    channel=channel,
                    occurred_at=started + timedelta(minutes=minute),
                    key=f"late-{user}-{minute}",
                    role=role,
                    user_id=user,
                    text="late message",
                    conversation_id=f"late-{user}",
                )  # type: ignore[arg-type]
                for minute, role in ((0, "user"), (1, "bot"))
            ]
        )
        writer.write(
            [
                ev.ConversationUpdate(
                    channel=channel,
                    occurred_at=started + timedelta(minutes=2),
                    user_id=user,
                    conversation_id=f"late-{user}",
                    resolved=True,
                )
            ]
        )


def _add_plans_and_nps(engine: Engine) -> None:
    with engine.begin() as connection:
        ids = sorted(connection.execute(select(Conversation.id)).scalars())
        plans = [
            {"conversation_id": conversation_id, "name": "plan", "value": ("pro", "free")[n % 2]}
            for n, conversation_id in enumerate(ids)
            if n % 3 != 2
        ]
        connection.execute(insert(ConversationAttribute), plans)
        surveyed = set(connection.execute(select(Survey.conversation_id)).scalars())
        # Two CSAT surveys in three count as sent, and the others were never sent.
        connection.execute(
            update(Survey).where(Survey.id % 3 != 0).values(sent_at_ms=Survey.created_at_ms)
        )
        rows = []
        for n, conversation_id in enumerate(ids):
            if conversation_id in surveyed or n % 2:
                continue
            rows.append(
                {
                    "conversation_id": conversation_id,
                    "channel": "web",
                    "name": "nps",
                    "kind": "nps",
                    "trigger": "end",
                    "state": "answered",
                    "locale": "en",
                    "created_at_ms": ev.to_ms(T0),
                    "sent_at_ms": None if n % 7 == 0 else ev.to_ms(T0),
                    "comment_window_ms": 0,
                    "score": None if n % 5 == 0 else n % 11,
                    "reasks": 0,
                    "used_template": False,
                }
            )
        connection.execute(insert(Survey), rows)


def _outcome(compute: Callable[[], dict[str, Any]]) -> Any:
    try:
        return compute()
    except FilterError as error:
        return f"FilterError: {error}"


def _legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (conversion, cpa, ltv):
        monkeypatch.setattr(module, "attributed_conversions", reference.attributed_conversions)
    monkeypatch.setattr(cpa, "_spend_by_group", reference.spend_by_group)


CASES = list(FILTERS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hours", [None, 0.0, 200.0])
def test_resolution_matches_rows(stored: Engine, case: str, hours: float | None) -> None:
    flt, options = FILTERS[case], {"repeat_hours": hours}
    expected = _outcome(lambda: reference.first_contact_resolution(stored, flt, options))
    assert _outcome(lambda: first_contact_resolution(stored, flt, options)) == expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prefer", ["intent", "rules"])
def test_query_types_match_rows(stored: Engine, case: str, prefer: str) -> None:
    flt, options = FILTERS[case], {"prefer": prefer}
    expected = reference.query_types(stored, flt, options)
    assert query_types(stored, flt, options) == expected


@pytest.mark.parametrize("case", CASES)
def test_csat_and_nps_match_rows(stored: Engine, case: str) -> None:
    flt = FILTERS[case]
    assert csat(stored, flt) == reference.survey_metric(stored, flt, "csat")
    assert nps(stored, flt) == reference.survey_metric(stored, flt, "nps")


def test_surveys_fixture_has_answers(stored: Engine) -> None:
    result = nps(stored, FILTERS["unbounded"])
    assert result["answers"] > 0
    assert result["sent"] > result["answers"]
    assert csat(stored, FILTERS["unbounded"])["sent"] > 0


@pytest.mark.parametrize("case", CASES)
def test_leads_match_rows(stored: Engine, case: str) -> None:
    flt = FILTERS[case]
    assert leads(stored, flt) == reference.leads_metric(stored, flt)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_retention_matches_rows(stored: Engine, case: str, period: str) -> None:
    flt, options = FILTERS[case], {"period": period, "periods": 4}
    if flt.until is None and period == "day":
        pytest.skip("an unbounded daily table runs to today and would differ by the clock")
    expected = reference.retention_metric(stored, flt, options)
    assert retention(stored, flt, options) == expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("days", [0.0, 7.0, 30.0])
def test_conversion_matches_rows(
    stored: Engine, monkeypatch: pytest.MonkeyPatch, case: str, days: float
) -> None:
    flt, options = FILTERS[case], {"attribution_days": days}
    actual = _outcome(lambda: conversion.conversion_rate(stored, flt, options))
    _legacy(monkeypatch)
    assert actual == _outcome(lambda: conversion.conversion_rate(stored, flt, options))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("days", [0.0, 7.0, 30.0])
def test_cpa_matches_rows(
    stored: Engine, monkeypatch: pytest.MonkeyPatch, case: str, days: float
) -> None:
    flt, options = FILTERS[case], {"attribution_days": days}
    actual = _outcome(lambda: cpa.cost_per_acquisition(stored, flt, options))
    _legacy(monkeypatch)
    assert actual == _outcome(lambda: cpa.cost_per_acquisition(stored, flt, options))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("days", [0.0, 7.0])
def test_ltv_matches_rows(
    stored: Engine, monkeypatch: pytest.MonkeyPatch, case: str, days: float
) -> None:
    options = {"attribution_days": days, "as_of": "2024-04-01T00:00:00Z"}
    flt = FILTERS[case]
    actual = _outcome(lambda: ltv.lifetime_value(stored, flt, options))
    _legacy(monkeypatch)
    assert actual == _outcome(lambda: ltv.lifetime_value(stored, flt, options))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"hours": "mon-fri 09:00-12:30,13:30-18:00; sat 22:00-02:00", "hours_tz": "Asia/Kolkata"},
        {"hours": "mon-sun 08:15-20:45", "hours_tz": "America/New_York"},
    ],
    ids=["default", "kolkata-overnight", "new-york-daily"],
)
def test_business_response_time_matches_rows(
    stored: Engine, monkeypatch: pytest.MonkeyPatch, case: str, options: dict[str, str]
) -> None:
    flt = FILTERS[case]
    actual = business_hours.response_time_business(stored, flt, options)
    monkeypatch.setattr(business_hours, "collect_business_durations", reference.business_durations)
    assert actual == business_hours.response_time_business(stored, flt, options)


def test_business_fixture_has_answers(stored: Engine) -> None:
    result = business_hours.response_time_business(stored, FILTERS["unbounded"], {})
    figures = result["reply_time"]["business"]["all"]
    assert figures["count"] > 0
    assert figures["max"] > 0


def test_legacy_path_is_patched(stored: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    _legacy(monkeypatch)
    assert conversion.attributed_conversions is reference.attributed_conversions
    assert cpa._spend_by_group is reference.spend_by_group
