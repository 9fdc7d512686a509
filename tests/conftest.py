"""Shared fixtures: every store test runs on SQLite and on a real PostgreSQL.

PostgreSQL is reached at ``CHATMW_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). One database named
``chatmw_test_<random>`` is created per test run and migrated once. It is emptied before
each test and dropped at the end.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from chatmw.store.engine import make_engine, upgrade

# pytest rewrites assert statements in test modules and conftest files only. Registering
# the shared rollup checks gives their failures the same detail.
pytest.register_assert_rewrite("rollup_helpers")

# Runtimes pseudonymise ids, redact text and drop unparseable bodies by default. The tests
# that check stored ids, text and bodies turn that off here, and the privacy tests pass
# their own settings. Subprocesses started by tests inherit these variables.
os.environ.setdefault("CHATMW_PSEUDONYMISE", "0")
os.environ.setdefault("CHATMW_TEXT_MODE", "full")
os.environ.setdefault("CHATMW_KEEP_RAW_PAYLOADS", "1")
# Runtimes write from a child process by default. Most tests build hundreds of runtimes and
# look at the store right after a flush, so they keep the writer in the recorder's thread.
# tests/test_writer_placement.py runs the writer process.
os.environ.setdefault("CHATMW_WRITER", "thread")

PG_ADMIN_URL = os.environ.get("CHATMW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Create a fresh PostgreSQL database for this run, migrated, and drop it afterwards."""
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"chatmw_test_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(make_engine(PG_ADMIN_URL).url).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"
        ), {"name": name})
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _empty_postgres(url: str) -> None:
    # A rollup refresher or writer left running by an earlier test may hold locks that the
    # TRUNCATE then waits for in the opposite order; PostgreSQL rolls one side back with a
    # deadlock (SQLSTATE 40P01), and the TRUNCATE is tried again.
    for attempt in range(5):
        try:
            _truncate_postgres(url)
            return
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) != "40P01" or attempt == 4:
                raise
            time.sleep(0.2)


def _truncate_postgres(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            names = connection.execute(text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )).scalars().all()
            tables = ", ".join(f'"{name}"' for name in names)
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A migrated, empty database: a new SQLite file, or the run's PostgreSQL emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'chatmw.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        return url
    url = request.getfixturevalue("postgres_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on :func:`database_url`, disposed after the test."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio only."""
    return "asyncio"


@pytest.fixture
def hog() -> Iterator[int]:
    """A busy process at the test's priority, pinned to one CPU; yields that CPU.

    Tests of the writer processes' scheduling pin a writer to the same CPU to starve it.
    """
    cpu = min(os.sched_getaffinity(0))
    process = subprocess.Popen([sys.executable, "-c",
                                f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        yield cpu
    finally:
        process.kill()
        process.wait()
