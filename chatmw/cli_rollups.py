"""``chatmw rollups``: refresh or rebuild the metric rollups."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["rollups_app"]

rollups_app = typer.Typer(no_args_is_help=True, help="Manage the metric rollups.")
app.add_typer(rollups_app, name="rollups")


@rollups_app.command("refresh")
def refresh_command(
    db: DbOption = None,
    full: Annotated[
        bool, typer.Option("--full", help="Recompute every rollup row from the raw rows.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="CHATMW_CONFIG",
            show_envvar=True,
            help="TOML configuration file of chatmw serve; its business_hours table becomes the "
            "schedule of the business-hours rollups (default: Mon-Fri 09:00-17:00 UTC).",
        ),
    ] = None,
) -> None:
    """Bring the rollups up to date with the stored messages (built on first use).

    The business hours of --config (or the default ones) are registered first; when they
    differ from the stored schedule, the business-hours histograms are counted again.
    """
    from chatmw.app_config import load_app_config
    from chatmw.business_hours import DEFAULT_BUSINESS_HOURS
    from chatmw.metrics.business_rollups import register_business_hours
    from chatmw.metrics.rollup_refresh import rebuild, refresh
    from chatmw.store.engine import make_engine

    settings = settings_from(db)
    hours = DEFAULT_BUSINESS_HOURS
    if config is not None:
        try:
            loaded = load_app_config(config, database_url=db)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--config") from error
        settings = loaded.settings
        hours = loaded.business_hours or DEFAULT_BUSINESS_HOURS
    engine = make_engine(settings.database_url)
    try:
        register_business_hours(engine, hours)
        report = rebuild(engine) if full else refresh(engine)
    finally:
        engine.dispose()
    action = "rebuilt" if report.rebuilt else f"refreshed {report.slots} slots"
    typer.echo(f"rollups {action} to message id {report.watermark_id} in {report.seconds:.2f} s")
