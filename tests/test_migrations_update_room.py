"""Migration 0024_update_room: fill factor of the tables the writer updates on PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, text

from chatmw.store.engine import _alembic_config, make_engine, upgrade


def _downgrade(engine: Engine, revision: str) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def _fill_factors(engine: Engine) -> dict[str, list[str] | None]:
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT relname, reloptions FROM pg_class "
            "WHERE relname IN ('conversations', 'contacts', 'messages') AND relkind = 'r'"))
        return {name: options for name, options in rows}


def test_fill_factor_set_and_reset(database_url: str) -> None:
    engine = make_engine(database_url)
    if engine.dialect.name != "postgresql":
        # SQLite has no fill factor: the revision runs and leaves the schema alone.
        _downgrade(engine, "0023_contact_bitmaps")
        upgrade(engine)
        engine.dispose()
        return
    try:
        # The fixture's database is at the head revision.
        assert _fill_factors(engine) == {
            "conversations": ["fillfactor=70"],
            "contacts": ["fillfactor=70"],
            "messages": None,
        }
        _downgrade(engine, "0023_contact_bitmaps")
        assert _fill_factors(engine) == {"conversations": None, "contacts": None, "messages": None}
        upgrade(engine)
        assert _fill_factors(engine)["conversations"] == ["fillfactor=70"]
    finally:
        upgrade(engine)
        engine.dispose()
