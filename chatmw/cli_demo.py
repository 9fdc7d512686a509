"""The ``chatmw demo`` command: the example FAQ bot wrapped by chatmw, on a local SQLite file."""

from __future__ import annotations

from typing import Annotated

import typer

from chatmw.cli import app

__all__ = ["demo_command", "DEMO_DATABASE_URL"]

# The demo keeps its own database file and ignores CHATMW_DATABASE_URL, so that trying the
# demo never writes test conversations into a production database.
DEMO_DATABASE_URL = "sqlite:///chatmw-demo.db"


@app.command("demo")
def demo_command(
    db: Annotated[str, typer.Option("--db", help="Database URL of the demo.")] = DEMO_DATABASE_URL,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
) -> None:
    """Serve the example FAQ bot wrapped by chatmw, with the metrics API under /metrics."""
    import uvicorn

    from chatmw._demo.faq_bot import CHAT_PATH, create_app
    from chatmw.store.engine import make_engine, upgrade

    try:
        engine = make_engine(db)
    except Exception as error:
        raise typer.BadParameter(f"invalid database URL {db!r}: {error}",
                                 param_hint="--db") from error
    try:
        upgrade(engine)
    except Exception as error:
        raise typer.BadParameter(f"migrating the database {db!r} failed: {error}",
                                 param_hint="--db") from error
    finally:
        engine.dispose()

    base = f"http://{host}:{port}"
    typer.echo(f"chatmw demo: the FAQ bot wrapped by chatmw, recording into {db}\n")
    typer.echo(f"  chat endpoint    POST {base}{CHAT_PATH}")
    typer.echo(f"    curl -s {base}{CHAT_PATH} -H 'content-type: application/json' \\")
    typer.echo('      -d \'{"user_id": "alice", "message": "What are your opening hours?"}\'')
    typer.echo(f"  dashboard             {base}/metrics/dashboard")
    typer.echo(f"  metrics summary  GET  {base}/metrics/summary")
    typer.echo(f"  response times   GET  {base}/metrics/response-time")
    typer.echo(f"  API docs              {base}/docs")
    typer.echo("  a scripted conversation: python examples/send_conversation.py "
               f"--url {base}\n")
    # The demo's metrics need no API key; admin routes still do (`chatmw keys create`).
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: the demo serves its metrics without API keys to anyone who "
                   f"can reach {host}; use `chatmw serve` with keys outside this machine",
                   err=True)
    demo_app = create_app(wrapped=True, database_url=db)

    # The web chat widget: the example site at /, chatting with the example bot.
    from chatmw.widget.demo import mount_demo_site

    if mount_demo_site(demo_app, demo_app.state.chatmw, host, port):
        typer.echo(f"  web chat widget  {base}/?utm_source=newsletter&utm_campaign=spring\n")
    uvicorn.run(demo_app, host=host, port=port, log_level="info")
