"""The web chat widget: a script tag for any site, and the chat endpoint behind it.

A site embeds the widget with one tag::

    <script src="https://chat.example.com/chat/widget.js" async></script>

The widget posts each visitor message to ``{prefix}/chat/messages``. The endpoint forwards
it to the bot through a codec (or an in-process handler) and returns the replies. It
records messages, attribution touches and funnel exposures through the recorder.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from chatmw.runtime import Runtime
from chatmw.widget.bot import BotClient, BotError
from chatmw.widget.router import EventSink, WidgetEndpoint, create_widget_router
from chatmw.widget.settings import BotHandler, WidgetSettings

__all__ = [
    "WidgetSettings",
    "BotHandler",
    "BotClient",
    "BotError",
    "EventSink",
    "WidgetEndpoint",
    "create_widget_router",
    "create_site_router",
    "mount_widget",
    "example_site_dir",
]

_PAGE_NAME = re.compile(r"^[a-z0-9-]+$")


def example_site_dir() -> Path | None:
    """Return the ``examples/site`` folder of a source checkout, or ``None`` if absent."""
    candidate = Path(__file__).resolve().parents[2] / "examples" / "site"
    return candidate if (candidate / "index.html").is_file() else None


def create_site_router(site_dir: Path, path: str = "") -> APIRouter:
    """Serve the ``*.html`` pages of ``site_dir`` at ``{path}/NAME.html``, index at ``{path}/``."""
    root = Path(site_dir).resolve()
    if not (root / "index.html").is_file():
        raise ValueError(f"site_dir {str(site_dir)!r} has no index.html")
    router = APIRouter()

    async def index() -> FileResponse:
        return FileResponse(root / "index.html")

    async def page(name: str) -> FileResponse:
        if not _PAGE_NAME.match(name) or not (root / f"{name}.html").is_file():
            raise HTTPException(status_code=404, detail=f"page {name}.html not found")
        return FileResponse(root / f"{name}.html")

    async def to_index() -> RedirectResponse:
        return RedirectResponse(f"{path}/")

    router.add_api_route(f"{path}/", index, methods=["GET"], include_in_schema=False)
    # Only ``*.html`` paths, so that the site shadows no other route of the app.
    router.add_api_route(f"{path}/{{name}}.html", page, methods=["GET"], include_in_schema=False)
    if path:
        router.add_api_route(path, to_index, methods=["GET"], include_in_schema=False)
    return router


def mount_widget(
    app: FastAPI,
    runtime: Runtime,
    settings: WidgetSettings,
    site_dir: Path | None = None,
    site_path: str = "",
    bot_transport: httpx.AsyncBaseTransport | None = None,
) -> WidgetEndpoint:
    """Add the widget's files and chat endpoint to ``app``, recording through ``runtime``.

    With ``site_dir``, its pages are served at ``site_path`` too (the example site uses
    ``/chat/widget.js``, so serve it from the same app with the default prefix).
    ``bot_transport`` replaces the HTTP transport to the bot, as in :func:`create_widget_router`.
    Returns the endpoint; await ``endpoint.bot.aclose()`` when the app stops.
    """
    router = create_widget_router(settings, runtime.recorder, bot_transport)
    app.include_router(router)
    if site_dir is not None:
        app.include_router(create_site_router(site_dir, site_path))
    return router.widget_endpoint  # type: ignore[attr-defined,no-any-return]
