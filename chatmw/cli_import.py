"""The ``chatmw import`` command: load past transcripts into the store."""

from __future__ import annotations

import csv
import dataclasses
import functools
from collections.abc import Callable
from contextlib import ExitStack
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from chatmw.cli import DbOption, app, settings_from

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from chatmw.importers.source import Skipped

# Rich, SQLAlchemy and the store are imported inside the command, because every chatmw
# command line imports this module, and so does the import's writer process at its start.

__all__ = ["import_command", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_SKIPPED"]

EXIT_OK = 0
EXIT_FAILED = 1  # the database failed, or the file is not valid UTF-8
EXIT_USAGE = 2  # missing file, unknown format, a required column missing from the header
EXIT_SKIPPED = 3  # the import finished but some rows were invalid and skipped

# Smallest file, in bytes, that gets a progress bar unless --progress or --no-progress is given.
PROGRESS_MIN_BYTES = 1024 * 1024
# Smallest file, in bytes, written by a child process while this one reads it. A smaller
# file is written by a thread, because starting the child takes a second or two of CPU.
WRITER_PROCESS_MIN_BYTES = 4 * 1024 * 1024

FORMAT_HELP = "File format: csv, jsonl or twcs (default: from the extension .csv, .jsonl, .ndjson)."


def _import_writer_processes(database_url: str) -> int:
    """Return the number of writer processes of an import into ``database_url``.

    The number comes from ``CHATMW_WRITER_PROCESSES``. The backend is read from the URL's
    scheme, so that SQLAlchemy is not imported before the writer processes start.
    """
    from chatmw.config import writer_processes

    backend = database_url.partition(":")[0].partition("+")[0].lower()
    try:
        return writer_processes(backend)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _timezone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise typer.BadParameter(f"unknown time zone {name!r}: use an IANA name such as UTC "
                                 "or Europe/Paris", param_hint="--naive-timezone") from None


class _ProblemLog:
    """Log of skipped rows: the first ones go to stderr, and all of them to an optional CSV."""

    def __init__(self, console: Console, limit: int, errors_file: TextIO | None) -> None:
        self.console = console
        self.limit = limit
        self.count = 0
        self.writer = csv.writer(errors_file) if errors_file else None
        if self.writer:
            self.writer.writerow(["line", "reason"])

    def __call__(self, item: Skipped) -> None:
        line, reason = item.line, item.reason
        self.count += 1
        if self.writer:
            self.writer.writerow([line, reason])
        if self.count <= self.limit:
            self.console.print(f"line {line}: skipped: {reason}", markup=False, highlight=False)

    def close(self) -> None:
        hidden = self.count - self.limit
        if hidden > 0:
            self.console.print(f"... and {hidden} more skipped rows not shown "
                               "(see --errors or --show-errors)", markup=False, highlight=False)


IMPORT_HELP = (
    "Import a transcript file through the same writer as live traffic.\n\n"
    "Importing a file again stores nothing new. Invalid rows are reported with their line "
    "number and skipped. User and conversation ids are pseudonymised and text is redacted "
    "as in every other chatmw process: see CHATMW_PSEUDONYMISE and CHATMW_TEXT_MODE.\n\n"
    "Exit status: 0 when every row was imported or already stored, 1 when writing failed, "
    "2 for usage errors (missing file, unknown format, a required column missing from the "
    "header), 3 when invalid rows were skipped."
)


@app.command("import", help=IMPORT_HELP)
def import_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="Transcript file to import.")],
    file_format: Annotated[str | None, typer.Option("--format", help=FORMAT_HELP)] = None,
    channel: Annotated[str | None, typer.Option(
        help="Channel of rows without a channel column (default: import; twcs: twitter).")] = None,
    naive_timezone: Annotated[str | None, typer.Option(
        "--naive-timezone",
        help="Time zone of timestamps without a UTC offset, such as UTC (default: reject them).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000,
                                            help="Messages written per transaction.")] = 5000,
    errors: Annotated[Path | None, typer.Option(
        help="Write every skipped row's line number and reason to this CSV file.")] = None,
    show_errors: Annotated[int, typer.Option(
        min=0, help="Print at most this many skipped rows to stderr.")] = 20,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Show a progress bar (default: on a terminal, "
        "for files of 1 MiB or more).")] = None,
    db: DbOption = None,
) -> None:
    """Import a transcript file; see ``IMPORT_HELP`` for the exit statuses."""
    from chatmw.importers import FORMATS, TextFile, detect_format, open_source
    from chatmw.importers.writers import (
        ProcessBatchWriter,
        SplitBatchWriter,
        build_import_writer,
    )
    from chatmw.security.privacy import PrivacySettings

    if file_format is None:
        try:
            file_format = detect_format(file)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="FILE") from None
    file_format = file_format.lower()
    if file_format not in FORMATS:
        raise typer.BadParameter(f"unknown format {file_format!r}: use {', '.join(FORMATS)}",
                                 param_hint="--format")
    zone = _timezone(naive_timezone)
    settings = settings_from(db)
    try:
        privacy_settings = PrivacySettings.from_env()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    text_file = TextFile(file)
    try:
        source = open_source(text_file, file_format, channel=channel, naive_timezone=zone)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    with ExitStack() as stack:
        # The same writer as live traffic: sentiment, leads, query types, survey answers,
        # and the same privacy rules: pseudonyms here, the text rule in the writer.
        writer: Any = None
        if text_file.size >= WRITER_PROCESS_MIN_BYTES:
            # Started before this process imports the store, so that the child's start
            # (a new interpreter and its imports) overlaps these imports and the migration.
            # It needs the text rule only; the pseudonym key stays in this process.
            child_privacy = dataclasses.replace(privacy_settings, pseudonym_key=None)
            factory = functools.partial(build_import_writer, settings, child_privacy)
            processes = _import_writer_processes(settings.database_url)
            if processes > 1:
                # PostgreSQL: one child per part of each batch, split by user.
                writer = SplitBatchWriter([ProcessBatchWriter(factory)
                                           for _ in range(processes)])
            else:
                writer = ProcessBatchWriter(factory)
            stack.callback(writer.close)
        from rich.console import Console
        from sqlalchemy.exc import SQLAlchemyError

        from chatmw.importers import ImportAborted, ImportFileError, run_import
        from chatmw.importers.writers import pseudonymise_messages
        from chatmw.runtime import build_writer
        from chatmw.security.privacy import Privacy
        from chatmw.store.engine import make_engine, upgrade

        err = Console(stderr=True, soft_wrap=True)
        if progress is None:
            progress = err.is_terminal and text_file.size >= PROGRESS_MIN_BYTES
        engine = make_engine(settings.database_url)
        stack.callback(engine.dispose)
        try:
            upgrade(engine)
        except SQLAlchemyError as error:
            shown = engine.url.render_as_string(hide_password=True)
            err.print(f"error: migrating the database {shown} failed: {error}", markup=False,
                      highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        try:
            privacy = Privacy.load(privacy_settings, engine)
        except RuntimeError as error:
            err.print(f"error: {error}", markup=False, highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        if writer is None:
            writer = build_writer(settings, engine, privacy_settings)
            privacy.install(writer)
        transform = pseudonymise_messages(privacy)
        errors_stream = stack.enter_context(errors.open("w", newline="", encoding="utf-8")) \
            if errors else None
        problems = _ProblemLog(err, show_errors, errors_stream)
        bar = stack.enter_context(_progress_bar(err, enabled=progress))
        text_file.on_progress = _two_pass_progress(bar, text_file.size)

        try:
            report = run_import(source, writer, batch_size=batch_size, on_skipped=problems,
                                transform=transform)
        except ImportFileError as error:
            err.print(f"error: cannot import {file}: {error}", markup=False, highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        except UnicodeDecodeError as error:
            # The first pass reads the whole file before the first write, so nothing is stored.
            err.print(f"error: {file} is not valid UTF-8 ({error.reason}), so nothing was "
                      "imported: convert it to UTF-8 and import again", markup=False,
                      highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        except ImportAborted as error:
            err.print(f"error: {error}", markup=False, highlight=False)
            err.print("rows before that batch are stored; importing the file again is safe",
                      markup=False, highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        problems.close()

    typer.echo(
        f"{report.rows} rows read: {report.imported} imported, {report.duplicates} duplicates, "
        f"{report.skipped} skipped; {report.conversation_count} conversations; "
        f"{report.seconds:.1f} s ({report.rate():,.0f} rows/s)"
    )
    if report.skipped:
        raise typer.Exit(EXIT_SKIPPED)


def _two_pass_progress(bar: Progress, size: int) -> Callable[[int], None]:
    # Every format reads the file twice: a first pass (a UTF-8 check, or twcs's scan for
    # thread ids), then the import itself.
    scan = bar.add_task("scanning", total=size)
    write = bar.add_task("importing", total=size)

    def update(bytes_read: int) -> None:
        bar.update(scan, completed=min(bytes_read, size))
        bar.update(write, completed=max(bytes_read - size, 0))

    return update


def _progress_bar(console: Console, enabled: bool) -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )

