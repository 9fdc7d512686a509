"""The standalone chatmw app served by ``chatmw serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from chatmw.api import create_metrics_router
from chatmw.config import Settings
from chatmw.runtime import Runtime

__all__ = ["create_app"]


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """Build the app: the metrics API under ``settings.metrics_prefix``, and the runtime."""
    runtime = runtime or Runtime.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(title="chatmw", summary="Chat metrics for the bots you already run.",
                  lifespan=lifespan)
    app.state.chatmw = runtime
    app.include_router(create_metrics_router(runtime.engine, prefix=settings.metrics_prefix))
    return app
