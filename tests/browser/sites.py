"""Apps for browser tests: the example site with the widget, and a page on another origin."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from chatmw.widget import create_site_router, create_widget_router, example_site_dir
from chatmw.widget.router import EventSink
from chatmw.widget.settings import WidgetSettings


def example_site_app(settings: WidgetSettings, sink: EventSink) -> FastAPI:
    """The example site and the chat endpoint on one origin, as the demo serves them."""
    site_dir = example_site_dir()
    if site_dir is None:
        raise RuntimeError("examples/site not found next to the chatmw package")
    app = FastAPI()
    app.include_router(create_widget_router(settings, sink))
    app.include_router(create_site_router(site_dir))
    return app


def embedding_page_app(widget_script_url: str) -> FastAPI:
    """A one-page site whose only tie to chatmw is the widget's script tag."""
    app = FastAPI()
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Partner site</title>"
        "</head><body><h1>Partner site</h1>"
        f"<script src='{widget_script_url}' async></script></body></html>"
    )

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
