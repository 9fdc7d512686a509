"""The ``chatmw serve`` command: the metrics API on its own."""

from __future__ import annotations

from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["serve_command"]


@app.command("serve")
def serve_command(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8100,
    prefix: Annotated[str, typer.Option(help="Path prefix of the metrics API.")] = "/metrics",
) -> None:
    """Serve the metrics API (with its OpenAPI description at /docs)."""
    import uvicorn

    from chatmw.app import create_app

    settings = settings_from(db, metrics_prefix=prefix)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
