"""Resolution, drop-off, query types and engagement against figures computed from the records."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest
from business_support import DAY, STEPS, T0, ConversationRecord, World, rate, world_engine
from sqlalchemy import Engine

from chatmw import events as ev
from chatmw.api import compute_metric
from chatmw.metrics import REGISTRY, FilterError
from chatmw.store.writer import Writer

SINCE, UNTIL = T0 + 5 * DAY, T0 + 15 * DAY
WINDOW = {"since": [SINCE.isoformat()], "until": [UNTIL.isoformat()]}
EMPTY = {"since": ["2023-01-01"], "until": ["2023-02-01"]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    yield from world_engine(request.param, str(tmp_path_factory.mktemp("world")))


def run(engine: Engine, name: str, params: dict[str, list[str]]) -> dict[str, Any]:
    return compute_metric(engine, REGISTRY[name], params)


def repeated(world: World, conv: ConversationRecord, hours: float) -> bool:
    if world.contact(conv) is None:
        return False
    return any(
        other is not conv
        and world.contact(other) == world.contact(conv)
        and conv.start < other.start <= conv.end + timedelta(hours=hours)
        for other in world.conversations
    )


def expected_resolution(
    world: World, convs: list[ConversationRecord], hours: float
) -> dict[str, Any]:
    resolved = [c for c in convs if c.resolved]
    handed = [c for c in resolved if c.handed_off]
    repeats = [c for c in resolved if repeated(world, c, hours)]
    fcr = [c for c in resolved if not c.handed_off and not repeated(world, c, hours)]
    return {
        "conversations": len(convs),
        "resolved": len(resolved),
        "resolved_handed_off": len(handed),
        "resolved_repeated": len(repeats),
        "first_contact_resolved": len(fcr),
        "resolution_rate": rate(len(resolved), len(convs)),
        "fcr_rate": rate(len(fcr), len(resolved)),
    }


@pytest.mark.parametrize("hours", [None, "2", "200"])
def test_resolution_matches_records(stored: tuple[Engine, World], hours: str | None) -> None:
    engine, world = stored
    params = dict(WINDOW) if hours is None else {**WINDOW, "repeat_hours": [hours]}
    result = run(engine, "resolution", params)
    expected = expected_resolution(world, world.in_window(SINCE, UNTIL), float(hours or 24))
    assert {name: result[name] for name in expected} == expected
    assert expected["resolved_repeated"] > 0 or hours == "2"


def test_resolution_by_channel_and_empty(stored: tuple[Engine, World]) -> None:
    engine, world = stored
    result = run(engine, "resolution", {**WINDOW, "group_by": ["channel"]})
    for group in result["groups"]:
        expected = expected_resolution(world, world.in_window(SINCE, UNTIL, group["group"]), 24)
        assert {name: group[name] for name in expected} == expected
    empty = run(engine, "resolution", EMPTY)
    assert empty["conversations"] == 0
    assert empty["fcr_rate"] is None
    assert empty["resolution_rate"] is None


def test_resolution_repeat_within_hours(engine: Engine) -> None:
    writer = Writer(engine)
    moments = {"a": T0, "b": T0 + timedelta(hours=10), "c": T0 + timedelta(hours=40)}
    for name, moment in moments.items():
        writer.write(
            [
                ev.Message(
                    channel="web",
                    occurred_at=moment,
                    key=name,
                    role="user",
                    user_id="u",
                    text="hi",
                    conversation_id=name,
                )
            ]
        )
        writer.write(
            [
                ev.ConversationUpdate(
                    channel="web",
                    occurred_at=moment,
                    user_id="u",
                    conversation_id=name,
                    resolved=True,
                )
            ]
        )
    result = run(engine, "resolution", {})
    # "a" is followed by "b" 10 hours later: a repeat; "b" by "c" 30 hours later: not one.
    assert result["resolved"] == 3
    assert result["resolved_repeated"] == 1
    assert result["first_contact_resolved"] == 2


def last_step(conv: ConversationRecord) -> str:
    intents = conv.bot_intents
    return conv.step or (intents[-1] if intents else None) or "(unknown)"


def test_dropoff_last_steps_and_funnel(stored: tuple[Engine, World]) -> None:
    engine, world = stored
    result = run(engine, "dropoff", {**WINDOW, "steps": [",".join(STEPS)]})
    convs = world.in_window(SINCE, UNTIL)
    converted = {cid for targets in world.attributed().values() for cid in targets}
    # The records are from 2024, so every conversation is idle for more than 30 minutes.
    dropped = [c for c in convs if not c.resolved and c.id not in converted]
    counts: dict[str, int] = defaultdict(int)
    for conv in dropped:
        counts[last_step(conv)] += 1
    assert result["conversations"] == len(convs)
    assert result["dropped"] == len(dropped)
    assert result["dropoff_rate"] == rate(len(dropped), len(convs))
    assert {row["step"]: row["conversations"] for row in result["last_steps"]} == counts
    assert {row["step"]: row["share"] for row in result["last_steps"]} == {
        step: rate(count, len(dropped)) for step, count in counts.items()
    }

    furthest = []
    for conv in convs:
        seen = [*conv.bot_intents, *([conv.step] if conv.step else [])]
        furthest.append(max((STEPS.index(s) for s in seen if s in STEPS), default=-1))
    previous = len(convs)
    for index, row in enumerate(result["funnel"]):
        reached = sum(1 for value in furthest if value >= index)
        assert row == {
            "step": STEPS[index],
            "reached": reached,
            "lost": previous - reached,
            "lost_share": rate(previous - reached, previous),
            "share_of_start": rate(reached, len(convs)),
        }
        previous = reached
    assert len(result["funnel"]) == 3


def test_dropoff_open_conversation_not_dropped(engine: Engine) -> None:
    writer = Writer(engine)
    now = ev.now_utc()
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=now - timedelta(minutes=5),
                key="fresh",
                role="user",
                user_id="u1",
                text="hi",
            ),
            ev.Message(
                channel="web",
                occurred_at=now - timedelta(hours=3),
                key="stale",
                role="user",
                user_id="u2",
                text="hi",
            ),
        ]
    )
    result = run(engine, "dropoff", {"idle_minutes": ["30"]})
    assert result["conversations"] == 2
    assert result["dropped"] == 1
    assert result["last_steps"] == [{"step": "(unknown)", "conversations": 1, "share": 1.0}]


@pytest.mark.parametrize("steps", ["a,,b", "a,a", ","])
def test_dropoff_rejects_bad_steps(stored: tuple[Engine, World], steps: str) -> None:
    with pytest.raises(FilterError) as caught:
        run(stored[0], "dropoff", {"steps": [steps]})
    assert caught.value.param == "steps"


def rule_type(text: str | None) -> str | None:
    if text is None:
        return None
    if "refund" in text.lower() or "money back" in text.lower():
        return "refund"
    if re.search(r"deliver(y|ed)?\b", text, re.IGNORECASE):
        return "delivery"
    return None


def expected_types(convs: list[ConversationRecord], prefer: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[ConversationRecord]] = defaultdict(list)
    for conv in convs:
        ruled = rule_type(conv.first_user_text)
        chosen = (conv.intent or ruled) if prefer == "intent" else (ruled or conv.intent)
        groups[chosen or "unclassified"].append(conv)
    expected = {}
    for kind, items in groups.items():
        scores = [c.csat for c in items if c.csat is not None]
        satisfied = rate(sum(1 for s in scores if s >= 4), len(scores))
        expected[kind] = {
            "conversations": len(items),
            "share": rate(len(items), len(convs)),
            "resolved": sum(c.resolved for c in items),
            "resolution_rate": rate(sum(c.resolved for c in items), len(items)),
            "csat": {
                "responses": len(scores),
                "csat_pct": None if satisfied is None else round(satisfied * 100, 2),
                "mean": round(sum(scores) / len(scores), 3) if scores else None,
            },
        }
    return expected


@pytest.mark.parametrize("prefer", ["intent", "rules"])
def test_query_types_match_records(stored: tuple[Engine, World], prefer: str) -> None:
    engine, world = stored
    result = run(engine, "query-types", {**WINDOW, "prefer": [prefer]})
    convs = world.in_window(SINCE, UNTIL)
    actual = {row["type"]: {k: v for k, v in row.items() if k != "type"} for row in result["types"]}
    expected = expected_types(convs, prefer)
    assert actual == expected
    assert {"billing", "unclassified"} <= set(expected)
    if prefer == "rules":
        assert {"refund", "delivery"} <= set(expected)
    assert result["classified"] == len(convs) - expected["unclassified"]["conversations"]


def test_query_types_rule_attribute_filter(stored: tuple[Engine, World]) -> None:
    engine, world = stored
    result = run(
        engine, "query-types", {**WINDOW, "attr.query_type": ["refund"], "prefer": ["rules"]}
    )
    refunds = [c for c in world.in_window(SINCE, UNTIL) if rule_type(c.first_user_text) == "refund"]
    assert result["conversations"] == len(refunds)
    assert [row["type"] for row in result["types"]] == ["refund"]


def test_query_types_empty_window(stored: tuple[Engine, World]) -> None:
    result = run(stored[0], "query-types", EMPTY)
    assert result["conversations"] == 0
    assert result["types"] == []


def expected_engagement(world: World, since: datetime, until: datetime) -> dict[str, Any]:
    convs = world.in_window(since, until)
    known = {channel for channel, _, _ in world.exposures}
    exposed: dict[str, set[str]] = defaultdict(set)
    for channel, user, at in world.exposures:
        if since <= at < until:
            exposed[channel].add(user)
    proactive: dict[str, set[str]] = defaultdict(set)
    writers: dict[str, set[str]] = defaultdict(set)
    for conv in convs:
        if conv.proactive:
            proactive[conv.channel].add(conv.user)
        if conv.user_messages >= 1:
            writers[conv.channel].add(conv.user)
    channels = {}
    for channel in sorted(known | {c.channel for c in convs}):
        if channel not in known and not proactive[channel]:
            channels[channel] = None
            continue
        reached = exposed[channel] | proactive[channel]
        engaged = reached & writers[channel]
        channels[channel] = (len(reached), len(engaged), rate(len(engaged), len(reached)))
    engaged_conversations = sum(1 for c in convs if c.user_messages >= 2)
    return {"channels": channels, "conversations": len(convs), "engaged": engaged_conversations}


def test_engagement_matches_records(stored: tuple[Engine, World]) -> None:
    engine, world = stored
    result = run(engine, "engagement", WINDOW)
    expected = expected_engagement(world, SINCE, UNTIL)
    actual = {}
    for row in result["users"]["channels"]:
        actual[row["channel"]] = (
            None
            if row["reach"] is None
            else (row["reach"], row["engaged_users"], row["engagement_rate"])
        )
    assert actual == expected["channels"]
    assert result["conversations"] == expected["conversations"]
    assert result["engaged_conversations"] == expected["engaged"]
    assert result["conversation_engagement_rate"] == rate(
        expected["engaged"], expected["conversations"]
    )
    with_data = [value for value in expected["channels"].values() if value is not None]
    assert result["users"]["reach"] == sum(value[0] for value in with_data)
    assert result["users"]["engaged_users"] == sum(value[1] for value in with_data)


def test_engagement_notes_channel_without_exposures(stored: tuple[Engine, World]) -> None:
    result = run(stored[0], "engagement", WINDOW)
    rows = {row["channel"]: row for row in result["users"]["channels"]}
    assert rows["whatsapp"]["reach"] is None
    assert rows["whatsapp"]["reach_note"] == "no exposure data for channel whatsapp"
    assert "no exposure data for channel whatsapp" in result["users"]["reach_notes"]
    assert rows["messenger"]["reach_note"].endswith("reach counts proactive conversations only")
    assert "reach_note" not in rows["web"]


def test_engagement_empty_window(stored: tuple[Engine, World]) -> None:
    result = run(stored[0], "engagement", EMPTY)
    rows = {row["channel"]: row for row in result["users"]["channels"]}
    assert rows["web"]["reach"] == 0
    assert rows["web"]["engagement_rate"] is None
    assert result["users"]["engagement_rate"] is None
    assert result["conversations"] == 0
    assert result["conversation_engagement_rate"] is None


def test_engagement_without_any_reach_data(engine: Engine) -> None:
    writer = Writer(engine)
    writer.write(
        [
            ev.Message(
                channel="twitter", occurred_at=T0, key="t1", role="user", user_id="u1", text="hi"
            )
        ]
    )
    result = run(engine, "engagement", {})
    assert result["users"]["reach"] is None
    assert result["users"]["engaged_users"] is None
    assert result["users"]["engagement_rate"] is None
    assert result["users"]["reach_notes"] == ["no exposure data for channel twitter"]
    assert result["conversations"] == 1
