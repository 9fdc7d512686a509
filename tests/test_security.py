"""API keys, rate limits, pseudonyms, redaction and secrets, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.cli import app as cli_app
from chatmw.config import Settings
from chatmw.recorder import RecorderSettings
from chatmw.runtime import Runtime
from chatmw.security import (
    KeyAuth,
    Privacy,
    PrivacySettings,
    Pseudonymiser,
    Secret,
    create_key,
    list_keys,
    redact_text,
    require_key,
    revoke_key,
)
from chatmw.security.keys import check_key
from chatmw.security.ratelimit import RateLimiter
from chatmw.spool import FileSpool, SpoolSettings
from chatmw.store import models
from chatmw.store.models_security import ApiKey, StoredSecret

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
KEY = Secret("k" * 32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def keyed_app(auth: KeyAuth) -> FastAPI:
    app = FastAPI()

    @app.get("/read")
    def read(key=Depends(require_key("read", auth))) -> dict[str, str]:  # noqa: B008
        return {"key_id": key.key_id}

    @app.get("/admin")
    def admin(key=Depends(require_key("admin", auth))) -> dict[str, str]:  # noqa: B008
        return {"key_id": key.key_id}

    return app


# API keys


def test_key_stored_only_as_hash(engine: Engine) -> None:
    created = create_key(engine, "read", "dashboard")
    with Session(engine) as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hashlib.sha256(created.key.encode()).hexdigest()
    assert created.key not in {row.key_hash, row.key_id, row.name}
    assert created.key.startswith(f"cmw_{row.key_id}_")
    assert len(created.key) > 60
    assert created.key not in repr(created)


def test_key_check_results(engine: Engine) -> None:
    created = create_key(engine, "admin")
    assert check_key(engine, created.key).info is not None
    assert check_key(engine, created.key + "x").error == "invalid_api_key"
    assert check_key(engine, "cmw_0000000000000000_nothing").error == "invalid_api_key"
    assert check_key(engine, "not a key").error == "invalid_api_key"
    assert revoke_key(engine, created.info.key_id)
    assert not revoke_key(engine, created.info.key_id)
    assert check_key(engine, created.key).error == "revoked_api_key"
    assert list_keys(engine)[0].revoked_at_ms is not None


def test_requests_need_key_of_scope(engine: Engine) -> None:
    read = create_key(engine, "read").key
    admin = create_key(engine, "admin").key
    app = keyed_app(KeyAuth(engine))

    missing = request(app, "GET", "/read")
    invalid = request(app, "GET", "/read", headers={"Authorization": "Bearer cmw_x_y"})
    read_ok = request(app, "GET", "/read", headers={"Authorization": f"Bearer {read}"})
    header_ok = request(app, "GET", "/read", headers={"X-API-Key": read})
    forbidden = request(app, "GET", "/admin", headers={"Authorization": f"Bearer {read}"})
    admin_ok = request(app, "GET", "/admin", headers={"X-API-Key": admin})
    admin_reads = request(app, "GET", "/read", headers={"X-API-Key": admin})

    assert missing.status_code == 401
    assert missing.json()["detail"]["error"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert invalid.status_code == 401
    assert invalid.json()["detail"]["error"] == "invalid_api_key"
    assert read_ok.status_code == 200
    assert header_ok.status_code == 200
    assert forbidden.status_code == 403
    assert forbidden.json()["detail"]["error"] == "insufficient_scope"
    assert admin_ok.status_code == 200
    assert admin_reads.status_code == 200


def test_revoked_key_rejected(engine: Engine) -> None:
    created = create_key(engine, "read")
    app = keyed_app(KeyAuth(engine))
    headers = {"X-API-Key": created.key}
    assert request(app, "GET", "/read", headers=headers).status_code == 200
    revoke_key(engine, created.info.key_id)
    response = request(app, "GET", "/read", headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"]["error"] == "revoked_api_key"


def test_rate_limit_answers_429_with_retry_after(engine: Engine) -> None:
    clock = FakeClock()
    first = create_key(engine, "read").key
    second = create_key(engine, "read").key
    app = keyed_app(KeyAuth(engine, rate_per_second=0.5, burst=3, clock=clock))

    statuses = [request(app, "GET", "/read", headers={"X-API-Key": first}).status_code
                for _ in range(4)]
    limited = request(app, "GET", "/read", headers={"X-API-Key": first})
    other = request(app, "GET", "/read", headers={"X-API-Key": second})
    clock.now += 2.0  # one token back at 0.5 per second
    recovered = request(app, "GET", "/read", headers={"X-API-Key": first})

    assert statuses == [200, 200, 200, 429]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json()["detail"]["error"] == "rate_limited"
    assert other.status_code == 200
    assert recovered.status_code == 200


def test_rate_limiter_refills_to_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_second=10, burst=2, clock=clock)
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") == pytest.approx(0.1)
    clock.now += 100
    assert [limiter.acquire("a") for _ in range(3)][:2] == [0, 0]
    with pytest.raises(ValueError, match="burst must be at least 1"):
        RateLimiter(1, 0)


def test_last_use_recorded(engine: Engine) -> None:
    created = create_key(engine, "read")
    auth = KeyAuth(engine)
    assert auth.check(created.key).info is not None
    assert list_keys(engine)[0].last_used_at_ms is not None


def test_unconfigured_dependency_fails_closed(engine: Engine) -> None:
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(require_key("read"))])
    def x() -> dict[str, str]:
        return {}

    response = request(app, "GET", "/x", headers={"X-API-Key": "cmw_a_b"})
    assert response.status_code == 500
    assert response.json()["detail"]["error"] == "auth_not_configured"
    app.state.chatmw_key_auth = KeyAuth(engine)
    assert request(app, "GET", "/x", headers={"X-API-Key": "cmw_a_b"}).status_code == 401


def test_keys_cli_create_list_revoke(database_url: str) -> None:
    runner = CliRunner()
    created = runner.invoke(cli_app, ["keys", "create", "--scope", "admin", "--name", "ops",
                                      "--db", database_url])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert key.startswith("cmw_")
    key_id = key.split("_")[1]

    listed = runner.invoke(cli_app, ["keys", "list", "--json", "--db", database_url])
    revoked = runner.invoke(cli_app, ["keys", "revoke", key_id, "--db", database_url])
    again = runner.invoke(cli_app, ["keys", "revoke", key_id, "--db", database_url])
    bad_scope = runner.invoke(cli_app, ["keys", "create", "--scope", "root", "--db", database_url])

    assert listed.exit_code == 0
    assert key not in listed.stdout
    assert '"scope": "admin"' in listed.stdout
    assert revoked.exit_code == 0
    assert again.exit_code == 1
    assert bad_scope.exit_code == 2


# Pseudonyms and redaction


def test_pseudonym_is_keyed_hmac() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    expected = hmac.new(b"k" * 32, b"user\x004915100000001", hashlib.sha256).hexdigest()[:32]
    assert pseudonymiser.pseudonymise("4915100000001") == "ps_" + expected
    assert Pseudonymiser(Secret("j" * 32)).pseudonymise("4915100000001") != "ps_" + expected
    assert pseudonymiser.pseudonymise("c1", "conversation") != pseudonymiser.pseudonymise("c1")


def test_short_pseudonym_key_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Pseudonymiser(Secret("short"))


def test_pseudonymiser_rewrites_every_event_type() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    events = [
        ev.Message(channel="web", occurred_at=T0, key="m", role="user", user_id="u1",
                   conversation_id="c1"),
        ev.Status(channel="web", occurred_at=T0, platform_message_id="p", status="read",
                  user_id="u1"),
        ev.Touch(channel="web", occurred_at=T0, key="t", user_id="u1"),
        ev.ConversationUpdate(channel="web", occurred_at=T0, user_id="u1", conversation_id="c1"),
        ev.Exposure(channel="web", occurred_at=T0, key="x", user_id="u1", kind="open"),
    ]
    user, conversation = pseudonymiser.pseudonymise("u1"), pseudonymiser.pseudonymise("c1",
                                                                                      "conversation")
    for event in pseudonymiser.apply_all(events):
        assert event.user_id == user  # type: ignore[attr-defined]
        assert getattr(event, "conversation_id", None) in (None, conversation)
    assert pseudonymiser.apply(events[0]).key == "m"  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NotedMessage(ev.Message):
    """A Message subclass without slots and with a field of its own."""

    note: str = "n"


def test_pseudonymiser_apply_equals_replace() -> None:
    pseudonymiser = Pseudonymiser(KEY)
    only_users = Pseudonymiser(KEY, fields=("user_id",))
    message = ev.Message(channel="web", occurred_at=T0, key="m", role="user", user_id="u1",
                         conversation_id="c1", text="hi", attributes={"a": "b"})
    cases = [
        message,
        dataclasses.replace(message, conversation_id=None),
        dataclasses.replace(message, conversation_id=""),
        _NotedMessage(channel="web", occurred_at=T0, key="m", role="bot", user_id="u2",
                      conversation_id="c2", note="kept"),
        ev.Status(channel="web", occurred_at=T0, platform_message_id="p", status="read"),
        ev.RawPayload(channel="web", occurred_at=T0, source="s", body=b"x", reason="r"),
    ]
    for event in cases:
        for subject in (pseudonymiser, only_users):
            changes = {}
            for name in subject.fields:
                value = getattr(event, name, None)
                if isinstance(value, str) and value:
                    kind = "user" if name == "user_id" else "conversation"
                    changes[name] = subject.pseudonymise(value, kind)
            result = subject.apply(event)
            assert type(result) is type(event)
            assert result == dataclasses.replace(event, **changes)
            if not changes:
                assert result is event
    noted = pseudonymiser.apply(cases[3])
    assert noted.note == "kept"  # type: ignore[attr-defined]
    assert only_users.apply(message).conversation_id == "c1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+bot@example.co.uk today", "write to [email] today"),
    ("call +49 (30) 1234-5678 now", "call [phone] now"),
    ("my number: 0049 151 0000 0001.", "my number: [phone]."),
    ("(415) 555-0100", "[phone]"),
    ("order 12345 on 2024-03-01 at 09:30", "order 12345 on 2024-03-01 at 09:30"),
    ("due 10.5.2024, 1,299.00 EUR", "due 10.5.2024, 1,299.00 EUR"),
])
def test_redaction_cases(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_secrets_masked_in_reprs_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    secret_text = "s3cr3t-value-that-must-not-leak"
    settings = PrivacySettings.from_env({"CHATMW_PSEUDONYM_KEY": secret_text})
    caplog.set_level(logging.DEBUG)
    logging.getLogger("chatmw").info("settings %r %s", settings, settings.pseudonym_key)
    for shown in (repr(settings), str(settings.pseudonym_key), repr(Pseudonymiser(
            settings.pseudonym_key)), caplog.text):  # type: ignore[arg-type]
        assert secret_text not in shown
    assert settings.pseudonym_key.reveal() == secret_text  # type: ignore[union-attr]


def test_privacy_settings_from_env() -> None:
    settings = PrivacySettings.from_env({"CHATMW_PSEUDONYMISE": "off", "CHATMW_TEXT_MODE": "none",
                                         "CHATMW_KEEP_RAW_PAYLOADS": "yes"})
    assert settings.pseudonymise is False
    assert settings.text_mode == "none"
    assert settings.keep_raw_payloads is True
    assert PrivacySettings.from_env({}).text_mode == "redacted"
    with pytest.raises(ValueError, match="text_mode must be one of full, redacted, none"):
        PrivacySettings.from_env({"CHATMW_TEXT_MODE": "some"})


# Privacy through the runtime


def run_traffic(database_url: str, privacy: PrivacySettings, spool_dir: Path | None = None
                ) -> Runtime:
    spool = FileSpool(SpoolSettings(directory=spool_dir)) if spool_dir else None
    runtime = Runtime.from_settings(
        Settings(database_url=database_url, sentiment=False,
                 recorder=RecorderSettings(batch_interval_s=0.01)), spool=spool, privacy=privacy)
    runtime.start(migrate=False)
    recorder = runtime.recorder
    recorder.submit(ev.Message(channel="whatsapp", occurred_at=T0, key="m1", role="user",
                               user_id="4915100000001", conversation_id="4915100000001",
                               text="I am jane@example.com, call +49 151 0000 0001"))
    recorder.submit(ev.Message(channel="whatsapp", occurred_at=T0 + timedelta(seconds=2),
                               key="m2", role="bot", user_id="4915100000001",
                               conversation_id="4915100000001", text="Thanks!"))
    recorder.submit(ev.RawPayload(channel="whatsapp", occurred_at=T0, source="webhook",
                                  body=b'{"from": "4915100000001"', reason="invalid JSON"))
    assert recorder.flush(5)
    return runtime


def test_runtime_stores_pseudonyms_and_redacted_text(database_url: str, engine: Engine) -> None:
    runtime = run_traffic(database_url, PrivacySettings(pseudonym_key=KEY))
    runtime.stop()
    pseudonymiser = Pseudonymiser(KEY)
    with Session(engine) as session:
        contact = session.scalars(select(models.Contact)).one()
        conversation = session.scalars(select(models.Conversation)).one()
        texts = dict(session.execute(select(models.Message.key, models.Message.text)).all())
        raw = session.scalars(select(models.RawPayload)).one()
    assert contact.external_id == pseudonymiser.pseudonymise("4915100000001")
    assert conversation.external_id == pseudonymiser.pseudonymise("4915100000001", "conversation")
    assert texts == {"m1": "I am [email], call [phone]", "m2": "Thanks!"}
    assert raw.body == b""
    assert "not kept" in raw.reason


@pytest.mark.parametrize(("mode", "expected"), [
    ("none", None), ("full", "I am jane@example.com, call +49 151 0000 0001")])
def test_text_modes(database_url: str, engine: Engine, mode: str, expected: str | None) -> None:
    runtime = run_traffic(database_url, PrivacySettings(pseudonymise=False, text_mode=mode))
    runtime.stop()
    with Session(engine) as session:
        text = session.scalar(select(models.Message.text).where(models.Message.key == "m1"))
        contact = session.scalars(select(models.Contact)).one()
    assert text == expected
    assert contact.external_id == "4915100000001"


def test_generated_key_shared_by_processes(database_url: str, engine: Engine,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="chatmw")
    first = Privacy.load(PrivacySettings(), engine)
    second = Privacy.load(PrivacySettings(), engine)
    with Session(engine) as session:
        stored = session.scalars(select(StoredSecret)).one()
    assert first.subject_id("u1") == second.subject_id("u1")
    assert first.subject_id("u1") == Pseudonymiser(Secret(stored.value)).pseudonymise("u1")
    assert "CHATMW_PSEUDONYM_KEY is not set" in caplog.text
    assert stored.value not in caplog.text


def test_spool_holds_only_pseudonyms(database_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False),
                                    spool=FileSpool(SpoolSettings(directory=spool_dir)),
                                    privacy=PrivacySettings(pseudonym_key=KEY))
    runtime.start(migrate=False)
    runtime.recorder.stop()  # the writer is gone: a durable submit stays in the spool
    assert runtime.recorder.submit_durable([ev.Message(
        channel="whatsapp", occurred_at=T0, key="m1", role="user", user_id="4915100000001",
        text="hi")])
    runtime.recorder.spool.close()  # type: ignore[union-attr]
    runtime.engine.dispose()
    data = b"".join(path.read_bytes() for path in spool_dir.glob("segment-*.log"))
    assert b'"key":"m1"' in data
    assert b"4915100000001" not in data
