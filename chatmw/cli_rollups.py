"""``chatmw rollups``: refresh or rebuild the metric rollups."""

from __future__ import annotations

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
) -> None:
    """Bring the rollups up to date with the stored messages (built on first use)."""
    from chatmw.metrics.rollup_refresh import rebuild, refresh
    from chatmw.store.engine import make_engine

    settings = settings_from(db)
    engine = make_engine(settings.database_url)
    try:
        report = rebuild(engine) if full else refresh(engine)
    finally:
        engine.dispose()
    action = "rebuilt" if report.rebuilt else f"refreshed {report.slots} slots"
    typer.echo(f"rollups {action} to message id {report.watermark_id} in {report.seconds:.2f} s")
