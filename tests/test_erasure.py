"""Erasure of a person and retention purges, on SQLite and PostgreSQL.

Besides the core tables, every table in the migrated database that references contacts,
conversations or messages, or has a ``user_id`` column, gets one row for the erased person
and one for somebody else, filled in generically from the reflected schema: so a table a
feature adds later is checked without changing this file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.cli import app as cli_app
from chatmw.security import KeyAuth, Privacy, PrivacySettings, Secret, create_key
from chatmw.security.api import create_admin_router
from chatmw.security.erasure import (
    DataRegistry,
    ErasureReport,
    erase_person,
    parse_user,
    purge_older_than,
)
from chatmw.store import models
from chatmw.store.engine import make_engine
from chatmw.store.models_rollups import RollupChange
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
KEY = Secret("test-pseudonym-key-0123456789")
# In-process ASGI calls only: nothing is sent to this host.
BASE_URL = "https://testserver"
ALICE, BOB = "4915100000001", "4915100000002"
ROOTS = ("contacts", "conversations", "messages")
CORE = {"contacts", "conversations", "conversation_attributes", "messages", "message_statuses",
        "touches", "exposures", "raw_payloads", "alembic_version", "api_keys", "chatmw_secrets",
        "erasure_records"}
_counter = itertools.count(1)


@pytest.fixture
def privacy(engine: Engine) -> Privacy:
    return Privacy.load(PrivacySettings(pseudonym_key=KEY, keep_raw_payloads=True,
                                        text_mode="full"), engine)


def person_events(user: str, start: datetime, prefix: str) -> list[ev.Event]:
    """Two conversations of ``user``: messages both ways, statuses, touch, exposure, update."""
    events: list[ev.Event] = [
        ev.Touch(channel="whatsapp", occurred_at=start, key=f"{prefix}-t1", user_id=user,
                 campaign="spring"),
        ev.Exposure(channel="whatsapp", occurred_at=start, key=f"{prefix}-x1", user_id=user,
                    kind="proactive"),
    ]
    for number, offset in ((1, timedelta()), (2, timedelta(hours=5))):
        at = start + offset
        events += [
            ev.Message(channel="whatsapp", occurred_at=at, key=f"{prefix}-c{number}-u",
                       role="user", user_id=user, text=f"hello from {user}",
                       platform_message_id=f"wamid.{prefix}.{number}.in",
                       attributes={"plan": "pro"}),
            ev.Message(channel="whatsapp", occurred_at=at + timedelta(seconds=3),
                       key=f"{prefix}-c{number}-b", role="bot", user_id=user, text="hi",
                       platform_message_id=f"wamid.{prefix}.{number}.out"),
            ev.Status(channel="whatsapp", occurred_at=at + timedelta(seconds=4),
                      platform_message_id=f"wamid.{prefix}.{number}.out", status="delivered"),
            ev.Status(channel="whatsapp", occurred_at=at + timedelta(seconds=9),
                      platform_message_id=f"wamid.{prefix}.{number}.out", status="read"),
        ]
    events.append(ev.ConversationUpdate(channel="whatsapp", occurred_at=start + timedelta(
        hours=5, minutes=1), user_id=user, ended=True, resolved=True))
    events.append(ev.RawPayload(channel="whatsapp", occurred_at=start, source="webhook",
                                body=f'{{"from": "{user}", "text": '.encode(),
                                reason="invalid JSON"))
    return events


def write_people(engine: Engine, privacy: Privacy) -> None:
    writer = Writer(engine)
    for user, prefix in ((ALICE, "a"), (BOB, "b")):
        writer.write([privacy.transform(event) for event in person_events(user, T0, prefix)])


# Generic rows in feature tables


def _value(table: Table, column: Any) -> Any:
    kind = column.type
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, Integer | BigInteger):
        return next(_counter)
    if isinstance(kind, Float):
        return 0.0
    if isinstance(kind, JSON):
        return {}
    if isinstance(kind, LargeBinary):
        return b""
    if isinstance(kind, String | Text):
        length = getattr(kind, "length", None) or 32
        return f"v{next(_counter)}"[:length]
    raise TypeError(f"no test value for {table.name}.{column.name} ({kind})")


class RowMaker:
    """Inserts a row into any reflected table, linked to one person's rows by foreign keys."""

    def __init__(self, session: Session, metadata: MetaData) -> None:
        self.session = session
        self.metadata = metadata
        self.neutral: dict[str, Any] = {}

    def insert(self, table: Table, links: dict[str, Any], user_ids: dict[str, str]) -> Any:
        values: dict[str, Any] = {}
        for column in table.columns:
            if column.name in user_ids:
                values[column.name] = user_ids[column.name]
                continue
            foreign = next(iter(column.foreign_keys), None)
            if foreign is not None:
                parent = foreign.column.table
                if parent.name in links:
                    values[column.name] = links[parent.name]
                elif not column.nullable:
                    values[column.name] = self._neutral(parent)
                continue
            if column.primary_key and isinstance(column.type, Integer | BigInteger):
                continue
            if column.nullable or column.server_default is not None:
                continue
            values[column.name] = _value(table, column)
        result = self.session.execute(table.insert().values(**values))
        primary = list(table.primary_key.columns)
        if len(primary) == 1 and result.inserted_primary_key:
            return result.inserted_primary_key[0]
        return None

    def _neutral(self, table: Table) -> Any:
        if table.name not in self.neutral:
            self.neutral[table.name] = self.insert(table, {}, {})
        return self.neutral[table.name]


def feature_tables(metadata: MetaData) -> list[Table]:
    """Tables outside the core that point at people: by foreign key or by a user_id column."""
    linked = set(ROOTS)
    changed = True
    while changed:
        changed = False
        for table in metadata.sorted_tables:
            if table.name in CORE or table.name in linked:
                continue
            parents = {fk.column.table.name for fk in table.foreign_keys}
            if parents & linked or "user_id" in table.c:
                linked.add(table.name)
                changed = True
    return [t for t in metadata.sorted_tables if t.name in linked and t.name not in ROOTS]


def add_feature_rows(engine: Engine, privacy: Privacy) -> dict[str, dict[str, int]]:
    """Insert one row per person into every feature table; rows per table and person."""
    inserted: dict[str, dict[str, int]] = {}
    with Session(engine) as session, session.begin():
        metadata = MetaData()
        metadata.reflect(bind=session.connection())
        maker = RowMaker(session, metadata)
        contacts, conversations = metadata.tables["contacts"], metadata.tables["conversations"]
        messages = metadata.tables["messages"]
        for user in (ALICE, BOB):
            stored = privacy.subject_id(user)
            contact = session.scalar(select(contacts.c.id).where(contacts.c.external_id == stored))
            conversation = session.scalar(select(func.min(conversations.c.id))
                                          .where(conversations.c.contact_id == contact))
            message = session.scalar(select(func.min(messages.c.id))
                                     .where(messages.c.contact_id == contact))
            links: dict[str, Any] = {"contacts": contact, "conversations": conversation,
                                     "messages": message}
            for table in feature_tables(metadata):
                user_ids = {"user_id": stored} if "user_id" in table.c else {}
                if "channel" in table.c:
                    user_ids["channel"] = "whatsapp"
                links[table.name] = maker.insert(table, links, user_ids)
                inserted.setdefault(table.name, {})[user] = 1
    return inserted


def count_rows(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        metadata = MetaData()
        metadata.reflect(bind=session.connection())
        return {name: session.scalar(select(func.count()).select_from(table)) or 0
                for name, table in metadata.tables.items() if name != "alembic_version"}


def expected_core_removal(engine: Engine, stored: str, raw: str) -> dict[str, int]:
    """Count, with plain queries, the core rows that belong to one person."""
    with Session(engine) as session:
        contact = session.scalar(select(models.Contact.id)
                                 .where(models.Contact.external_id == stored))
        conversation_ids = list(session.scalars(select(models.Conversation.id)
                                                .where(models.Conversation.contact_id == contact)))
        platform_ids = list(session.scalars(
            select(models.Message.platform_message_id)
            .where(models.Message.conversation_id.in_(conversation_ids))))
        counts = {
            "contacts": 1,
            "conversations": len(conversation_ids),
            "messages": session.scalar(select(func.count()).select_from(models.Message).where(
                models.Message.conversation_id.in_(conversation_ids))),
            "message_statuses": session.scalar(
                select(func.count()).select_from(models.MessageStatus)
                .where(models.MessageStatus.platform_message_id.in_(platform_ids))),
            "conversation_attributes": session.scalar(
                select(func.count()).select_from(models.ConversationAttribute)
                .where(models.ConversationAttribute.conversation_id.in_(conversation_ids))),
            "touches": session.scalar(select(func.count()).select_from(models.Touch)
                                      .where(models.Touch.contact_id == contact)),
            "exposures": session.scalar(select(func.count()).select_from(models.Exposure)
                                        .where(models.Exposure.contact_id == contact)),
            "raw_payloads": sum(raw.encode() in bytes(body) for body in session.scalars(
                select(models.RawPayload.body))),
            # The change log keeps the contact's touches and business records for the
            # rollup refresher until it consumes them.
            "rollup_changes": session.scalar(select(func.count()).select_from(RollupChange)
                                             .where(RollupChange.contact_id == contact)),
        }
    return {name: count for name, count in counts.items() if count}


def rows_mentioning(engine: Engine, needles: list[str]) -> list[str]:
    """Return ``table.column`` for every text or binary value that contains a needle."""
    found = []
    with Session(engine) as session:
        metadata = MetaData()
        metadata.reflect(bind=session.connection())
        for table in metadata.sorted_tables:
            for row in session.execute(select(table)).mappings():
                for column, value in row.items():
                    data = value if isinstance(value, bytes | memoryview) else str(value)
                    data = bytes(data) if not isinstance(data, str) else data.encode()
                    if any(needle.encode() in data for needle in needles):
                        found.append(f"{table.name}.{column}")
    return found


@pytest.fixture
def people(engine: Engine, privacy: Privacy) -> Iterator[dict[str, dict[str, int]]]:
    write_people(engine, privacy)
    yield add_feature_rows(engine, privacy)


def call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


# Erasure


def test_erasure_removes_person_everywhere(engine: Engine, privacy: Privacy,
                                           people: dict[str, dict[str, int]]) -> None:
    stored_alice = privacy.subject_id(ALICE)
    expected = expected_core_removal(engine, stored_alice, ALICE)
    expected.update({name: per_person[ALICE] for name, per_person in people.items()})
    before = count_rows(engine)

    report = erase_person(engine, "whatsapp", origin="test", **privacy.erasure_ids(ALICE))

    after = count_rows(engine)
    assert report.removed == expected
    assert report.total == sum(expected.values())
    for table, count in before.items():
        assert after[table] == count - expected.get(table, 0) + (table == "erasure_records"), table
    assert rows_mentioning(engine, [ALICE, stored_alice, "a-c1", "wamid.a."]) == []
    assert rows_mentioning(engine, [privacy.subject_id(BOB)]) != []
    assert expected_core_removal(engine, privacy.subject_id(BOB), BOB)["messages"] == 4


def test_feature_tables_are_covered(people: dict[str, dict[str, int]]) -> None:
    # The generic rows reach the feature tables of the migrated database, so the erasure
    # test above checks them too.
    assert {"surveys", "survey_sends", "conversions", "leads"} <= set(people)


def test_admin_route_erases_with_admin_key(engine: Engine, privacy: Privacy,
                                           people: dict[str, dict[str, int]]) -> None:
    admin = create_key(engine, "admin").key
    read = create_key(engine, "read").key
    expected = expected_core_removal(engine, privacy.subject_id(ALICE), ALICE)
    app = FastAPI()
    app.include_router(create_admin_router(engine, auth=KeyAuth(engine), privacy=privacy,
                                           prefix="/chat"))

    no_key = call(app, "DELETE", f"/chat/admin/contacts/whatsapp/{ALICE}")
    read_key = call(app, "DELETE", f"/chat/admin/contacts/whatsapp/{ALICE}",
                    headers={"X-API-Key": read})
    erased = call(app, "DELETE", f"/chat/admin/contacts/whatsapp/{ALICE}",
                  headers={"Authorization": f"Bearer {admin}"})
    again = call(app, "DELETE", f"/chat/admin/contacts/whatsapp/{ALICE}",
                 headers={"Authorization": f"Bearer {admin}"})

    assert no_key.status_code == 401
    assert read_key.status_code == 403
    assert erased.status_code == 200
    body = erased.json()
    assert body["channel"] == "whatsapp"
    for table, count in expected.items():
        assert body["removed"][table] == count
    assert body["total"] == sum(body["removed"].values())
    assert again.json()["total"] == 0


def test_erase_by_pseudonym(engine: Engine, privacy: Privacy,
                            people: dict[str, dict[str, int]]) -> None:
    report = erase_person(engine, "whatsapp", **privacy.erasure_ids(privacy.subject_id(ALICE),
                                                                    pseudonymised=True))
    assert report.removed["contacts"] == 1
    assert report.removed["messages"] == 4


def test_erase_cli_reports_counts(database_url: str, engine: Engine, privacy: Privacy,
                                  people: dict[str, dict[str, int]],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATMW_PSEUDONYM_KEY", KEY.reveal())
    monkeypatch.setenv("CHATMW_PSEUDONYMISE", "1")
    expected = expected_core_removal(engine, privacy.subject_id(ALICE), ALICE)
    result = CliRunner().invoke(cli_app, ["erase", "--user", f"whatsapp:{ALICE}", "--json",
                                          "--db", database_url])
    bad = CliRunner().invoke(cli_app, ["erase", "--user", "nochannel", "--db", database_url])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {k: v for k, v in report["removed"].items() if k in expected} == expected
    assert bad.exit_code == 2


def test_registered_table_and_step(engine: Engine, privacy: Privacy) -> None:
    write_people(engine, privacy)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE test_crm (id INTEGER PRIMARY KEY, person "
                                "VARCHAR(64) NOT NULL)"))
        connection.execute(text("INSERT INTO test_crm (id, person) VALUES (1, :a), (2, :b)"),
                           {"a": privacy.subject_id(ALICE), "b": privacy.subject_id(BOB)})
    seen: list[tuple[str, ...]] = []
    registry = DataRegistry()
    registry.add_user_table("test_crm", user_column="person", channel_column=None)
    registry.add_erasure_step("outside_store", lambda session, subject: seen.append(
        subject.stored_ids) or 3)
    try:
        report = erase_person(engine, "whatsapp", registry=registry, **privacy.erasure_ids(ALICE))
        with engine.connect() as connection:
            left = connection.execute(text("SELECT id FROM test_crm")).scalars().all()
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE test_crm"))
    assert report.removed["test_crm"] == 1
    assert report.removed["outside_store"] == 3
    assert left == [2]
    assert seen == [(privacy.subject_id(ALICE), ALICE)]


def test_parse_user() -> None:
    assert parse_user("whatsapp:4915100000001") == ("whatsapp", "4915100000001")
    assert parse_user("web:visitor:42") == ("web", "visitor:42")
    with pytest.raises(ValueError, match="expected CHANNEL:ID"):
        parse_user("4915100000001")


# Meta data-deletion callback


def signed(payload: dict[str, Any], secret: str) -> str:
    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = encode(json.dumps(payload).encode())
    signature = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{encode(signature)}.{body}"


def test_meta_callback_erases_and_reports_status(engine: Engine) -> None:
    privacy = Privacy.load(PrivacySettings(pseudonym_key=KEY), engine)
    writer = Writer(engine)
    writer.write([privacy.transform(ev.Message(
        channel="messenger", occurred_at=T0, key=f"m{i}", role="user", user_id="7100000000000001",
        text="hi")) for i in range(3)])
    app = FastAPI()
    app.include_router(create_admin_router(engine, privacy=lambda: privacy, auth=KeyAuth(engine),
                                           meta_app_secret=Secret("app-secret"), prefix="/chat"))
    form = {"signed_request": signed({"algorithm": "HMAC-SHA256", "user_id": "7100000000000001",
                                      "issued_at": 1700000000}, "app-secret")}

    forged = call(app, "POST", "/chat/admin/meta/data-deletion", data={
        "signed_request": signed({"algorithm": "HMAC-SHA256", "user_id": "7100000000000001"},
                                 "wrong-secret")})
    missing = call(app, "POST", "/chat/admin/meta/data-deletion", data={})
    accepted = call(app, "POST", "/chat/admin/meta/data-deletion", data=form)
    code = accepted.json()["confirmation_code"]
    status = call(app, "GET", f"/chat/admin/meta/data-deletion/{code}")
    unknown = call(app, "GET", "/chat/admin/meta/data-deletion/nope")

    assert forged.status_code == 400
    assert forged.json()["detail"]["error"] == "invalid_signed_request"
    assert missing.status_code == 400
    assert accepted.status_code == 200
    assert accepted.json()["url"] == f"{BASE_URL}/chat/admin/meta/data-deletion/{code}"
    assert status.status_code == 200
    assert status.json()["status"] == "completed"
    assert status.json()["rows_removed"] == 3 + 1 + 1  # messages, conversation, contact
    assert unknown.status_code == 404
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(models.Message)) == 0


# Retention


def test_purge_removes_only_old_data(engine: Engine, privacy: Privacy, database_url: str) -> None:
    now = datetime(2024, 6, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=100), now - timedelta(days=2)
    writer = Writer(engine)
    batches = [
        person_events("old-only", old, "o"),
        person_events("both", old, "x") + person_events("both", recent, "y"),
        person_events("recent-only", recent, "r"),
    ]
    for batch in batches:
        writer.write(batch)
    with Session(engine) as session:
        old_conversations = list(session.scalars(select(models.Conversation.id).where(
            models.Conversation.last_message_at_ms < int((now - timedelta(days=30)).timestamp()
                                                         * 1000))))
        old_messages = session.scalar(select(func.count()).select_from(models.Message).where(
            models.Message.conversation_id.in_(old_conversations)))
        old_attributes = session.scalar(
            select(func.count()).select_from(models.ConversationAttribute)
            .where(models.ConversationAttribute.conversation_id.in_(old_conversations)))
    before = count_rows(engine)

    removed = purge_older_than(engine, 30, now_ms=int(now.timestamp() * 1000))

    after = count_rows(engine)
    assert len(old_conversations) == 4
    assert removed["conversations"] == 4
    assert removed["messages"] == old_messages == 8
    assert removed["conversation_attributes"] == old_attributes
    assert removed["contacts"] == 1  # "both" still has recent conversations
    assert removed["touches"] == 2
    assert removed["exposures"] == 2
    assert removed["message_statuses"] == 8
    assert removed["raw_payloads"] == 2
    for table, count in before.items():
        assert after[table] == count - removed.get(table, 0), table
    with Session(engine) as session:
        contacts = set(session.scalars(select(models.Contact.external_id)))
    assert contacts == {"both", "recent-only"}

    result = CliRunner().invoke(cli_app, ["purge", "--older-than-days", "30", "--json",
                                          "--db", database_url])
    # The CLI purges against today's date, when all of the 2024 data is older than 30 days.
    assert result.exit_code == 0, result.output
    final = count_rows(engine)
    assert json.loads(result.stdout)["total"] == sum(after.values()) - sum(final.values())
    assert final["contacts"] == final["conversations"] == final["messages"] == 0


def orphan_messages(engine: Engine) -> list[str]:
    """Return the keys of messages whose conversation or contact is not stored."""
    message, conversation, contact = models.Message, models.Conversation, models.Contact
    with Session(engine) as session:
        return sorted(session.scalars(
            select(message.key).where(
                ~select(conversation.id).where(conversation.id == message.conversation_id)
                .exists()
                | (message.contact_id.is_not(None)
                   & ~select(contact.id).where(contact.id == message.contact_id).exists()))))


def shared_conversation(owner: str, guest: str, started: datetime,
                        ended: datetime) -> list[ev.Event]:
    """A named conversation that ``owner`` opens, ``guest`` joins and ``owner`` writes last in."""
    return [
        ev.Message(channel="web", occurred_at=started, key="s-owner-1", role="user",
                   user_id=owner, conversation_id="shared", text="hello"),
        ev.Message(channel="web", occurred_at=started + timedelta(minutes=1), key="s-guest",
                   role="user", user_id=guest, conversation_id="shared", text="me too"),
        ev.Message(channel="web", occurred_at=started + timedelta(minutes=2), key="s-bot",
                   role="bot", user_id=owner, conversation_id="shared", text="hi both"),
        ev.Message(channel="web", occurred_at=ended, key="s-owner-2", role="user",
                   user_id=owner, conversation_id="shared", text="still there?"),
    ]


def test_messages_of_removed_rows_go_too(engine: Engine) -> None:
    # Messages have no foreign keys, so erasure and retention delete the messages of the
    # conversations and contacts they remove themselves.
    assert inspect(engine).get_foreign_keys("messages") == []
    now = datetime(2024, 6, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=100), now - timedelta(days=2)
    writer = Writer(engine)
    writer.write(shared_conversation("owner", "old-guest", old, recent)
                 + person_events("old-only", old, "o") + person_events("erased", recent, "e"))
    with Session(engine) as session:
        messages = set(session.scalars(select(models.Message.key)))
    assert orphan_messages(engine) == []

    removed = purge_older_than(engine, 30, now_ms=int(now.timestamp() * 1000))
    report = erase_person(engine, "whatsapp", "erased")

    with Session(engine) as session:
        left = set(session.scalars(select(models.Message.key)))
        contacts = set(session.scalars(select(models.Contact.external_id)))
    # "old-guest" was last seen before the cutoff and owns no conversation: the contact and
    # its message go, while the shared conversation it wrote in stays.
    assert contacts == {"owner"}
    assert removed["messages"] == 4 + 1
    assert report.removed["messages"] == 4
    assert left == messages - {"s-guest"} - {key for key in messages
                                            if key.startswith(("o-", "e-"))}
    assert left == {"s-owner-1", "s-bot", "s-owner-2"}
    assert orphan_messages(engine) == []


def attribute_owners(engine: Engine) -> tuple[set[int], set[int]]:
    """Return the conversation ids of the stored attributes, and those of the conversations."""
    with Session(engine) as session:
        owners = set(session.scalars(select(models.ConversationAttribute.conversation_id)))
        stored = set(session.scalars(select(models.Conversation.id)))
    return owners, stored


def test_attributes_of_removed_conversations_go(engine: Engine) -> None:
    # Conversation attributes have no foreign key either, so erasure and retention delete
    # the attributes of the conversations they remove themselves.
    assert inspect(engine).get_foreign_keys("conversation_attributes") == []
    now = datetime(2024, 6, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=100), now - timedelta(days=2)
    Writer(engine).write(person_events("old-only", old, "o") + person_events("kept", recent, "k")
                         + person_events("erased", recent, "e"))
    owners, stored = attribute_owners(engine)
    assert len(owners) == 6  # two conversations per person, each with a plan
    assert owners == stored

    removed = purge_older_than(engine, 30, now_ms=int(now.timestamp() * 1000))
    report = erase_person(engine, "whatsapp", "erased")

    owners, stored = attribute_owners(engine)
    assert removed["conversation_attributes"] == 2
    assert report.removed["conversation_attributes"] == 2
    assert len(stored) == 2
    assert owners == stored


# Statements that remove a conversation or a contact (with their messages) as erasure does,
# run inside the writer's transaction just before it inserts a batch's messages.
REMOVALS = {
    "conversations": ("DELETE FROM messages WHERE conversation_id IN "
                      "(SELECT id FROM conversations WHERE external_id = 'c1')",
                      "DELETE FROM conversations WHERE external_id = 'c1'"),
    "contacts": ("DELETE FROM messages WHERE contact_id IN "
                 "(SELECT id FROM contacts WHERE external_id = 'u1')",
                 "UPDATE conversations SET contact_id = NULL WHERE contact_id IN "
                 "(SELECT id FROM contacts WHERE external_id = 'u1')",
                 "DELETE FROM contacts WHERE external_id = 'u1'"),
}


def _removed_row_message(key: str, minute: int) -> ev.Message:
    return ev.Message(channel="web", occurred_at=T0 + timedelta(minutes=minute), key=key,
                      role="user", user_id="u1", conversation_id="c1", text="hello")


@contextlib.contextmanager
def _removing(engine: Engine, table: str, times: int) -> Iterator[list[str]]:
    # Runs the removal of ``table`` before each of the first ``times`` inserts of messages,
    # in the inserting transaction, and yields the list of the removals run. On PostgreSQL
    # the messages go by COPY in a savepoint, so the removal runs before the savepoint.
    removed: list[str] = []

    def remove(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        inserting = statement.startswith(("INSERT INTO messages", "SAVEPOINT chatmw_copy"))
        if inserting and len(removed) < times:
            removed.append(table)
            for sql in REMOVALS[table]:
                cursor.execute(sql)

    event.listen(engine, "before_cursor_execute", remove)
    try:
        yield removed
    finally:
        event.remove(engine, "before_cursor_execute", remove)


@pytest.mark.parametrize("table", sorted(REMOVALS))
def test_write_fails_on_removed_rows(engine: Engine, table: str) -> None:
    # The rows are removed in both the first transaction and the one the writer runs
    # again at once, so the write fails.
    writer = Writer(engine)
    writer.write([_removed_row_message("m1", 0)])
    message = f"1 rows of {table} that the batch uses were removed"
    with (_removing(engine, table, times=2) as removed,
          pytest.raises(OperationalError, match=message)):
        writer.write([_removed_row_message("m2", 1)])
    assert removed == [table, table]
    with Session(engine) as session:
        assert set(session.scalars(select(models.Message.key))) == {"m1"}

    writer.write([_removed_row_message("m2", 1)])
    with Session(engine) as session:
        keys = set(session.scalars(select(models.Message.key)))
    assert keys == {"m1", "m2"}
    assert orphan_messages(engine) == []


@pytest.mark.parametrize("table", sorted(REMOVALS))
def test_write_retries_after_removed_rows(engine: Engine, table: str) -> None:
    # A removal during the first transaction fails it (the removal runs in that
    # transaction here, so it is rolled back too), and the same write call stores the
    # batch in a second transaction with the ids read again.
    writer = Writer(engine)
    writer.write([_removed_row_message("m1", 0)])
    with _removing(engine, table, times=1) as removed:
        assert writer.write([_removed_row_message("m2", 1)]) == 1
    assert removed == [table]
    with Session(engine) as session:
        messages = session.execute(select(models.Message.key, models.Contact.external_id,
                                          models.Conversation.external_id)
                                   .join(models.Contact,
                                         models.Contact.id == models.Message.contact_id)
                                   .join(models.Conversation,
                                         models.Conversation.id == models.Message.conversation_id)
                                   ).all()
    assert sorted(tuple(row) for row in messages) == [("m1", "u1", "c1"), ("m2", "u1", "c1")]
    assert orphan_messages(engine) == []


def test_erasure_removes_messages_stored_meanwhile(engine: Engine) -> None:
    # A writer may commit a message for the person while the erasure's delete of the
    # conversation waits for its row lock. Simulated: the message is inserted just before
    # that delete, after the erasure has read the messages to remove.
    Writer(engine).write([
        ev.Message(channel="web", occurred_at=T0, key="m1", role="user", user_id="u1",
                   conversation_id="c1", text="hello"),
        ev.Message(channel="web", occurred_at=T0, key="other", role="user", user_id="u2",
                   conversation_id="c2", text="hello"),
    ])
    late: list[str] = []

    def store_late(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("DELETE FROM conversations") and not late:
            late.append(statement)
            cursor.execute(
                "INSERT INTO messages (key, conversation_id, contact_id, channel, role, kind, "
                "occurred_at_ms, is_first_response) SELECT 'late', id, contact_id, 'web', "
                "'user', 'message', occurred, false FROM (SELECT id, contact_id, "
                "started_at_ms + 1000 AS occurred FROM conversations "
                "WHERE external_id = 'c1') AS c")

    event.listen(engine, "before_cursor_execute", store_late)
    try:
        report = erase_person(engine, "web", "u1")
    finally:
        event.remove(engine, "before_cursor_execute", store_late)
    assert len(late) == 1
    assert report.removed["messages"] == 2
    with Session(engine) as session:
        assert set(session.scalars(select(models.Message.key))) == {"other"}
    assert orphan_messages(engine) == []


def test_purge_rejects_non_positive_days(engine: Engine) -> None:
    with pytest.raises(ValueError, match="days must be positive"):
        purge_older_than(engine, 0)


def _attribute_update(minute: int, plan: str) -> ev.ConversationUpdate:
    return ev.ConversationUpdate(channel="web", occurred_at=T0 + timedelta(minutes=minute),
                                 user_id="u1", conversation_id="c1", attributes={"plan": plan})


def test_update_retries_removed_conversation(engine: Engine) -> None:
    # Conversation c1 is removed, as erasure does, in the writer's transaction just before
    # the attributes of an update go in. Nothing rejects an attribute of a removed
    # conversation, so the writer must see the removal and write the update again.
    writer = Writer(engine)
    writer.write([_removed_row_message("m1", 0)])
    removals: list[str] = []

    def remove(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO conversation_attributes") and not removals:
            removals.append(statement)
            cursor.execute("DELETE FROM messages WHERE conversation_id IN "
                           "(SELECT id FROM conversations WHERE external_id = 'c1')")
            cursor.execute("DELETE FROM conversations WHERE external_id = 'c1'")

    event.listen(engine, "before_cursor_execute", remove)
    try:
        writer.write([_attribute_update(1, "pro")])
    finally:
        event.remove(engine, "before_cursor_execute", remove)

    owners, stored = attribute_owners(engine)
    assert len(removals) == 1
    assert owners <= stored
    with Session(engine) as session:
        attributes = session.execute(
            select(models.Conversation.external_id, models.ConversationAttribute.value)
            .join(models.ConversationAttribute,
                  models.ConversationAttribute.conversation_id == models.Conversation.id)).all()
    assert [tuple(row) for row in attributes] == [("c1", "pro")]


def test_update_racing_erasure_no_orphan(database_url: str) -> None:
    # On PostgreSQL, an erasure commits in another transaction after the writer resolved
    # conversation c1 and before it locks the row. The writer must not store the update's
    # attribute under the removed conversation's id.
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite lets one writer in at a time")
    engine = make_engine(database_url)
    eraser = make_engine(database_url)
    try:
        writer = Writer(engine)
        writer.write([_removed_row_message("m1", 0)])
        reports: list[ErasureReport] = []

        def erase_between(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
            if "FOR NO KEY UPDATE" in statement and statement.startswith(
                    "SELECT id FROM conversations") and not reports:
                done = threading.Thread(
                    target=lambda: reports.append(erase_person(eraser, "web", "u1")))
                done.start()
                done.join(30)

        event.listen(engine, "before_cursor_execute", erase_between)
        try:
            writer.write([_attribute_update(1, "pro")])
        finally:
            event.remove(engine, "before_cursor_execute", erase_between)

        owners, stored = attribute_owners(engine)
        assert len(reports) == 1
        assert reports[0].removed["conversations"] == 1
        assert owners <= stored
    finally:
        eraser.dispose()
        engine.dispose()
