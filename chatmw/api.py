"""The metrics HTTP API: a FastAPI router built from the metric catalogue.

Mount it in the wrapped bot's app (``app.include_router(create_metrics_router(engine))``)
or run it alone with ``chatmw serve``.
"""

from __future__ import annotations

import csv
import inspect
import io
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from chatmw.metrics import REGISTRY, FilterError, MetricSpec, parse_filter, render_json
from chatmw.metrics.registry import parse_options

__all__ = ["create_metrics_router", "compute_metric", "error_response", "rows_to_csv"]

COMMON_QUERY: list[tuple[str, str]] = [
    (
        "since",
        "Start of the window, ISO-8601 (inclusive); a conversation belongs to the window "
        "in which it started. A value without offset is read in `tz`.",
    ),
    ("until", "End of the window, ISO-8601 (exclusive). Defaults to now when `since` is given."),
    ("tz", "IANA time zone of day and hour buckets (default UTC)."),
    ("channel", "Only these channels (comma-separated, or repeated)."),
    (
        "group_by",
        "Split results by `channel`, `attr:NAME`, `source`, `medium`, `campaign` or `ad`.",
    ),
    (
        "touch",
        "Attribution touch used by touch filters and groupings: `first` or `last` (default).",
    ),
    ("source", "Only conversations whose touch has this source."),
    ("medium", "Only conversations whose touch has this medium."),
    ("campaign", "Only conversations whose touch has this campaign (UTM campaign or ref)."),
    ("ad", "Only conversations whose touch has this ad id."),
]
ATTRIBUTE_HELP = (
    "Filter on conversation attributes with `attr.NAME=value` (for example "
    "`attr.company=AppleSupport`); several are combined with AND."
)


def error_response(error: FilterError) -> JSONResponse:
    """Return the 422 response for an invalid parameter, naming it and the problem."""
    return JSONResponse(
        status_code=422,
        content={
            "detail": [{"loc": ["query", error.param], "msg": error.message, "type": "value_error"}]
        },
    )


def compute_metric(
    engine: Engine, spec: MetricSpec, params: dict[str, list[str]]
) -> dict[str, Any]:
    """Parse ``params`` and compute ``spec``; raises :class:`FilterError` for invalid input."""
    flt = parse_filter(params, allowed=[param.name for param in spec.params])
    options = parse_options(spec, params)
    return spec.compute(engine, flt, options)


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Render table rows as CSV with a header of every column seen, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def _query_params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    return params


def _endpoint(engine: Engine, spec: MetricSpec) -> Callable[..., Any]:
    async def endpoint(request: Request, **_declared: Any) -> Response:
        params = _query_params(request)
        wants_csv = params.get("format", ["json"])[-1] == "csv"
        if params.get("format", ["json"])[-1] not in ("json", "csv"):
            return error_response(FilterError("format", "expected 'json' or 'csv'"))
        if wants_csv and spec.rows is None:
            return error_response(FilterError("format", f"{spec.name} is not tabular; use json"))
        try:
            result = await run_in_threadpool(compute_metric, engine, spec, params)
        except FilterError as error:
            return error_response(error)
        if wants_csv and spec.rows is not None:
            return Response(rows_to_csv(spec.rows(result)), media_type="text/csv; charset=utf-8")
        return Response(render_json(result), media_type="application/json")

    # Declared parameters exist for the OpenAPI description; values are read from the
    # request so that ``attr.NAME`` filters and repeated values are handled in one place.
    parameters = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)
    ]
    for name, help_text in COMMON_QUERY:
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str | None,
                default=Query(None, description=help_text),
            )
        )
    for param in spec.params:
        description = param.help
        if param.choices:
            description += f" One of: {', '.join(param.choices)}."
        parameters.append(
            inspect.Parameter(
                param.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str | None,
                default=Query(None, description=description),
            )
        )
    format_help = "`json` (default) or `csv`." if spec.rows else "`json` only."
    parameters.append(
        inspect.Parameter(
            "format",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str | None,
            default=Query(None, description=format_help),
        )
    )
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    endpoint.__name__ = "metric_" + spec.name.replace("-", "_")
    return endpoint


def create_metrics_router(
    engine: Engine, prefix: str = "/metrics", dependencies: Sequence[Any] = ()
) -> APIRouter:
    """Build the router serving every registered metric under ``prefix``.

    ``dependencies`` are FastAPI dependencies run before each endpoint (an API key check,
    for example).
    """
    router = APIRouter(
        prefix=prefix,
        tags=["metrics"],
        dependencies=[Depends(dep) if callable(dep) else dep for dep in dependencies],
    )
    for spec in REGISTRY.values():
        router.add_api_route(
            f"/{spec.name}",
            _endpoint(engine, spec),
            methods=["GET"],
            summary=spec.summary,
            description=f"{spec.description}\n\n{ATTRIBUTE_HELP}",
            responses={422: {"description": "An invalid parameter, named in `detail[0].loc`."}},
        )
    return router
