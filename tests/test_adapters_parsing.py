"""Messenger and WhatsApp webhook parsing, checked field by field against the fixtures."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from adapters_support import SHARED_PAYLOADS, fixture_bytes

from chatmw import events as ev
from chatmw.adapters._meta import time_from_epoch
from chatmw.adapters.messenger import Watermark
from chatmw.adapters.webhook import WebhookFormatError, parse_webhook

RECEIVED = datetime(2026, 2, 1, tzinfo=UTC)
T = datetime(2026, 1, 1, tzinfo=UTC)
T_MS = 1767225600000


def at_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def by_type(found: list[ev.Event], kind: type) -> list:
    return [item for item in found if type(item) is kind]


def test_messenger_text_keeps_accents_and_emoji() -> None:
    found = parse_webhook(fixture_bytes("messenger_text.json"), RECEIVED)
    assert len(found) == 1
    message = found[0]
    assert isinstance(message, ev.Message)
    assert message.text == "Olá, café às 9h? 😀 naïve façade"
    assert message.key == "messenger:m_text_0001"
    assert message.role == "user"
    assert message.user_id == "7100000000000001"
    assert message.occurred_at == T
    assert message.meta["quick_reply_payload"] == "MORNING"
    assert message.meta["page_id"] == "104857600000001"


def test_messenger_mixed_entry() -> None:
    found = parse_webhook(fixture_bytes("messenger_mixed.json"), RECEIVED)
    messages = {item.key: item for item in by_type(found, ev.Message)}
    touches = by_type(found, ev.Touch)
    statuses = by_type(found, ev.Status)
    watermarks = by_type(found, Watermark)
    raws = by_type(found, ev.RawPayload)

    postback = messages["messenger:m_postback_0001"]
    assert postback.kind == "postback"
    assert postback.text == "Get Started"
    assert postback.meta["postback_payload"] == "GET_STARTED"

    image = messages["messenger:m_image_0001"]
    assert image.text is None
    assert image.meta["attachments"] == ["image"]
    assert image.reply_to == "m_bot_0001"

    bot_echo = messages["messenger:m_echo_bot_0001"]
    assert bot_echo.role == "bot"
    assert bot_echo.user_id == "7100000000000001"
    assert bot_echo.meta["app_id"] == "9900000000000001"
    agent_echo = messages["messenger:m_echo_agent_0001"]
    assert agent_echo.role == "agent"
    assert agent_echo.user_id == "7100000000000001"

    reactions = [item for item in messages.values() if item.kind == "reaction"]
    assert len(reactions) == 1
    assert reactions[0].text == "❤️"
    assert reactions[0].reply_to == "m_echo_bot_0001"

    standby = messages["messenger:m_standby_0001"]
    assert standby.meta["standby"] is True
    assert standby.role == "user"

    assert [(s.platform_message_id, s.status) for s in statuses] == [
        ("m_echo_bot_0001", "delivered")
    ]
    # The delivery item has no timestamp, so the entry time is used.
    assert statuses[0].occurred_at == at_ms(T_MS + 60000)
    assert [(w.status, w.watermark) for w in watermarks] == [
        ("delivered", at_ms(T_MS + 4500)),
        ("read", at_ms(T_MS + 5000)),
    ]

    by_source = {touch.source: touch for touch in touches}
    assert set(by_source) == {"SHORTLINK", "ADS", "CUSTOMER_CHAT_PLUGIN"}
    assert by_source["SHORTLINK"].campaign == "spring-sale"
    assert by_source["SHORTLINK"].meta["origin"] == "postback"
    ad = by_source["ADS"]
    assert ad.kind == "ad"
    assert ad.medium == "ad"
    assert ad.ad_id == "6001234567890"
    assert ad.campaign == "retarget-7"
    assert ad.meta["ad_title"] == "Spring sale"
    assert ad.user_id == "7100000000000002"
    assert by_source["CUSTOMER_CHAT_PLUGIN"].referrer == "https://shop.example.com/pricing"

    assert len(raws) == 1
    assert raws[0].source == "messenger_unknown"
    assert "message_edit" in raws[0].reason


def test_messenger_postback_with_string_seconds() -> None:
    found = parse_webhook(fixture_bytes("messenger_postback_seconds.json"), RECEIVED)
    message = by_type(found, ev.Message)[0]
    touch = by_type(found, ev.Touch)[0]
    assert message.occurred_at == datetime.fromtimestamp(1767225700, UTC)
    assert message.key == "messenger:m_postback_0002"
    assert touch.campaign == "newsletter-jan"
    assert touch.occurred_at == message.occurred_at


def test_whatsapp_every_message_type() -> None:
    found = parse_webhook(fixture_bytes("whatsapp_messages.json"), RECEIVED)
    messages = {item.platform_message_id: item for item in by_type(found, ev.Message)}
    assert len(messages) == 13
    assert all(item.user_id == "4915100000001" for item in messages.values())
    assert all(item.role == "user" for item in messages.values())

    text = messages["wamid.text1"]
    assert text.text == "Hallo! Größe M? 👕"
    assert text.occurred_at == datetime.fromtimestamp(1767225600, UTC)
    assert text.key == "whatsapp:wamid.text1"

    button = messages["wamid.btn1"]
    assert (button.text, button.meta["reply_id"], button.reply_to) == (
        "Size M",
        "size_m",
        "wamid.bot1",
    )
    listed = messages["wamid.list1"]
    assert (listed.text, listed.meta["interactive_type"]) == ("Blue", "list_reply")
    template_button = messages["wamid.tpl1"]
    assert template_button.meta["button_payload"] == "STOP_PROMOS"
    assert messages["wamid.img1"].text == "this one"
    assert messages["wamid.aud1"].meta["type"] == "audio"
    assert messages["wamid.doc1"].meta["mime_type"] == "application/pdf"
    assert messages["wamid.stk1"].meta["type"] == "sticker"
    assert messages["wamid.loc1"].text == "Store Mitte"
    assert messages["wamid.con1"].meta["contacts"] == 1
    reaction = messages["wamid.rea1"]
    assert (reaction.kind, reaction.text, reaction.reply_to) == ("reaction", "👍", "wamid.bot1")
    unsupported = messages["wamid.uns1"]
    assert unsupported.meta["errors"] == [{"code": 131051, "title": "Message type unknown"}]

    touch = by_type(found, ev.Touch)[0]
    assert touch.source == "ad"
    assert touch.ad_id == "120200000000001"
    assert touch.click_id == "ARAkLkA8rmlFeiCktEJQ"
    assert touch.landing_url == "https://fb.me/ad-abc"
    assert touch.meta["headline"] == "Winter jackets"
    assert touch.meta["body"] == "20% off this week"
    assert touch.user_id == "4915100000001"


@pytest.mark.parametrize(
    ("name", "user_id"),
    [
        ("whatsapp_username_only.json", "DE.2000000000000002"),
        ("whatsapp_no_contacts.json", "4915100000002"),
    ],
)
def test_whatsapp_sender_without_full_contact(name: str, user_id: str) -> None:
    found = parse_webhook(fixture_bytes(name), RECEIVED)
    assert len(found) == 1
    assert isinstance(found[0], ev.Message)
    assert found[0].user_id == user_id


def test_whatsapp_statuses_keep_their_times() -> None:
    found = parse_webhook(fixture_bytes("whatsapp_statuses.json"), RECEIVED)
    rows = [(s.platform_message_id, s.status, int(s.occurred_at.timestamp())) for s in found]
    assert rows == [
        ("wamid.bot1", "sent", 1767225605),
        ("wamid.bot1", "delivered", 1767225606),
        ("wamid.bot1", "read", 1767225608),
        ("wamid.bot2", "failed", 1767225609),
    ]
    failed = found[3]
    assert isinstance(failed, ev.Status)
    assert (failed.error_code, failed.error_title) == ("131047", "Re-engagement message")


def test_whatsapp_errors_system_and_unknown_fields_kept() -> None:
    found = parse_webhook(fixture_bytes("whatsapp_errors_system.json"), RECEIVED)
    assert [type(item) for item in found] == [ev.RawPayload] * 3
    sources = [item.source for item in found]
    assert sources == ["whatsapp_error", "whatsapp_system", "whatsapp_unknown"]
    assert "131000" in found[0].reason
    assert "user_changed_number" in found[1].reason


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"object": "user"}', b"\xff\xfe"])
def test_unparseable_bodies_raise(body: bytes) -> None:
    with pytest.raises(WebhookFormatError):
        parse_webhook(body, RECEIVED)


def test_timestamps_told_apart_by_size() -> None:
    assert time_from_epoch(1767225600000, RECEIVED) == T
    assert time_from_epoch("1767225600", RECEIVED) == T
    assert time_from_epoch(None, RECEIVED) == RECEIVED
    assert time_from_epoch("soon", RECEIVED) == RECEIVED
    assert time_from_epoch(-5, RECEIVED) == RECEIVED


def _wrap_messenger_item(document: dict) -> dict:
    if "object" in document:
        return document
    if "messaging" in document:
        return {"object": "page", "entry": [document]}
    if "field" in document:
        return {"object": "page", "entry": [{"id": "1", "time": T_MS, "changes": [document]}]}
    return {"object": "page", "entry": [{"id": "1", "time": T_MS, "messaging": [document]}]}


@pytest.mark.skipif(not SHARED_PAYLOADS.exists(), reason="shared sample payloads not present")
def test_shared_samples_parse_without_unknowns() -> None:
    files = sorted(SHARED_PAYLOADS.glob("*/*.json"))
    assert files
    for path in files:
        if path.name == "wa_signature_vector.json":
            continue
        document = _wrap_messenger_item(json.loads(path.read_bytes()))
        found = parse_webhook(json.dumps(document).encode(), RECEIVED)
        unknown = [
            item
            for item in found
            if isinstance(item, ev.RawPayload) and item.source.endswith("_unknown")
        ]
        assert unknown == [], path.name
        if "without_messaging" not in path.name:
            assert found, path.name


def test_echo_from_agent_app_is_agent() -> None:
    found = parse_webhook(
        fixture_bytes("messenger_mixed.json"),
        RECEIVED,
        agent_app_ids=frozenset({"9900000000000001"}),
    )
    roles = {item.key: item.role for item in by_type(found, ev.Message)}
    assert roles["messenger:m_echo_bot_0001"] == "agent"
    assert roles["messenger:m_echo_agent_0001"] == "agent"


def test_instagram_messages_use_own_channel() -> None:
    document = {
        "object": "instagram",
        "entry": [
            {
                "id": "17841400000000001",
                "time": T_MS,
                "messaging": [
                    {
                        "sender": {"id": "5500000000000001"},
                        "recipient": {"id": "17841400000000001"},
                        "timestamp": T_MS,
                        "message": {"mid": "aWdfZAG1fake", "text": "hola"},
                    }
                ],
            }
        ],
    }
    found = parse_webhook(json.dumps(document).encode(), RECEIVED)
    assert len(found) == 1
    message = found[0]
    assert isinstance(message, ev.Message)
    assert (message.channel, message.key, message.text) == (
        "instagram",
        "instagram:aWdfZAG1fake",
        "hola",
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "mid",
                    "text",
                    "timestamp",
                    "message",
                    "sender",
                    "recipient",
                    "messages",
                    "statuses",
                    "contacts",
                    "from",
                    "type",
                    "referral",
                    "watermark",
                    "mids",
                    "is_echo",
                    "errors",
                    "value",
                    "changes",
                    "messaging",
                    "postback",
                    "payload",
                    "delivery",
                    "read",
                    "interactive",
                    "context",
                    "reaction",
                    "entry",
                    "field",
                    "standby",
                    "wa_id",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["page", "instagram", "whatsapp_business_account"]), entry=JSON_VALUES)
def test_parsers_never_crash_on_odd_shapes(kind: str, entry: object) -> None:
    body = json.dumps({"object": kind, "entry": [entry]}).encode()
    found = parse_webhook(body, RECEIVED)
    assert all(isinstance(item, ev.Event) for item in found)


MESSENGER_KINDS = ["message", "postback", "referral", "delivery", "read", "reaction", "optin"]
WHATSAPP_TYPES = [
    "text",
    "interactive",
    "button",
    "image",
    "reaction",
    "contacts",
    "location",
    "system",
    "unsupported",
    "order",
]


@st.composite
def messenger_entries(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(MESSENGER_KINDS))
    body = draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "mid",
                    "text",
                    "is_echo",
                    "app_id",
                    "quick_reply",
                    "attachments",
                    "reply_to",
                    "payload",
                    "title",
                    "referral",
                    "ref",
                    "ad_id",
                    "source",
                    "mids",
                    "watermark",
                    "emoji",
                    "action",
                    "ads_context_data",
                ]
            ),
            JSON_VALUES,
            max_size=6,
        )
    )
    item = {
        "sender": draw(st.one_of(JSON_VALUES, st.just({"id": "1"}))),
        "recipient": draw(st.one_of(JSON_VALUES, st.just({"id": "2"}))),
        "timestamp": draw(JSON_VALUES),
        kind: body,
    }
    place = draw(st.sampled_from(["messaging", "standby", "changes"]))
    content = [{"field": "messaging_postbacks", "value": item}] if place == "changes" else [item]
    return {"id": draw(JSON_VALUES), "time": draw(JSON_VALUES), place: content}


@st.composite
def whatsapp_entries(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(WHATSAPP_TYPES))
    message = {
        "from": draw(st.one_of(JSON_VALUES, st.just("4915100000001"))),
        "id": draw(st.one_of(JSON_VALUES, st.just("wamid.x"))),
        "timestamp": draw(JSON_VALUES),
        "type": kind,
        kind: draw(JSON_VALUES),
        "context": draw(JSON_VALUES),
        "referral": draw(JSON_VALUES),
        "errors": draw(JSON_VALUES),
    }
    status = draw(
        st.dictionaries(
            st.sampled_from(["id", "status", "timestamp", "recipient_id", "errors"]),
            JSON_VALUES,
            max_size=5,
        )
    )
    value = {
        "metadata": draw(JSON_VALUES),
        "contacts": draw(JSON_VALUES),
        "messages": [message],
        "statuses": [status],
        "errors": draw(JSON_VALUES),
    }
    return {"id": "1", "changes": [{"field": "messages", "value": value}]}


@settings(max_examples=300, deadline=None)
@given(entry=messenger_entries())
def test_messenger_parser_survives_fuzzed_items(entry: dict) -> None:
    found = parse_webhook(json.dumps({"object": "page", "entry": [entry]}).encode(), RECEIVED)
    assert all(isinstance(item, ev.Event) for item in found)


@settings(max_examples=300, deadline=None)
@given(entry=whatsapp_entries())
def test_whatsapp_parser_survives_fuzzed_items(entry: dict) -> None:
    document = {"object": "whatsapp_business_account", "entry": [entry]}
    found = parse_webhook(json.dumps(document).encode(), RECEIVED)
    assert all(isinstance(item, ev.Event) for item in found)


def test_long_ref_cut_to_column_width() -> None:
    ref = "r" * 400
    document = {
        "object": "page",
        "entry": [
            {
                "id": "1",
                "time": T_MS,
                "messaging": [
                    {
                        "sender": {"id": "42"},
                        "recipient": {"id": "1"},
                        "timestamp": T_MS,
                        "referral": {"ref": ref, "source": "SHORTLINK", "type": "OPEN_THREAD"},
                    }
                ],
            }
        ],
    }
    touch = parse_webhook(json.dumps(document).encode(), RECEIVED)[0]
    assert isinstance(touch, ev.Touch)
    assert touch.ref == ref[:255]
    assert touch.campaign == ref[:255]
    assert touch.meta["ref_full"] == ref
    assert touch.meta["campaign_full"] == ref
