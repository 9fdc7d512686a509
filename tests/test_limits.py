"""Very long values in every field of every HTTP entry point, on SQLite and PostgreSQL.

A value is stored whole, stored as a prefix plus a hash where it is longer than its
column, or rejected with a 4xx that names the field. No request gets a 500 and the
recorder drops nothing it accepted.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from test_unicode import APP_SECRET, BOT_PATH, META_PATH, Harness, ascii_json, run, widget_message

from chatmw.adapters._meta import sign

LONG_TEXT = "long text é😀 " * 8_000  # 104,000 characters
LONG_ID = "i" * 1_000
LONG_CHANNEL = "c" * 100


def check_ok(label: str, response: httpx.Response) -> None:
    assert response.status_code == 200, f"{label}: {response.status_code} {response.text[:300]}"


def check_named(label: str, response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, f"{label}: {response.status_code} {response.text[:300]}"
    assert field in response.text, f"{label}: {response.text[:300]}"


async def post_json(h: Harness, path: str, document: Any, **headers: str) -> httpx.Response:
    return await h.client.post(path, content=ascii_json(document),
                               headers={"content-type": "application/json", **headers})


# The middleware-wrapped bot


def test_wrapped_bot_long_text_stored_whole(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        response = await post_json(h, BOT_PATH, {"sender": "long-text-user", "message": LONG_TEXT})
        check_ok("long text", response)
        h.flush()

        assert h.write_errors() == {}
        texts = [row.text for row in h.messages(role="user")]
        assert texts == [LONG_TEXT]

    run(database_url, scenario)


@pytest.mark.parametrize(("field", "document"), [
    ("sender", {"sender": LONG_ID, "message": "hi"}),
    ("conversation_id", {"sender": "u1", "message": "hi",
                         "metadata": {"conversation_id": LONG_ID}}),
    ("channel", {"sender": "u1", "message": "hi", "metadata": {"channel": LONG_CHANNEL}}),
])
def test_wrapped_bot_long_ids_recorded(database_url: str,
                                       field: str, document: Any) -> None:

    async def scenario(h: Harness) -> None:
        response = await post_json(h, BOT_PATH, document)
        check_ok(field, response)
        h.flush()

        assert h.write_errors() == {}, field
        assert len(h.messages(role="user")) == 1, field

    run(database_url, scenario)


# The widget's chat endpoint


def test_widget_long_text_rejected_by_name(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        response = await post_json(h, "/chat/messages", widget_message(1, "x" * 2_001))
        check_named("text", response, 413, "maximum is 2000")

    run(database_url, scenario)


def test_widget_large_body_rejected(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        body = widget_message(1, "hello", padding="p" * 40_000)
        response = await post_json(h, "/chat/messages", body)
        assert response.status_code == 413, response.text[:300]

    run(database_url, scenario)


def test_widget_long_ids_rejected_by_name(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for field in ("visitor_id", "conversation_id", "message_id"):
            body = widget_message(1, "hi") | {field: "a" * 65}
            response = await post_json(h, "/chat/messages", body)
            check_named(field, response, 422, field)

    run(database_url, scenario)


def test_widget_long_attribution_cut(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        touch = {"source": "s" * 1_000, "medium": "m" * 1_000, "campaign": "c" * 1_000,
                 "gclid": "g" * 2_000, "landing_url": "https://site.test/" + "p" * 5_000,
                 "referrer": "https://ref.test/" + "r" * 5_000}
        body = widget_message(1, "hi", page_url="https://site.test/" + "q" * 5_000,
                              attribution={"first": touch, "last": touch})
        check_ok("attribution", await post_json(h, "/chat/messages", body))
        h.flush()

        assert h.write_errors() == {}
        assert len(h.messages(role="user")) == 1

    run(database_url, scenario, max_body_bytes=64_000)


@pytest.mark.parametrize("body", [
    b"1" * 5000,
    b"[" * 50_000,
    b'{"visitor_id": ' + b"9" * 5000 + b"}",
])
def test_widget_json_limits_rejected(database_url: str, body: bytes) -> None:
    async def scenario(h: Harness) -> httpx.Response:
        return await h.client.post("/chat/messages", content=body,
                                   headers={"content-type": "application/json"})

    response = run(database_url, scenario, max_body_bytes=64_000)
    assert response.status_code in (400, 422), response.text[:300]


@pytest.mark.parametrize("url", ["http://[::1", "https://[bad/path", "http://site.test:99999999/"])
def test_widget_malformed_url_ignored(database_url: str, url: str) -> None:
    async def scenario(h: Harness) -> httpx.Response:
        touch = {"source": "news", "landing_url": url, "referrer": url}
        body = widget_message(1, "hi", page_url=url, attribution={"first": touch, "last": touch})
        return await post_json(h, "/chat/messages", body)

    response = run(database_url, scenario)
    assert response.status_code == 200, response.text[:300]


# Meta webhooks


def messenger(mid: str, sender: str, text: str, ref: str | None = None) -> bytes:
    item: dict[str, Any] = {"sender": {"id": sender}, "recipient": {"id": "PAGE"},
                            "timestamp": 1700000000000, "message": {"mid": mid, "text": text}}
    if ref is not None:
        item["message"]["referral"] = {"ref": ref, "source": "ADS", "ad_id": ref}
    return json.dumps({"object": "page", "entry": [{"id": "PAGE", "messaging": [item]}]}).encode()


@pytest.mark.parametrize(("label", "body"), [
    ("text", messenger("mid.1", "psid-1", LONG_TEXT)),
    ("referral", messenger("mid.2", "psid-2", "hi", ref="r" * 5_000)),
])
def test_meta_webhook_long_values_stored(database_url: str, label: str, body: bytes) -> None:
    async def scenario(h: Harness) -> None:
        response = await h.client.post(META_PATH, content=body,
                                       headers={"x-hub-signature-256": sign(body, APP_SECRET)})
        check_ok(label, response)
        h.flush()

        assert h.write_errors() == {}, label
        assert len(h.messages(role="user")) == 1, label

    run(database_url, scenario)


@pytest.mark.parametrize(("label", "body"), [
    ("mid", messenger("m" * 1_000, "psid-1", "hi")),
    ("sender", messenger("mid.1", "p" * 1_000, "hi")),
])
def test_meta_webhook_long_ids_recorded(database_url: str,
                                        label: str, body: bytes) -> None:
    async def scenario(h: Harness) -> None:
        response = await h.client.post(META_PATH, content=body,
                                       headers={"x-hub-signature-256": sign(body, APP_SECRET)})
        check_ok(label, response)
        h.flush()

        assert h.write_errors() == {}, label

    run(database_url, scenario)


# Business endpoints


LONG_BUSINESS_FIELDS = [
    ("conversions", {"key": "k" * 256, "name": "purchase", "value": "1", "currency": "EUR",
                     "channel": "web", "user_id": "u1"}, "key"),
    ("conversions", {"key": "k1", "name": "n" * 129, "value": "1", "currency": "EUR",
                     "channel": "web", "user_id": "u1"}, "name"),
    ("conversions", {"key": "k1", "name": "purchase", "value": "9" * 400, "currency": "EUR",
                     "channel": "web", "user_id": "u1"}, "value"),
    ("leads", {"channel": "web", "user_id": "u" * 256}, "user_id"),
    ("leads", {"channel": "web", "user_id": "u1", "email": "e" * 300 + "@example.com"}, "email"),
    ("spend", {"day": "2026-03-01", "channel": "web", "campaign": "c" * 256, "amount": "1"},
     "campaign"),
    ("spend", {"day": "2026-03-01", "channel": "w" * 33, "amount": "1"}, "channel"),
]


def test_business_long_fields_named(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for route, document, field in LONG_BUSINESS_FIELDS:
            response = await post_json(h, f"/business/{route}", document,
                                       Authorization=f"Bearer {h.admin_key}")
            assert response.status_code == 422, f"{route} {field}: {response.text[:300]}"
            assert response.json()["detail"][0]["loc"][-1] == field, response.text[:300]

    run(database_url, scenario)


def test_business_long_meta_stored(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        document = {"key": "k-meta", "name": "purchase", "value": "1", "currency": "EUR",
                    "channel": "web", "user_id": "u1", "meta": {"note": LONG_TEXT}}
        response = await post_json(h, "/business/conversions", document,
                                   Authorization=f"Bearer {h.admin_key}")
        assert response.status_code < 300, response.text[:300]
        h.flush()
        assert h.write_errors() == {}

    run(database_url, scenario)


# Metrics query parameters


def test_metrics_long_params_named(database_url: str) -> None:
    async def scenario(h: Harness) -> None:
        for param in ("channel", "attr.plan", "source", "campaign", "ad", "tz", "since",
                      "group_by", "touch"):
            response = await h.client.get("/metrics/summary", params={param: "v" * 5_000})
            assert response.status_code == 422, f"{param}: {response.text[:300]}"
            assert param in response.text, response.text[:300]

    run(database_url, scenario)


def test_meta_long_mids_kept_apart(database_url: str) -> None:
    prefix = "m" * 300

    async def scenario(h: Harness) -> None:
        for number in range(2):
            body = messenger(f"{prefix}-{number}", "psid-1", f"message {number}")
            response = await h.client.post(META_PATH, content=body,
                                           headers={"x-hub-signature-256": sign(body, APP_SECRET)})
            check_ok(f"mid {number}", response)
        h.flush()

        assert h.write_errors() == {}
        assert [row.text for row in h.messages(role="user")] == ["message 0", "message 1"]

    run(database_url, scenario)
