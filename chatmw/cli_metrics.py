"""The ``chatmw metrics`` command: the same figures as the HTTP API, on the terminal."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["metrics_command", "parse_extra_args"]

EPILOG = (
    "Every HTTP query parameter is an option: --since, --until, --tz, --channel, --group-by, "
    "--touch, --source, --medium, --campaign, --ad, --attr.NAME VALUE (or --attr NAME=VALUE), "
    "and the metric's own parameters such as --interval."
)


def parse_extra_args(args: list[str]) -> dict[str, list[str]]:
    """Turn ``--name value`` and ``--name=value`` pairs into query parameters."""
    params: dict[str, list[str]] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--") or token == "--":
            raise typer.BadParameter(
                f"unexpected argument {token!r}; options look like --since 2024-01-01"
            )
        name, _, value = token[2:].partition("=")
        if not _:
            if index + 1 >= len(args):
                raise typer.BadParameter(f"option --{name} needs a value")
            index += 1
            value = args[index]
        index += 1
        if name == "attr":
            attribute, equals, attribute_value = value.partition("=")
            if not equals:
                raise typer.BadParameter(f"--attr needs NAME=VALUE, got {value!r}")
            name, value = f"attr.{attribute}", attribute_value
        elif not name.startswith("attr."):
            name = name.replace("-", "_")
        params.setdefault(name, []).append(value)
    return params


@app.command(
    "metrics",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=EPILOG,
)
def metrics_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Metric name, e.g. summary, response-time, volume.")],
    db: DbOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON the HTTP API returns.")
    ] = False,
) -> None:
    """Compute one metric from the database and print it."""
    from chatmw.api import compute_metric, rows_to_csv
    from chatmw.metrics import REGISTRY, FilterError, render_json
    from chatmw.store.engine import make_engine

    spec = REGISTRY.get(name)
    if spec is None:
        raise typer.BadParameter(
            f"unknown metric {name!r}; choose from {', '.join(sorted(REGISTRY))}", param_hint="NAME"
        )
    params = parse_extra_args(list(ctx.args))
    output_format = params.pop("format", ["json" if as_json else "table"])[-1]
    settings = settings_from(db)
    engine = make_engine(settings.database_url)
    try:
        result = compute_metric(engine, spec, params)
    except FilterError as error:
        typer.echo(f"Error: invalid --{error.param.replace('_', '-')}: {error.message}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    if as_json or output_format == "json":
        sys.stdout.write(render_json(result).decode() + "\n")
        return
    if spec.rows is None:
        sys.stdout.write(render_json(result).decode() + "\n")
        return
    rows = spec.rows(result)
    if output_format == "csv":
        sys.stdout.write(rows_to_csv(rows))
        return
    _print_table(spec.name, rows)


def _print_table(title: str, rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *("" if row.get(column) is None else str(row.get(column)) for column in columns)
        )
    Console(width=200).print(table)
