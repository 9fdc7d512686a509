"""Shared Meta helpers: settings validation, signatures and the verification challenge."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from adapters_support import SHARED_PAYLOADS, fixture_bytes

from chatmw.adapters._meta import (
    MetaSettings,
    describe_graph_error,
    verification_challenge,
    verify_signature,
)


def settings(**overrides: object) -> MetaSettings:
    values: dict[str, object] = {"app_secret": "s3cret-value", "verify_token": "tok-value"}
    values.update(overrides)
    return MetaSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"app_secret": ""}, "app_secret"),
        ({"verify_token": ""}, "verify_token"),
        ({"bot_webhook_url": "ftp://bot"}, "bot_webhook_url"),
        ({"graph_base_url": "graph.facebook.com"}, "graph_base_url"),
        ({"graph_api_version": "21.0"}, "graph_api_version"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"webhook_path": "webhook"}, "webhook_path"),
        ({"forward_retries": -1}, "forward_retries"),
        ({"forward_workers": 0}, "forward_workers"),
        ({"forward_timeout_s": 0}, "forward_timeout_s"),
        ({"agent_app_ids": "263902037430900"}, "agent_app_ids"),
    ],
)
def test_settings_name_invalid_value(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        settings(**overrides)


def test_settings_repr_masks_secrets() -> None:
    text = repr(settings(page_access_token="EAAGpage", whatsapp_access_token="EAAGwa"))
    for secret in ("s3cret-value", "tok-value", "EAAGpage", "EAAGwa"):
        assert secret not in text
    assert "[secure]" in text
    assert "graph_base_url='https://graph.facebook.com'" in text


def test_settings_from_env() -> None:
    environ = {
        "CHATMW_META_APP_SECRET": "a",
        "CHATMW_META_VERIFY_TOKEN": "b",
        "CHATMW_GRAPH_BASE_URL": "http://127.0.0.1:9/",
        "CHATMW_META_MAX_BODY_BYTES": "2048",
    }
    loaded = MetaSettings.from_env(environ)
    assert loaded.graph_base_url == "http://127.0.0.1:9"
    assert loaded.agent_app_ids == frozenset()
    with_agents = MetaSettings.from_env({**environ, "CHATMW_MESSENGER_AGENT_APP_IDS": "12, 34,"})
    assert with_agents.agent_app_ids == frozenset({"12", "34"})
    assert loaded.max_body_bytes == 2048
    with pytest.raises(ValueError, match="CHATMW_META_MAX_BODY_BYTES"):
        MetaSettings.from_env({**environ, "CHATMW_META_MAX_BODY_BYTES": "1MB"})
    with pytest.raises(ValueError, match="app_secret"):
        MetaSettings.from_env({})


def test_signature_over_raw_bytes_with_emoji() -> None:
    body = fixture_bytes("messenger_text.json")
    good = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert verify_signature(body, good, "k")
    assert verify_signature(body, good.upper().replace("SHA256=", "sha256="), "k")
    reserialised = json.dumps(json.loads(body)).encode()
    assert reserialised != body
    assert not verify_signature(reserialised, good, "k")
    assert not verify_signature(body, good, "other")
    assert not verify_signature(body, None, "k")
    assert not verify_signature(body, "sha1=" + good[7:], "k")
    assert not verify_signature(body, "sha256=é", "k")


@pytest.mark.skipif(
    not (SHARED_PAYLOADS / "whatsapp" / "wa_signature_vector.json").exists(),
    reason="shared signature vector not present",
)
def test_signature_matches_published_vector() -> None:
    vector = json.loads((SHARED_PAYLOADS / "whatsapp" / "wa_signature_vector.json").read_text())
    body = (SHARED_PAYLOADS / "whatsapp" / vector["raw_body_file"]).read_bytes()
    assert len(body) == vector["raw_body_bytes"]
    assert verify_signature(body, vector["header_value"], vector["app_secret"])
    assert not verify_signature(
        json.dumps(json.loads(body)).encode(), vector["header_value"], vector["app_secret"]
    )


def test_verification_challenge() -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": "tok", "hub.challenge": "1158201444"}
    assert verification_challenge(query, "tok") == "1158201444"
    assert verification_challenge({**query, "hub.verify_token": "nope"}, "tok") is None
    assert verification_challenge({**query, "hub.mode": "unsubscribe"}, "tok") is None
    assert verification_challenge({}, "tok") is None


@pytest.mark.parametrize(
    ("status", "document", "retryable"),
    [
        (503, {}, True),
        (429, {}, True),
        (400, {"error": {"code": 613, "message": "rate"}}, True),
        (400, {"error": {"code": 100, "message": "bad", "is_transient": True}}, True),
        (400, {"error": {"code": 100, "message": "bad"}}, False),
        (403, {"error": {"code": 10, "type": "OAuthException", "message": "denied"}}, False),
    ],
)
def test_graph_errors_classified(status: int, document: dict, retryable: bool) -> None:
    description, found = describe_graph_error(status, document)
    assert found is retryable
    assert description


def test_package_public_names() -> None:
    import chatmw.adapters as adapters

    assert sorted(adapters.__all__) == [
        "AsyncRecordingTransport",
        "MessengerSender",
        "MetaSettings",
        "MetaWebhookMiddleware",
        "RecordingTransport",
        "WhatsAppSender",
        "create_proxy_app",
    ]
    for name in adapters.__all__:
        assert getattr(adapters, name) is not None
