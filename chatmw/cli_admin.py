"""The ``chatmw keys``, ``chatmw erase`` and ``chatmw purge`` commands."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["keys_app"]

keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys of the metrics and admin APIs.")
app.add_typer(keys_app, name="keys")

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _engine(db: str | None):  # noqa: ANN202 - returns a SQLAlchemy Engine, imported lazily
    from chatmw.store.engine import make_engine

    return make_engine(settings_from(db).database_url)


def _time(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help="read (metrics) or admin (metrics and erasure).")]
    = "read",
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    db: DbOption = None,
) -> None:
    """Create an API key and print it; it is shown only this once."""
    from chatmw.security.keys import SCOPES, create_key

    if scope not in SCOPES:
        raise typer.BadParameter(f"must be one of {', '.join(SCOPES)}, got {scope!r}",
                                 param_hint="--scope")
    engine = _engine(db)
    created = create_key(engine, scope, name)
    engine.dispose()
    typer.echo(created.key)
    typer.echo(f"key id {created.info.key_id}, scope {scope}: store the key now, "
               "it cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List the API keys (ids, scopes, names, dates; never the keys)."""
    from chatmw.security.keys import list_keys

    engine = _engine(db)
    keys = list_keys(engine)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps([{"key_id": k.key_id, "scope": k.scope, "name": k.name,
                                "created_at_ms": k.created_at_ms,
                                "revoked_at_ms": k.revoked_at_ms,
                                "last_used_at_ms": k.last_used_at_ms} for k in keys], indent=2))
        return
    header = ("key id", "scope", "created", "revoked", "last used")
    typer.echo(f"{header[0]:<18} {header[1]:<6} {header[2]:<17} {header[3]:<17} "
               f"{header[4]:<17} name")
    for key in keys:
        typer.echo(f"{key.key_id:<18} {key.scope:<6} {_time(key.created_at_ms):<17} "
                   f"{_time(key.revoked_at_ms):<17} {_time(key.last_used_at_ms):<17} {key.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id shown by `keys list`.")],
                db: DbOption = None) -> None:
    """Revoke an API key; requests with it are rejected from then on."""
    from chatmw.security.keys import revoke_key

    engine = _engine(db)
    revoked = revoke_key(engine, key_id)
    engine.dispose()
    if not revoked:
        typer.echo(f"no active key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id} revoked")


@app.command("erase")
def erase(
    user: Annotated[str, typer.Option(
        help="The person as CHANNEL:ID, e.g. whatsapp:4915100000001.")],
    pseudonymised: Annotated[bool, typer.Option(
        help="ID is the stored pseudonym, not the platform id.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove everything stored about one person and print what was removed.

    The platform id is pseudonymised with CHATMW_PSEUDONYM_KEY (or the key stored in the
    database) unless CHATMW_PSEUDONYMISE=0; rows stored under the platform id itself are
    removed too.
    """
    from chatmw.security.erasure import erase_person, parse_user
    from chatmw.security.privacy import Privacy, PrivacySettings

    try:
        channel, user_id = parse_user(user)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--user") from error
    engine = _engine(db)
    privacy = Privacy.load(PrivacySettings.from_env(), engine)
    report = erase_person(engine, channel, origin="cli",
                          **privacy.erasure_ids(user_id, pseudonymised))
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    for table, count in sorted(report.removed.items()):
        typer.echo(f"{table:<28} {count:>8}")
    typer.echo(f"{'total':<28} {report.total:>8}")
    typer.echo(f"confirmation code {report.confirmation_code}", err=True)


@app.command("purge")
def purge(
    older_than_days: Annotated[float, typer.Option(
        "--older-than-days", help="Remove data older than this many days.", min=0.001)],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove conversations, contacts and events older than the retention period."""
    from chatmw.security.erasure import purge_older_than

    engine = _engine(db)
    removed = purge_older_than(engine, older_than_days)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps({"removed": removed, "total": sum(removed.values())}, indent=2))
        return
    for table, count in sorted(removed.items()):
        typer.echo(f"{table:<28} {count:>8}")
    typer.echo(f"{'total':<28} {sum(removed.values()):>8}")


spool_app = typer.Typer(no_args_is_help=True, help="Inspect and replay a recorder spool.")
app.add_typer(spool_app, name="spool")

SpoolDirOption = Annotated[str, typer.Option(
    "--dir", envvar="CHATMW_SPOOL_DIR", show_envvar=True,
    help="The spool directory (the running app must not be using it).")]


def _open_spool(directory: str):  # noqa: ANN202 - returns a FileSpool, imported lazily
    from chatmw.spool import FileSpool, SpoolLockedError, SpoolSettings

    try:
        return FileSpool(SpoolSettings(directory=directory))
    except SpoolLockedError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error


@spool_app.command("status")
def spool_status(directory: SpoolDirOption, as_json: JsonOption = False) -> None:
    """Print how many events wait in the spool, its size and the oldest event's age."""
    spool = _open_spool(directory)
    stats = spool.stats()
    spool.close()
    values = {"pending_events": stats.pending_events, "bytes": stats.pending_bytes,
              "segments": stats.segments, "oldest_age_seconds": stats.oldest_age_seconds}
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    for name, value in values.items():
        typer.echo(f"{name:<20} {'-' if value is None else value}")


@spool_app.command("replay")
def spool_replay(
    directory: SpoolDirOption,
    db: DbOption = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
) -> None:
    """Write the spooled events to the database, as the app does on its next start.

    The writer gets the same enrichers as the app (sentiment, and the text rule of
    CHATMW_TEXT_MODE); the events in the spool were pseudonymised before they were spooled.
    """
    import time

    from chatmw.runtime import Runtime
    from chatmw.security.privacy import PrivacySettings

    runtime = Runtime.from_settings(settings_from(db), spool=_open_spool(directory),
                                    privacy=PrivacySettings.from_env())
    runtime.start()
    spool = runtime.recorder.spool
    deadline = time.monotonic() + timeout
    while spool.pending_events() and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.1)
    left = spool.pending_events()  # type: ignore[union-attr]
    stats = runtime.recorder.stats()
    runtime.stop()
    typer.echo(f"replayed {stats.replayed} events, {left} left in the spool")
    if left:
        raise typer.Exit(1)
