"""Start-up of ``chatmw import``: what the command line imports, and when the writer starts.

The checks run in fresh interpreters, because this test process has imported everything
already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import chatmw.security
import chatmw.surveys
from chatmw import events as ev
from chatmw.config import Settings
from chatmw.importers.writers import _pack, _unpack
from chatmw.recorder import RecorderSettings
from chatmw.store import models

FIXTURES = Path(__file__).parent / "fixtures" / "import"

# Modules that no chatmw command line needs before it runs a command.
HEAVY_MODULES = ("sqlalchemy", "alembic", "rich.console", "textblob", "nltk", "fastapi",
                 "uvicorn", "pyroaring", "chatmw.store.writer", "chatmw.metrics",
                 "chatmw.runtime", "chatmw.recorder")


def _modules_after(code: str) -> set[str]:
    # The names of the modules loaded after running ``code`` in a new interpreter.
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               check=True, timeout=120)
    return set(json.loads(completed.stdout.splitlines()[-1]))


def test_cli_import_loads_no_heavy_module() -> None:
    loaded = _modules_after("import chatmw.cli")

    assert "chatmw.cli_import" in loaded
    for name in HEAVY_MODULES:
        assert name not in loaded, name


def test_import_help_loads_no_heavy_module() -> None:
    loaded = _modules_after(
        "import sys\nfrom chatmw.cli import app\n"
        "try:\n    app(['import', '--help'])\nexcept SystemExit:\n    pass")

    # Typer renders the help with Rich.
    for name in set(HEAVY_MODULES) - {"rich.console"}:
        assert name not in loaded, name


def test_sentiment_loads_neither_textblob_package_nor_nltk() -> None:
    # Scoring, the fallback for unusual whitespace included, reads textblob's files only.
    code = (
        "from chatmw.sentiment import polarity\n"
        "scores = [polarity('really great service, thanks!'), polarity('great\\u00a0job'),\n"
        "          polarity('not good at all :(')]\n"
        "assert scores[0] > 0 and scores[1] > 0 and scores[2] < 0, scores\n"
    )
    loaded = _modules_after(code)

    assert "chatmw._textblob_text" in loaded
    for name in ("textblob", "textblob.en", "nltk"):
        assert name not in loaded, name


def test_writer_process_starts_before_store_import(tmp_path: Path) -> None:
    # The driver records the order of the child's start and the first import of the
    # store in the parent, then runs the import command with the child for any file size.
    db = tmp_path / "start.db"
    driver = f"""
import sys
import multiprocessing.process

events = []
start = multiprocessing.process.BaseProcess.start

def record_start(self):
    events.append("child started")
    start(self)

def record_import(event, args):
    if event == "import" and args[0] == "chatmw.store.engine" and not events.count(args[0]):
        events.append(args[0])

if __name__ == "__main__":
    multiprocessing.process.BaseProcess.start = record_start
    sys.addaudithook(record_import)
    from chatmw import cli_import
    from chatmw.cli import app

    cli_import.WRITER_PROCESS_MIN_BYTES = 0
    try:
        app(["import", {str(FIXTURES / "transcript.csv")!r}, "--db", "sqlite:///{db}"])
    except SystemExit as exit:
        print("exit", exit.code)
    print(events)
"""
    script = tmp_path / "driver.py"
    script.write_text(driver, encoding="utf-8")

    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=300)

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "8 rows read: 8 imported" in lines[0]
    assert lines[1] == "exit 0"
    assert lines[2] == "['child started', 'chatmw.store.engine']"


def _messages(count: int) -> list[ev.Message]:
    start = datetime(2024, 3, 1, 9, tzinfo=UTC)
    return [ev.Message(channel="web", occurred_at=start + timedelta(seconds=index),
                       key=f"import:web:c{index // 3}:m{index}",
                       role="user" if index % 2 == 0 else "bot", user_id=f"u{index // 3}",
                       text=f"message {index}", conversation_id=f"c{index // 3}",
                       platform_message_id=f"m{index}",
                       attributes={"plan": "pro"} if index % 2 else {})
            for index in range(count)]


@pytest.mark.parametrize("count", [0, 1, 7])
def test_unpack_rebuilds_packed_messages(count: int) -> None:
    messages = _messages(count)

    rebuilt = _unpack(_pack(messages))

    assert rebuilt == messages
    assert all(type(message) is ev.Message for message in rebuilt)


def test_unpack_rejects_uneven_columns() -> None:
    columns = _pack(_messages(3))
    columns[2] = columns[2][:2]

    with pytest.raises(ValueError, match="columns"):
        _unpack(columns)
    with pytest.raises(ValueError, match="columns"):
        _unpack(columns[:-1])


def test_settings_recorder_default() -> None:
    settings = Settings(database_url="postgresql://chatmw:secret@127.0.0.1/chatmw")

    assert settings.recorder == RecorderSettings()
    assert settings.recorder is not Settings().recorder
    assert "secret" not in repr(settings)
    assert "***" in repr(settings)


@pytest.mark.parametrize("package", [chatmw.security, chatmw.surveys])
def test_package_exports_resolve(package: object) -> None:
    for name in package.__all__:  # type: ignore[attr-defined]
        value = getattr(package, name)
        assert vars(package)[name] is value, name
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_child_writer_import_stores_all_rows(database_url: str, engine: Engine,
                                             tmp_path: Path) -> None:
    # The command as a user runs it, in a new process, so the writer child spawns from the
    # console script as in production.
    chatmw = Path(sys.executable).with_name("chatmw")
    driver = ("import sys\nfrom chatmw import cli_import\nfrom chatmw.cli import main\n"
              "cli_import.WRITER_PROCESS_MIN_BYTES = 0\n"
              "if __name__ == '__main__':\n    sys.argv[0] = 'chatmw'\n    main()\n")
    script = tmp_path / "chatmw_driver.py"
    script.write_text(driver, encoding="utf-8")
    assert chatmw.exists()

    completed = subprocess.run(
        [sys.executable, str(script), "import", str(FIXTURES / "transcript.csv"), "--db",
         database_url, "--batch-size", "3"], capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr
    assert "8 rows read: 8 imported, 0 duplicates, 0 skipped; 3 conversations" in (
        completed.stdout)
    with engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(models.Message))
        assert stored.scalar_one() == 8
