"""The ``chatmw`` command line.

Each feature adds its commands in its own module, registered at the bottom of this file.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from chatmw.config import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, Settings

__all__ = ["app", "main", "DbOption", "settings_from"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="chatmw: chat metrics for the bots you already run.",
)
db_app = typer.Typer(no_args_is_help=True, help="Manage the chatmw database.")
app.add_typer(db_app, name="db")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=DATABASE_URL_ENV,
        show_envvar=True,
        help=f"Database URL (default {DEFAULT_DATABASE_URL}).",
    ),
]


def settings_from(db: str | None, **overrides: object) -> Settings:
    """Build settings from the ``--db`` option, the environment and ``overrides``."""
    try:
        return Settings.from_env(database_url=db, **overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Apply every migration to the database."""
    from chatmw.store.engine import current_revisions, make_engine, upgrade

    settings = settings_from(db)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    typer.echo(f"database at revision {', '.join(sorted(current_revisions(engine)))}")
    engine.dispose()


def main() -> None:
    """Run the command line."""
    app()


# Feature commands register themselves on ``app`` when imported.
from chatmw import (
    cli_admin,  # noqa: E402,F401
    cli_business,  # noqa: E402,F401
    cli_demo,  # noqa: E402,F401
    cli_import,  # noqa: E402,F401
    cli_metrics,  # noqa: E402,F401
    cli_proxy,  # noqa: E402,F401
    cli_rollups,  # noqa: E402,F401
    cli_serve,  # noqa: E402,F401
    cli_surveys,  # noqa: E402,F401
)
