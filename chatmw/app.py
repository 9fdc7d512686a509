"""Composition of chatmw's HTTP routes and background work into a FastAPI app.

:func:`mount_chatmw` adds everything to an existing app (the wrapped bot's, or the one
``chatmw serve`` builds with :func:`create_app`): the metrics API, live figures, the
dashboard, business events, surveys, health and admin routes, and the optional web chat
widget. It ties the runtime and the survey dispatcher to the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from chatmw.api import create_metrics_router
from chatmw.api_business import create_business_router
from chatmw.app_config import AppConfig
from chatmw.business import BusinessSettings
from chatmw.business_hours import BusinessHours
from chatmw.dashboard import create_dashboard_router
from chatmw.events import storable
from chatmw.health import create_health_router
from chatmw.live import create_live_router
from chatmw.metrics.business_hours import installed_business_hours, use_business_hours
from chatmw.outbound import OutboundChannel
from chatmw.runtime import Runtime
from chatmw.security.api import create_admin_router
from chatmw.security.keys import KeyAuth, require_key
from chatmw.surveys.api import create_survey_router
from chatmw.surveys.config import SurveysConfig
from chatmw.surveys.dispatcher import Dispatcher
from chatmw.surveys.service import build_channels
from chatmw.surveys.settings_store import ConfigSource
from chatmw.widget import WidgetSettings, create_widget_router

__all__ = ["ChatmwMount", "mount_chatmw", "create_app"]

logger = logging.getLogger("chatmw")


@dataclass(slots=True)
class ChatmwMount:
    """The parts :func:`mount_chatmw` added: the key check, the survey dispatcher, the widget.

    ``dispatcher`` is ``None`` without a surveys configuration. ``widget`` is the widget
    endpoint when one was mounted.
    """

    runtime: Runtime
    auth: KeyAuth
    dispatcher: Dispatcher | None = None
    widget: Any = None
    _stop: asyncio.Event | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Start the runtime (migrating the database) and the survey dispatcher."""
        await asyncio.to_thread(self.runtime.start)
        if self.dispatcher is not None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self.dispatcher.run(self._stop))

    async def stop(self) -> None:
        """Stop the dispatcher after its round, close the widget's bot client, flush the runtime."""
        if self._task is not None and self._stop is not None:
            self._stop.set()
            # The dispatcher finishes the send in flight, unless it takes more than 10 s.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10.0)
            self._task = None
        if self.widget is not None:
            await self.widget.bot.aclose()
        flushed = await asyncio.to_thread(self.runtime.stop)
        if not flushed:
            logger.warning("chatmw stopped with events not written; see the recorder's counters")


def _tie_to_lifespan(app: FastAPI, mount: ChatmwMount) -> None:
    # Wraps the app's own lifespan (Starlette's ``router.lifespan_context``), so that a bot
    # keeps its start-up code and chatmw starts before it and stops after it.
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        await mount.start()
        try:
            async with inner(target) as state:
                yield state
        finally:
            await mount.stop()

    app.router.lifespan_context = lifespan


async def _validation_error(request: Request, error: Exception) -> Response:
    # FastAPI's own 422 response, unless the invalid input it echoes holds a lone surrogate
    # (JSON allows "\ud800", UTF-8 does not): then the same detail with U+FFFD in its place,
    # where FastAPI would answer 500.
    try:
        return await request_validation_exception_handler(request, error)  # type: ignore[arg-type]
    except UnicodeEncodeError:
        detail = storable(jsonable_encoder(error.errors()))  # type: ignore[attr-defined]
        return JSONResponse(status_code=422, content={"detail": detail})


def _encode_validation_errors_safely(app: FastAPI) -> None:
    # Only FastAPI's default handler is wrapped, so a handler the bot set stays in charge.
    current = app.exception_handlers.get(RequestValidationError)
    if current is request_validation_exception_handler:
        app.exception_handlers[RequestValidationError] = _validation_error


def mount_chatmw(
    app: FastAPI,
    runtime: Runtime,
    *,
    require_keys: bool = True,
    auth: KeyAuth | None = None,
    live: bool = True,
    surveys: SurveysConfig | None = None,
    survey_senders: Mapping[str, OutboundChannel] | None = None,
    business: BusinessSettings | None = None,
    business_hours: BusinessHours | None = None,
    widget: WidgetSettings | None = None,
    widget_bot_transport: httpx.AsyncBaseTransport | None = None,
    manage_lifespan: bool = True,
) -> ChatmwMount:
    """Add chatmw's routes to ``app`` and tie ``runtime`` to its lifespan.

    Under the runtime's ``metrics_prefix`` (``/metrics`` by default) go every metric,
    ``live`` (server-sent events), ``dashboard``, ``csat`` and ``nps``, ``health`` and
    ``health/metrics``, and ``admin/...``. ``/business/...`` records conversions, leads and
    spend, and ``/surveys/...`` administers surveys. With ``widget``, ``/chat/...`` is the
    widget's endpoint.

    With ``require_keys`` the read routes need an API key of scope ``read``; without it they
    are open, which suits only a server on 127.0.0.1. Business, survey administration and
    erasure routes always need a key of scope ``admin``. ``auth`` defaults to a
    :class:`KeyAuth` on the runtime's engine and is stored as ``app.state.chatmw_key_auth``.

    ``surveys`` starts a survey dispatcher in this process; ``survey_senders`` adds
    senders (Messenger, WhatsApp) to the built-in web outbox. Build them with
    ``submit=None``: the dispatcher records what they send. ``business_hours`` replaces
    the default schedule of the business-hours metrics for the whole process, and the
    runtime registers the schedule in use as the one the business-hours rollups count.

    With ``manage_lifespan`` the runtime and the dispatcher start and stop with the app;
    otherwise await ``start()`` and ``stop()`` of the returned :class:`ChatmwMount`.
    """
    settings = runtime.settings
    prefix = settings.metrics_prefix
    engine = runtime.engine
    auth = auth or KeyAuth(engine)
    _encode_validation_errors_safely(app)
    app.state.chatmw = runtime
    app.state.chatmw_key_auth = auth
    read = [require_key("read", auth)] if require_keys else []
    admin = require_key("admin", auth)
    if business_hours is not None:
        use_business_hours(business_hours)
    # The runtime registers the schedule these metrics use, so that rollups serve it.
    runtime.business_hours = installed_business_hours()

    app.include_router(create_metrics_router(engine, prefix=prefix, dependencies=read))
    if live:
        app.include_router(create_live_router(engine, prefix=prefix, dependencies=read))
    app.include_router(create_dashboard_router(engine, prefix=prefix, dependencies=read,
                                               live=live))
    app.include_router(create_health_router(runtime, prefix=prefix, dependencies=read))
    app.include_router(create_admin_router(engine, auth=auth, prefix=prefix,
                                           privacy=lambda: runtime.privacy))
    app.include_router(create_business_router(runtime, business, dependencies=[admin]))

    source = ConfigSource(engine, surveys or SurveysConfig())
    app.include_router(create_survey_router(engine, source, prefix=prefix, dependencies=read,
                                            admin_dependency=admin))
    mount = ChatmwMount(runtime, auth)
    surveyed: set[str] = set()
    if surveys is not None:
        surveyed = {channel for survey in surveys.surveys.values() for channel in survey.channels}
        channels = build_channels(engine, surveys, survey_senders)
        _warn_unsent(surveyed, channels)
        mount.dispatcher = Dispatcher(engine, source, channels)
        runtime.survey_channels = tuple(sorted(set(runtime.survey_channels) | surveyed))

    if widget is not None:
        outbox = engine if widget.channel in surveyed else None
        router = create_widget_router(widget, runtime.recorder, widget_bot_transport,
                                      outbox_engine=outbox)
        app.include_router(router)
        mount.widget = router.widget_endpoint  # type: ignore[attr-defined]
    if manage_lifespan:
        _tie_to_lifespan(app, mount)
    return mount


def _warn_unsent(surveyed: set[str], channels: Mapping[str, OutboundChannel]) -> None:
    for channel in sorted(surveyed - set(channels)):
        logger.warning("surveys: no sender for channel %s in this process; its surveys wait "
                       "for a dispatcher that has one", channel)


def create_app(config: AppConfig, runtime: Runtime | None = None,
               survey_senders: Mapping[str, OutboundChannel] | None = None,
               configure: Callable[[FastAPI, ChatmwMount], None] | None = None) -> FastAPI:
    """Build the app that ``chatmw serve`` runs, with every route of :func:`mount_chatmw`.

    ``configure`` may add routes before the app is returned.
    """
    runtime = runtime or Runtime.from_settings(config.settings, privacy=config.privacy)
    app = FastAPI(title="chatmw", summary="Chat metrics for the bots you already run.")
    mount = mount_chatmw(
        app,
        runtime,
        require_keys=config.require_keys,
        auth=KeyAuth(runtime.engine, config.key_rate_per_second, config.key_burst),
        live=config.live,
        surveys=config.surveys,
        survey_senders=survey_senders,
        business=config.business,
        business_hours=config.business_hours,
    )
    if configure is not None:
        configure(app, mount)
    return app
