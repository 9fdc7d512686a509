"""The ``chatmw spend import`` command: load advertising spend from a CSV file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["spend_import_command", "spend_app"]

spend_app = typer.Typer(no_args_is_help=True, help="Record advertising spend for CPA and ROI.")
app.add_typer(spend_app, name="spend")

EXIT_INVALID = 2  # missing file, invalid row or another currency; nothing was stored


@spend_app.command("import")
def spend_import_command(
    file: Annotated[
        Path, typer.Argument(help="CSV with the header day,channel,campaign,amount[,currency].")
    ],
    db: DbOption = None,
    currency: Annotated[
        str | None,
        typer.Option(
            help="ISO 4217 code of the deployment (e.g. EUR): the default for rows without a "
            "currency, and the only currency accepted."
        ),
    ] = None,
) -> None:
    """Import spend by day, channel and campaign (nothing is stored if a row is invalid).

    A row replaces an earlier record of the same day, channel and campaign.
    """
    from chatmw.business import (
        BusinessSettings,
        SpendRowError,
        deployment_currency,
        install,
        parse_spend_csv,
    )
    from chatmw.store.engine import make_engine
    from chatmw.store.writer import Writer

    try:
        settings = BusinessSettings(currency=currency)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--currency") from None
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        typer.echo(f"Error: cannot read {file}: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None

    engine = make_engine(settings_from(db).database_url)
    try:
        expected = deployment_currency(engine, settings)
        try:
            events = parse_spend_csv(text, expected)
        except SpendRowError as error:
            typer.echo(f"Error: {file}: {error}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        if not events:
            typer.echo(f"Error: {file}: no rows", err=True)
            raise typer.Exit(EXIT_INVALID)
        if expected is not None and events[0].currency != expected:
            typer.echo(
                f"Error: {file}: currency {events[0].currency} differs from this "
                f"deployment's currency {expected}",
                err=True,
            )
            raise typer.Exit(EXIT_INVALID)
        writer = Writer(engine)
        install(writer, settings)
        writer.write(events)
    finally:
        engine.dispose()
    days = sorted(event.day for event in events)
    typer.echo(
        f"stored {len(events)} spend rows in {events[0].currency} "
        f"from {days[0].isoformat()} to {days[-1].isoformat()}"
    )
