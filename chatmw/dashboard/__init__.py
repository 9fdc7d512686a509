"""The metrics dashboard: one HTML page whose script draws what the metrics API returns.

Mount it beside the metrics API, under the same prefix::

    app.include_router(create_metrics_router(engine, prefix="/metrics"))
    app.include_router(create_dashboard_router(engine, prefix="/metrics"))

and open ``/metrics/dashboard``. The page computes nothing itself: every figure comes from
``GET {prefix}/{metric}``, so it shows exactly what the API and the CLI give. Charts are
drawn by plotly.js, served from the installed ``plotly`` Python package; the page loads
nothing from another host.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from chatmw.dashboard.choices import filter_choices
from chatmw.metrics import REGISTRY

__all__ = ["create_dashboard_router", "plotly_js_path"]

_STATIC = ("dashboard.js", "dashboard.css")
_EXTRA_FIGURES = ("csat", "nps")
_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# plotly.js draws with inline styles and data: images; everything else comes from this origin.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'none'"
)


def plotly_js_path() -> Path:
    """Return the path of ``plotly.min.js`` inside the installed plotly package."""
    try:
        root = resources.files("plotly")
    except ModuleNotFoundError:
        raise ImportError("the dashboard needs the plotly package: pip install plotly") from None
    path = Path(str(root.joinpath("package_data", "plotly.min.js")))
    if not path.is_file():
        raise ImportError(f"plotly.min.js not found at {path}; reinstall the plotly package")
    return path


def _page(prefix: str, live: bool) -> str:
    template = (
        resources.files("chatmw.dashboard").joinpath("static", "index.html").read_text("utf-8")
    )
    return template.replace("{{prefix}}", html.escape(prefix, quote=True)).replace(
        "{{live}}", "true" if live else "false"
    )


def create_dashboard_router(
    engine: Engine,
    prefix: str = "/metrics",
    dependencies: Sequence[Any] = (),
    live: bool = False,
) -> APIRouter:
    """Build the router serving ``GET {prefix}/dashboard`` and its scripts.

    ``prefix`` must be the metrics API's prefix. With ``live`` the page also opens the
    server-sent events stream at ``{prefix}/live`` (mount :func:`chatmw.live.create_live_router`
    there too). ``dependencies`` (an API key check, as for the metrics API) guard the filter
    options, which list stored channels and campaigns. The page and its scripts contain no
    data and stay public, so that a browser can load them. The page sends the API key that
    the user types in with every request it makes.
    """
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must start with '/' and not end with '/', got {prefix!r}")
    plotly_path = plotly_js_path()
    page = _page(prefix, live)
    static = {
        name: resources.files("chatmw.dashboard").joinpath("static", name).read_bytes()
        for name in _STATIC
    }
    router = APIRouter(prefix=f"{prefix}/dashboard", tags=["dashboard"])
    guards = [Depends(dep) if callable(dep) else dep for dep in dependencies]
    security_headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}

    @router.get("", response_class=HTMLResponse, summary="The metrics dashboard")
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": _CSP,
                "Cache-Control": "no-cache",
                **security_headers,
            },
        )

    @router.get("/options", summary="Values for the dashboard's filters", dependencies=guards)
    async def dashboard_options(request: Request) -> JSONResponse:
        choices = await run_in_threadpool(filter_choices, engine)
        # Figures served outside the catalogue (the survey router's csat and nps) are
        # offered when the application mounted them under the same prefix.
        paths = {getattr(route, "path", None) for route in request.app.routes}
        extra = [name for name in _EXTRA_FIGURES if f"{prefix}/{name}" in paths]
        return JSONResponse({**choices, "metrics": sorted([*REGISTRY, *extra])})

    @router.get("/static/plotly.min.js", include_in_schema=False)
    async def plotly_js() -> FileResponse:
        # About 4.6 MB (plotly 7.1): streamed from the file, with ETag and Last-Modified.
        return FileResponse(
            plotly_path,
            media_type=_MEDIA_TYPES[".js"],
            headers={"Cache-Control": "public, max-age=86400", **security_headers},
        )

    for name, body in static.items():
        router.add_api_route(
            f"/static/{name}",
            _static_endpoint(body, _MEDIA_TYPES[Path(name).suffix], security_headers),
            methods=["GET"],
            include_in_schema=False,
        )
    return router


def _static_endpoint(body: bytes, media_type: str, headers: dict[str, str]) -> Any:
    async def endpoint() -> Response:
        return Response(
            body, media_type=media_type, headers={"Cache-Control": "no-cache", **headers}
        )

    return endpoint
