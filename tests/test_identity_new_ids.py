"""Contact and conversation ids from the insert itself: checked against the stored rows."""

from __future__ import annotations

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from chatmw.store.identity import resolve_contacts, resolve_named_conversations
from chatmw.store.models import Contact, Conversation


def _stored_contacts(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(select(Contact.channel, Contact.external_id, Contact.id))
        return {(channel, external): row_id for channel, external, row_id in rows}


def _stored_conversations(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(Conversation.channel, Conversation.external_id, Conversation.id))
        return {(channel, external): row_id for channel, external, row_id in rows}


def test_new_contacts_get_stored_ids(engine: Engine) -> None:
    identities = {("web", f"u{index:03d}"): 1000 + index for index in range(50)}
    with Session(engine) as session, session.begin():
        found = resolve_contacts(session, identities)

    assert found == _stored_contacts(engine)
    assert len(set(found.values())) == 50


def test_mixed_contacts_get_stored_ids(engine: Engine) -> None:
    # Some keys exist already: their ids are read, the new ones come from the insert.
    with Session(engine) as session, session.begin():
        resolve_contacts(session, {("web", f"old{index}"): 1 for index in range(0, 20, 2)})
    identities = {("web", f"old{index}"): 5 for index in range(20)}
    identities.update({("whatsapp", f"new{index}"): 5 for index in range(7)})
    with Session(engine) as session, session.begin():
        found = resolve_contacts(session, identities)

    stored = _stored_contacts(engine)
    assert found == {key: stored[key] for key in identities}
    assert len(stored) == 27


def test_new_ids_after_deleted_last_rows(engine: Engine) -> None:
    # Removing the newest contacts leaves the largest id lower: new rows continue from it.
    with Session(engine) as session, session.begin():
        resolve_contacts(session, {("web", f"a{index}"): 1 for index in range(6)})
    with Session(engine) as session, session.begin():
        session.execute(delete(Contact).where(Contact.external_id.in_(["a4", "a5", "a1"])))
    with Session(engine) as session, session.begin():
        found = resolve_contacts(session, {("web", f"b{index}"): 2 for index in range(4)})

    stored = _stored_contacts(engine)
    assert found == {("web", f"b{index}"): stored[("web", f"b{index}")] for index in range(4)}
    assert len(stored) == 7


def test_new_conversations_get_stored_ids(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        contacts = resolve_contacts(session, {("web", "u1"): 1000, ("web", "u2"): 1000})
        identities = {("web", f"c{index}"): (1000 + index, contacts[("web", f"u{index % 2 + 1}")])
                  for index in range(30)}
        found = resolve_named_conversations(session, identities)
        again = resolve_named_conversations(session, dict(list(identities.items())[:10]))

    stored = _stored_conversations(engine)
    assert found == stored
    assert again == {key: stored[key] for key in list(identities)[:10]}
