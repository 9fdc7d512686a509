"""The ``chatmw serve`` command: the metrics API, dashboard, surveys and admin routes."""

from __future__ import annotations

import dataclasses
import ipaddress
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from chatmw.cli import DbOption, app

__all__ = ["serve_command"]


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve_command(
    db: DbOption = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="CHATMW_CONFIG", show_envvar=True,
                     help="TOML configuration file (see chatmw.app_config); checked at start."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8100,
    prefix: Annotated[
        str | None, typer.Option(help="Path prefix of the metrics API (default /metrics).")
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth",
                     help="Serve the read routes without API keys; only on a loopback address."),
    ] = False,
) -> None:
    """Serve the metrics API (described at /docs) and the dashboard (/metrics/dashboard).

    Read routes need an API key of scope read (`chatmw keys create --scope read`), unless
    --no-auth is given; admin routes always need a key of scope admin. With CHATMW_SPOOL_DIR
    set, events the database cannot take are kept on disk and written later.
    """
    import uvicorn

    from chatmw.app import create_app
    from chatmw.app_config import load_app_config
    from chatmw.collector import settle_after_startup
    from chatmw.runtime import Runtime
    from chatmw.spool import FileSpool, SpoolSettings

    try:
        loaded = load_app_config(config, database_url=db)
        if prefix is not None:
            loaded.settings = dataclasses.replace(loaded.settings, metrics_prefix=prefix)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config" if config else None) from error
    try:
        spool_settings = SpoolSettings.from_env()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if no_auth:
        if not _is_loopback(host):
            raise typer.BadParameter(
                f"--no-auth serves metrics to anyone who can reach {host}; use it only with a "
                "loopback address such as 127.0.0.1, or create keys with `chatmw keys create`",
                param_hint="--no-auth")
        loaded.require_keys = False
    # uvicorn re-raises SIGTERM after its graceful shutdown, which has flushed the recorder.
    # This handler turns it into a normal exit with status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    spool = FileSpool(spool_settings) if spool_settings is not None else None
    runtime = Runtime.from_settings(loaded.settings, spool=spool, privacy=loaded.privacy)
    served = create_app(loaded, runtime)
    settle_after_startup(served)
    uvicorn.run(served, host=host, port=port, log_level="info")
