"""HTTP routes of surveys: CSAT and NPS figures, export, on-demand sends, configuration.

Mount with ``app.include_router(create_survey_router(engine, config_source))``. The figure
routes take the same filter parameters as every metric. The other routes change or reveal
survey data and require the admin dependency.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from chatmw.metrics.filters import FilterError, parse_filter
from chatmw.surveys.config import SurveysConfig
from chatmw.surveys.export import EXPORT_FORMATS, iter_export
from chatmw.surveys.metrics import csat, csat_rows, nps, nps_rows
from chatmw.surveys.scheduler import SurveyExistsError, request_survey
from chatmw.surveys.settings_store import ConfigSource, clear_config_document, save_config_document

__all__ = ["create_survey_router", "default_admin_dependency"]

ADMIN_SCOPE = "admin"


def default_admin_dependency() -> Callable[..., Any]:
    """Return the API key check of scope ``admin`` (:func:`chatmw.security.require_key`).

    Pass ``admin_dependency`` to :func:`create_survey_router` to use another check.
    """
    from chatmw.security import require_key

    return require_key(ADMIN_SCOPE)


def _error(error: FilterError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "detail": [{"loc": ["query", error.param], "msg": error.message, "type": "value_error"}]
        },
    )


def _invalid_body(message: str, *loc: str) -> JSONResponse:
    # The 422 shape FastAPI declares in the OpenAPI description: a list of {loc, msg, type}.
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]},
    )


def _params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    return params


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def _figure_route(
    engine: Engine,
    compute: Callable[..., dict[str, Any]],
    rows: Callable[[dict[str, Any]], list[dict[str, Any]]],
) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        params = _params(request)
        fmt = params.get("format", ["json"])[-1]
        if fmt not in ("json", "csv"):
            return _error(FilterError("format", "expected 'json' or 'csv'"))
        try:
            flt = parse_filter(params)
        except FilterError as error:
            return _error(error)
        result = await run_in_threadpool(compute, engine, flt)
        if fmt == "csv":
            return Response(_csv(rows(result)), media_type="text/csv; charset=utf-8")
        return Response(
            json.dumps(result, ensure_ascii=False, indent=2).encode(), media_type="application/json"
        )

    return endpoint


def create_survey_router(
    engine: Engine,
    config: SurveysConfig | ConfigSource | None = None,
    prefix: str = "/metrics",
    surveys_prefix: str = "/surveys",
    dependencies: Sequence[Any] = (),
    admin_dependency: Callable[..., Any] | None = None,
) -> APIRouter:
    """Build the survey routes.

    ``GET {prefix}/csat`` and ``GET {prefix}/nps`` serve the figures (``dependencies`` run
    before them, as for the metrics router). Under ``surveys_prefix``, guarded by
    ``admin_dependency`` (default :func:`default_admin_dependency`): ``GET /export``,
    ``POST /send``, ``GET``/``PUT``/``DELETE /config``.
    """
    source = (
        config
        if isinstance(config, ConfigSource)
        else ConfigSource(engine, config or SurveysConfig())
    )
    admin = Depends(admin_dependency or default_admin_dependency())
    router = APIRouter()
    shared = [Depends(dep) if callable(dep) else dep for dep in dependencies]
    for name, compute, rows, summary in (
        (
            "csat",
            csat,
            csat_rows,
            "CSAT: share of 4 and 5 answers, mean, distribution, response rate",
        ),
        ("nps", nps, nps_rows, "NPS: % promoters minus % detractors, with the three counts"),
    ):
        router.add_api_route(
            f"{prefix}/{name}",
            _figure_route(engine, compute, rows),
            methods=["GET"],
            summary=summary,
            dependencies=shared,
            tags=["surveys"],
        )

    @router.get(
        f"{surveys_prefix}/export",
        dependencies=[admin],
        tags=["surveys"],
        summary="Survey records with their answers, as CSV or JSON lines",
    )
    async def export(
        request: Request, format: str = Query("csv", description="`csv` or `jsonl`.")
    ) -> Response:
        params = _params(request)
        params.pop("format", None)
        if format not in EXPORT_FORMATS:
            return _error(FilterError("format", f"expected one of {', '.join(EXPORT_FORMATS)}"))
        try:
            flt = parse_filter(params)
        except FilterError as error:
            return _error(error)
        chunks = await run_in_threadpool(lambda: list(iter_export(engine, flt, format)))
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(iter(chunks), media_type=media)

    @router.post(
        f"{surveys_prefix}/send",
        dependencies=[admin],
        status_code=201,
        tags=["surveys"],
        summary="Survey one conversation now",
    )
    async def send_now(body: Annotated[dict[str, Any], Body()]) -> Any:
        channel, conversation = body.get("channel"), body.get("conversation_id")
        locale = body.get("locale")
        for name, value in (("channel", channel), ("conversation_id", conversation)):
            if not isinstance(value, str):
                return _invalid_body(f"{name} must be a string", name)

        def create() -> int:
            with Session(engine) as session, session.begin():
                return request_survey(
                    session,
                    source.current(),
                    channel,
                    conversation,
                    int(time.time() * 1000),
                    locale=locale,
                )

        try:
            survey_id = await run_in_threadpool(create)
        except LookupError as error:
            raise HTTPException(404, str(error)) from error
        except SurveyExistsError as error:
            raise HTTPException(409, str(error)) from error
        except ValueError as error:
            return _invalid_body(str(error))
        return {"survey_id": survey_id, "state": "scheduled"}

    @router.get(
        f"{surveys_prefix}/config",
        dependencies=[admin],
        tags=["surveys"],
        summary="The survey configuration in force",
    )
    async def get_config() -> dict[str, Any]:
        return (await run_in_threadpool(source.current)).to_document()

    @router.put(
        f"{surveys_prefix}/config",
        dependencies=[admin],
        tags=["surveys"],
        summary="Replace the survey configuration for every process",
    )
    async def put_config(document: Annotated[dict[str, Any], Body()]) -> Any:
        try:
            saved = await run_in_threadpool(save_config_document, engine, document)
        except ValueError as error:
            return _invalid_body(str(error))
        return saved.to_document()

    @router.delete(
        f"{surveys_prefix}/config",
        dependencies=[admin],
        status_code=204,
        tags=["surveys"],
        summary="Drop the stored configuration; the file's applies",
    )
    async def delete_config() -> Response:
        await run_in_threadpool(clear_config_document, engine)
        return Response(status_code=204)

    return router
