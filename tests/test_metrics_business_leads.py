"""Lead detection in user messages, lead storage and the leads metric."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from business_support import DAY, T0, World, rate, world_engine
from sqlalchemy import Engine, select

from chatmw import events as ev
from chatmw.api import compute_metric
from chatmw.business import BusinessSettings, install
from chatmw.business_detect import (
    find_emails,
    find_phones,
    hash_value,
    load_query_rules,
    parse_query_rules,
)
from chatmw.events_business import Lead
from chatmw.metrics import REGISTRY
from chatmw.store.models import ConversationAttribute
from chatmw.store.models_business import Lead as LeadRow
from chatmw.store.writer import Writer

SINCE, UNTIL = T0 + 5 * DAY, T0 + 15 * DAY
WINDOW = {"since": [SINCE.isoformat()], "until": [UNTIL.isoformat()]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    yield from world_engine(request.param, str(tmp_path_factory.mktemp("world")))


def run(engine: Engine, name: str, params: dict[str, list[str]]) -> dict[str, Any]:
    return compute_metric(engine, REGISTRY[name], params)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me: John.Doe@Example.COM.", ["john.doe@example.com"]),
        ("a@b.c or me@localhost", []),
        (
            "x foo@bar.co.uk, y user+tag@sub.domain.org",
            ["foo@bar.co.uk", "user+tag@sub.domain.org"],
        ),
        ("foo@@bar.com", []),
        ("same a@x.io and A@X.io", ["a@x.io"]),
    ],
)
def test_emails_found(text: str, expected: list[str]) -> None:
    assert find_emails(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call me at +44 20 7946 0958 please", ["+442079460958"]),
        ("my number is 06 12 34 56 78.", ["0612345678"]),
        ("(555) 123-4567", ["5551234567"]),
        ("+1 (415) 555-0100", ["+14155550100"]),
        ("0612345678", ["0612345678"]),
        ("+33612345678, thanks", ["+33612345678"]),
        ("order 123456789", []),
        ("on 2024-03-01 at 10:00", []),
        ("crossed 100K on (03/18/2020) but", []),
        ("server 192.168.100.200", []),
        ("price 1234.56 eur", []),
        ("open 09:00 - 17:30", []),
        ("zip 75001", []),
        ("card 4111 1111 1111 1111", []),
        ("555-1234", []),
        ("+1 234 567 890 123 456 789", []),
    ],
)
def test_phones_found(text: str, expected: list[str]) -> None:
    assert find_phones(text) == expected


def test_query_rules_file_errors(tmp_path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\ntype = "refund"\nkeywords = ["refund"]\n\n[[rule]]\ntype = "x"\n')
    with pytest.raises(ValueError, match=r"rule\[1\]: needs 'keywords' or 'pattern'"):
        load_query_rules(path)
    path.write_text('[[rule]]\ntype = "x"\npattern = "("\n')
    with pytest.raises(ValueError, match=r"rule\[0\]\.pattern: invalid regular expression"):
        load_query_rules(path)
    json_path = tmp_path / "rules.json"
    json_path.write_text('[{"type": "refund", "keywords": ["refund"]}]')
    assert [rule.type for rule in load_query_rules(json_path)] == ["refund"]


def write_user_message(
    writer: Writer, key: str, text: str, user: str = "u1", **fields: Any
) -> None:
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0 + timedelta(minutes=len(key)),
                key=key,
                role="user",
                user_id=user,
                text=text,
                **fields,
            )
        ]
    )


@pytest.mark.parametrize(
    ("redact", "text_mode", "kept"),
    [
        (True, "full", False),
        (False, "none", True),
        (None, None, False),
        (None, "redacted", False),
        (None, "full", True),
    ],
)
def test_lead_stored_hashed_when_redacted(
    engine: Engine, redact: bool | None, text_mode: str | None, kept: bool
) -> None:
    writer = Writer(engine)
    install(writer, BusinessSettings(redact_leads=redact), text_mode=text_mode)
    write_user_message(writer, "m1", "reach me at Ann@Example.org or +33 6 12 34 56 78")
    write_user_message(writer, "m22", "again: ann@example.org")
    with engine.connect() as connection:
        rows = connection.execute(
            select(LeadRow.kind, LeadRow.value, LeadRow.value_hash, LeadRow.origin).order_by(
                LeadRow.kind
            )
        ).all()
    email_hash = hashlib.sha256(b"email:ann@example.org").hexdigest()
    phone_hash = hashlib.sha256(b"phone:+33612345678").hexdigest()
    assert [(kind, digest, origin) for kind, _, digest, origin in rows] == [
        ("email", email_hash, "message"),
        ("phone", phone_hash, "message"),
    ]
    assert [value for _, value, _, _ in rows] == (
        ["ann@example.org", "+33612345678"] if kept else [None, None]
    )


def test_lead_hash_uses_key(engine: Engine) -> None:
    writer = Writer(engine)
    install(writer, BusinessSettings(lead_hash_key=b"secret"))
    write_user_message(writer, "m1", "ann@example.org")
    with engine.connect() as connection:
        digest = connection.execute(select(LeadRow.value_hash)).scalar_one()
    assert digest == hash_value("email", "ann@example.org", b"secret")
    assert digest != hashlib.sha256(b"email:ann@example.org").hexdigest()


def test_no_leads_from_bot_or_when_disabled(engine: Engine) -> None:
    writer = Writer(engine)
    install(writer, BusinessSettings(detect_leads=False))
    write_user_message(writer, "m1", "ann@example.org")
    install(writer, BusinessSettings())
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0,
                key="b1",
                role="bot",
                user_id="u1",
                text="write to help@shop.example",
            )
        ]
    )
    with engine.connect() as connection:
        assert connection.execute(select(LeadRow.id)).all() == []


def test_recorded_lead_joins_latest_conversation(engine: Engine) -> None:
    writer = Writer(engine)
    install(writer)
    write_user_message(writer, "a", "hi", conversation_id="c-old")
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0 + DAY,
                key="b",
                role="user",
                user_id="u1",
                text="hi",
                conversation_id="c-new",
            )
        ]
    )
    writer.write(
        [
            Lead(
                channel="web",
                occurred_at=T0 + DAY + timedelta(hours=1),
                key="l1",
                user_id="u1",
                kind="email",
                value="x@y.org",
                score=80.0,
            ),
            Lead(
                channel="web",
                occurred_at=T0 + 2 * DAY,
                key="l2",
                user_id="u1",
                kind="phone",
                value="+123456789",
                conversation_id="c-old",
                score=40.0,
            ),
        ]
    )
    by_day = run(
        engine, "leads", {"since": [(T0 + DAY).isoformat()], "until": [(T0 + 2 * DAY).isoformat()]}
    )
    assert by_day["leads"] == 1
    assert by_day["average_score"] == 80.0
    everything = run(engine, "leads", {})
    assert everything["leads"] == 2
    assert everything["by_origin"] == {"message": 0, "api": 2}
    assert everything["average_score"] == 60.0
    assert everything["scored_leads"] == 2


def test_query_type_from_earliest_message(engine: Engine) -> None:
    writer = Writer(engine)
    install(
        writer,
        BusinessSettings(
            query_rules=parse_query_rules(
                [
                    {"type": "refund", "keywords": ["refund"]},
                    {"type": "delivery", "keywords": ["parcel"]},
                ]
            )
        ),
    )
    later = T0 + timedelta(minutes=5)
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=later,
                key="second",
                role="user",
                user_id="u1",
                text="where is my parcel",
                conversation_id="c1",
            )
        ]
    )
    assert attribute_of(engine) == "delivery"
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0,
                key="first",
                role="user",
                user_id="u1",
                text="I need a refund",
                conversation_id="c1",
            )
        ]
    )
    assert attribute_of(engine) == "refund"
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0 + timedelta(minutes=9),
                key="third",
                role="user",
                user_id="u1",
                text="parcel?",
                conversation_id="c1",
            )
        ]
    )
    assert attribute_of(engine) == "refund"
    writer.write(
        [
            ev.Message(
                channel="web",
                occurred_at=T0 - timedelta(minutes=1),
                key="zeroth",
                role="user",
                user_id="u1",
                text="hello",
                conversation_id="c1",
            )
        ]
    )
    assert attribute_of(engine) is None


def attribute_of(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return connection.execute(
            select(ConversationAttribute.value).where(ConversationAttribute.name == "query_type")
        ).scalar_one_or_none()


def expected_leads(world: World) -> dict[str, dict[str, Any]]:
    convs = {c.id: c for c in world.in_window(SINCE, UNTIL)}
    seen: set[tuple[str, str, str, str]] = set()
    leads = []
    for channel, user, kind, value, at, conv_id, _ in world.leads:
        if (channel, user, kind, value) in seen:
            continue
        seen.add((channel, user, kind, value))
        if conv_id in convs:
            leads.append((channel, user, kind, at, conv_id))
    groups: dict[str, list] = defaultdict(list)
    for lead in leads:
        touch = world.last_touch(convs[lead[4]])
        groups["(all)"].append(lead)
        groups[(touch or {}).get("source") or "(none)"].append(lead)
    expected = {}
    for name, items in groups.items():
        converted = [
            lead
            for lead in items
            if any(
                world.conversion_owner(c) == (lead[0], lead[1]) and c.at >= lead[3]
                for c in world.conversions
            )
        ]
        expected[name] = {
            "leads": len(items),
            "users": len({(lead[0], lead[1]) for lead in items}),
            "by_kind": {
                kind: sum(1 for lead in items if lead[2] == kind) for kind in ("email", "phone")
            },
            "converted_leads": len(converted),
            "lead_quality": rate(len(converted), len(items)),
        }
    return expected


def test_leads_match_records(stored: tuple[Engine, World]) -> None:
    engine, world = stored
    result = run(engine, "leads", WINDOW)
    expected = expected_leads(world)
    names = ["leads", "users", "by_kind", "converted_leads", "lead_quality"]
    assert {name: result[name] for name in names} == expected.pop("(all)")
    assert {
        row["group"]: {name: row[name] for name in names} for row in result["by_source"]
    } == expected
    assert result["by_origin"] == {"message": result["leads"], "api": 0}
    assert result["average_score"] is None
    assert result["leads"] >= 3


def test_leads_empty_window(stored: tuple[Engine, World]) -> None:
    result = run(stored[0], "leads", {"since": ["2023-01-01"], "until": ["2023-02-01"]})
    assert result["leads"] == 0
    assert result["lead_quality"] is None
    assert result["by_source"] == []
