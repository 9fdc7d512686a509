"""The ``chatmw surveys`` commands: check, run, send, export, csat, nps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from chatmw.metrics.filters import MetricFilter
    from chatmw.surveys.config import SurveysConfig

__all__ = ["surveys_app"]

surveys_app = typer.Typer(no_args_is_help=True, help="Post-chat CSAT and NPS surveys.")
app.add_typer(surveys_app, name="surveys")

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config", "-c", exists=True, dir_okay=False, help="Survey configuration file (TOML)."
    ),
]
FilterOptions = {
    "since": typer.Option(help="Start of the window, ISO-8601 (conversations started then)."),
    "until": typer.Option(help="End of the window, ISO-8601 (exclusive)."),
    "tz": typer.Option(help="IANA time zone of dates without offset."),
    "channel": typer.Option(help="Only this channel."),
}


def _load(config: Path) -> SurveysConfig:
    from chatmw.surveys.config import load_config

    try:
        return load_config(config)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error


def _filter(
    since: str | None,
    until: str | None,
    tz: str | None,
    channel: str | None,
    group_by: str | None = None,
) -> MetricFilter:
    from chatmw.metrics.filters import FilterError, parse_filter

    params = {
        name: [value]
        for name, value in (
            ("since", since),
            ("until", until),
            ("tz", tz),
            ("channel", channel),
            ("group_by", group_by),
        )
        if value
    }
    try:
        return parse_filter(params)
    except FilterError as error:
        raise typer.BadParameter(error.message, param_hint=f"--{error.param}") from error


def _engine(db: str | None) -> Engine:
    from chatmw.store.engine import make_engine

    return make_engine(settings_from(db).database_url)


@surveys_app.command("check")
def check(config: ConfigOption) -> None:
    """Validate a survey configuration file and list its surveys."""
    loaded = _load(config)
    for name, survey in loaded.surveys.items():
        typer.echo(
            f"{name}: {survey.kind} on {', '.join(survey.channels)}, trigger {survey.trigger}, "
            f"delay {survey.delay_minutes:g} min, sampling {survey.sampling_rate:g}, "
            f"cooldown {survey.cooldown_days:g} days, locales {', '.join(survey.texts)}"
        )
    if not loaded.surveys:
        typer.echo("no surveys configured")


@surveys_app.command("run")
def run(
    config: ConfigOption,
    db: DbOption = None,
    once: Annotated[bool, typer.Option("--once", help="Run one round and exit.")] = False,
    until_idle: Annotated[
        bool,
        typer.Option(
            "--until-idle", help="Run rounds until one sends and retries nothing, then exit."
        ),
    ] = False,
    max_rounds: Annotated[
        int, typer.Option(help="Upper bound of rounds with --until-idle.")
    ] = 1000,
) -> None:
    """Run the survey dispatcher: schedule, send and record due survey messages.

    Senders come from ``[dispatcher.outbound]`` (``module:callable`` per channel); the web
    widget's outbox is built in. The configuration stored through the API, when there is
    one, replaces the file's.
    """
    import asyncio

    from chatmw.surveys.dispatcher import Dispatcher
    from chatmw.surveys.service import build_channels
    from chatmw.surveys.settings_store import ConfigSource

    loaded = _load(config)
    engine = _engine(db)
    try:
        channels = build_channels(engine, loaded)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    surveyed = {channel for survey in loaded.surveys.values() for channel in survey.channels}
    for channel in sorted(surveyed - set(channels)):
        typer.echo(
            f"warning: no sender for channel {channel!r}; add it to [dispatcher.outbound] "
            "or its surveys wait for another process",
            err=True,
        )
    dispatcher = Dispatcher(engine, ConfigSource(engine, loaded), channels)

    async def main() -> None:
        if once or until_idle:
            for _ in range(1 if once else max_rounds):
                stats = await dispatcher.run_once()
                typer.echo(
                    json.dumps(
                        {
                            "worker": dispatcher.worker_id,
                            "scheduled": stats.scheduled,
                            "sent": stats.sent,
                            "retried": stats.retried,
                            "failed": stats.failed,
                        }
                    )
                )
                if stats.sent == 0 and stats.retried == 0 and stats.failed == 0:
                    break
            return
        stop = asyncio.Event()
        try:
            await dispatcher.run(stop)
        except asyncio.CancelledError:
            stop.set()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        engine.dispose()


@surveys_app.command("send")
def send(
    config: ConfigOption,
    channel: str,
    conversation_id: str,
    db: DbOption = None,
    locale: Annotated[str | None, typer.Option(help="Locale of the texts.")] = None,
) -> None:
    """Schedule a survey of one conversation now; a running dispatcher sends it."""
    from sqlalchemy.orm import Session

    from chatmw.surveys.scheduler import request_survey

    loaded = _load(config)
    engine = _engine(db)
    try:
        with Session(engine) as session, session.begin():
            survey_id = request_survey(
                session, loaded, channel, conversation_id, int(time.time() * 1000), locale=locale
            )
    except (LookupError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    finally:
        engine.dispose()
    typer.echo(f"survey {survey_id} scheduled")


@surveys_app.command("export")
def export(
    db: DbOption = None,
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default stdout).")
    ] = None,
    since: Annotated[str | None, FilterOptions["since"]] = None,
    until: Annotated[str | None, FilterOptions["until"]] = None,
    tz: Annotated[str | None, FilterOptions["tz"]] = None,
    channel: Annotated[str | None, FilterOptions["channel"]] = None,
) -> None:
    """Export survey records and answers as CSV or JSON lines."""
    from chatmw.surveys.export import EXPORT_FORMATS, iter_export

    if format not in EXPORT_FORMATS:
        raise typer.BadParameter(
            f"expected one of {', '.join(EXPORT_FORMATS)}", param_hint="--format"
        )
    flt = _filter(since, until, tz, channel)
    engine = _engine(db)
    try:
        if output is None:
            for chunk in iter_export(engine, flt, format):
                sys.stdout.write(chunk)
        else:
            with output.open("w", encoding="utf-8", newline="") as handle:
                for chunk in iter_export(engine, flt, format):
                    handle.write(chunk)
    finally:
        engine.dispose()


def _figures(
    name: str,
    db: str | None,
    since: str | None,
    until: str | None,
    tz: str | None,
    channel: str | None,
    group_by: str | None,
) -> None:
    from chatmw.surveys.metrics import csat, nps

    flt = _filter(since, until, tz, channel, group_by)
    engine = _engine(db)
    try:
        result = (csat if name == "csat" else nps)(engine, flt)
    finally:
        engine.dispose()
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


GroupByOption = Annotated[str | None, typer.Option(help="Split by channel or attr:NAME.")]


@surveys_app.command("csat")
def csat_command(
    db: DbOption = None,
    since: Annotated[str | None, FilterOptions["since"]] = None,
    until: Annotated[str | None, FilterOptions["until"]] = None,
    tz: Annotated[str | None, FilterOptions["tz"]] = None,
    channel: Annotated[str | None, FilterOptions["channel"]] = None,
    group_by: GroupByOption = None,
) -> None:
    """Print CSAT figures as JSON."""
    _figures("csat", db, since, until, tz, channel, group_by)


@surveys_app.command("nps")
def nps_command(
    db: DbOption = None,
    since: Annotated[str | None, FilterOptions["since"]] = None,
    until: Annotated[str | None, FilterOptions["until"]] = None,
    tz: Annotated[str | None, FilterOptions["tz"]] = None,
    channel: Annotated[str | None, FilterOptions["channel"]] = None,
    group_by: GroupByOption = None,
) -> None:
    """Print NPS figures as JSON."""
    _figures("nps", db, since, until, tz, channel, group_by)
