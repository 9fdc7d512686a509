"""Migration 0025_attribute_keys: conversation attributes lose their foreign key."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, inspect, text

from chatmw.store.engine import _alembic_config, make_engine, upgrade

BEFORE = "0024_update_room"


def _downgrade(engine: Engine, revision: str) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def _attribute_keys(engine: Engine) -> list[tuple[list[str], str]]:
    return [(key["constrained_columns"], key["referred_table"])
            for key in inspect(engine).get_foreign_keys("conversation_attributes")]


def _attributes(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT conversation_id, name, value FROM conversation_attributes "
            "ORDER BY conversation_id, name"))
        return [tuple(row) for row in rows]


def _store_conversation_with_attributes(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO conversations (id, channel, external_id, started_at_ms,"
            " last_message_at_ms, message_count, user_message_count, handed_off)"
            " VALUES (7, 'web', 'c7', 0, 0, 0, 0, false)"))
        for name, value in (("plan", "pro"), ("country", "DE")):
            connection.execute(text(
                "INSERT INTO conversation_attributes (conversation_id, name, value)"
                " VALUES (7, :name, :value)"), {"name": name, "value": value})


def test_foreign_key_dropped_rows_kept(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        # The fixture's database is empty and at the head revision.
        assert _attribute_keys(engine) == []
        _downgrade(engine, BEFORE)
        assert _attribute_keys(engine) == [(["conversation_id"], "conversations")]
        _store_conversation_with_attributes(engine)
        if engine.dialect.name == "sqlite":
            with engine.begin() as connection:
                connection.execute(text("ANALYZE conversation_attributes"))

        upgrade(engine)

        assert _attribute_keys(engine) == []
        assert _attributes(engine) == [(7, "country", "DE"), (7, "plan", "pro")]
        if engine.dialect.name == "sqlite":
            # The copy of the table got its statistics back.
            with engine.connect() as connection:
                analysed = connection.execute(text(
                    "SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'conversation_attributes'"))
                assert analysed.scalar_one() > 0
        # An attribute of a conversation that is not stored is no longer rejected.
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO conversation_attributes (conversation_id, name, value)"
                " VALUES (999, 'plan', 'free')"))
        assert (999, "plan", "free") in _attributes(engine)
    finally:
        upgrade(engine)
        engine.dispose()


def test_downgrade_restores_cascade(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        _store_conversation_with_attributes(engine)
        _downgrade(engine, BEFORE)
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM conversations WHERE id = 7"))
        # The restored key deletes the attributes with their conversation again.
        assert _attributes(engine) == []
    finally:
        upgrade(engine)
        engine.dispose()
