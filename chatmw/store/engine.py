"""Database engines and migrations."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["make_engine", "upgrade", "current_revisions", "head_revisions", "normalise_url",
           "json_text"]

SQLITE_BUSY_TIMEOUT_MS = 10_000
# WAL pages a committing connection lets accumulate before it checkpoints them into the
# database file (SQLite's default is 1,000). A checkpoint runs inside the commit that
# crosses the limit and syncs the file, and pages rewritten between checkpoints (index
# pages, above all) are copied once. With 10,000 pages (about 40 MiB of WAL) the writer
# process stored about 5 % more messages per second (bench/ingest.py, SQLite, sentiment on,
# four alternating runs each).
SQLITE_WAL_CHECKPOINT_PAGES = 10_000


def normalise_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver chosen for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def json_text(value: Any, ensure_ascii: bool = False) -> str:
    """Serialise a JSON column's value, with NaN and infinite floats stored as ``null``.

    JSON has no text for them, so PostgreSQL rejects a document with one and SQLite's
    JSON functions read it as malformed. Python's JSON parser reads ``NaN`` and
    ``Infinity``, and a number such as ``1e400`` becomes an infinite float.
    """
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=ensure_ascii, allow_nan=False)


def _column_json(value: Any) -> str:
    # The engine's serialiser escapes non-ASCII characters, as json.dumps does by default.
    return json_text(value, ensure_ascii=True)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url``; SQLite files run in WAL mode with a busy timeout.

    JSON columns are written by :func:`json_text`, with non-ASCII characters escaped.
    """
    url = normalise_url(url)
    kwargs.setdefault("json_serializer", _column_json)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        _register_plain_adapters()
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        in_memory = parsed.database in (None, "", ":memory:")
        event.listen(engine, "connect", _sqlite_pragmas(in_memory))
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _register_plain_adapters() -> None:
    # Python's sqlite3 module (3.11) binds None and bools through its adapter protocol. With
    # no adapter registered, each such parameter fails a lookup of __adapt__ on
    # PrepareProtocol, which formats an AttributeError: about 2,000 instructions, and 6 %
    # of the store writer's instructions on SQLite (bench/writer_cpu.py under callgrind).
    # A registered adapter is found first.
    # These bind the same values as before (NULL, and 0 or 1), and an adapter the
    # application registered for either type is kept.
    sqlite3.adapters.setdefault((type(None), sqlite3.PrepareProtocol), {}.get)
    sqlite3.adapters.setdefault((bool, sqlite3.PrepareProtocol), int)


def _sqlite_pragmas(in_memory: bool) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _alembic_config() -> Config:
    import chatmw.migrations as migrations_package

    script_location = Path(migrations_package.__file__).resolve().parent
    config = Config()
    config.set_main_option("script_location", str(script_location))
    return config


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Apply the migrations up to ``revision`` (every head by default)."""
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revisions(engine: Engine) -> set[str]:
    """Return the revisions the database is at."""
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def head_revisions() -> set[str]:
    """Return the newest revisions the migrations define."""
    return set(ScriptDirectory.from_config(_alembic_config()).get_heads())
