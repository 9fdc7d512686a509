"""Running surveys inside an app: the answer preprocessor and a background dispatcher."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Mapping

from sqlalchemy import Engine

from chatmw.outbound import OutboundChannel
from chatmw.store.writer import Writer
from chatmw.surveys.answering import SurveyAnswerPreprocessor
from chatmw.surveys.config import SurveysConfig
from chatmw.surveys.dispatcher import Dispatcher
from chatmw.surveys.web import WebOutbound

__all__ = ["SurveyService", "install_answer_preprocessor", "load_outbound", "build_channels"]

logger = logging.getLogger("chatmw")


def install_answer_preprocessor(writer: Writer) -> SurveyAnswerPreprocessor:
    """Add the survey answer preprocessor to ``writer`` once; returns it."""
    for existing in writer.preprocessors:
        if isinstance(existing, SurveyAnswerPreprocessor):
            return existing
    preprocessor = SurveyAnswerPreprocessor()
    writer.preprocessors.append(preprocessor)
    return preprocessor


def load_outbound(target: str) -> OutboundChannel:
    """Call the factory named ``module:callable`` and return the channel it builds."""
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"dispatcher.outbound: cannot load {target!r}: {error}") from error
    return factory()  # type: ignore[no-any-return]


def build_channels(
    engine: Engine, config: SurveysConfig, extra: Mapping[str, OutboundChannel] | None = None
) -> dict[str, OutboundChannel]:
    """Return the senders of every surveyed channel: the web outbox, the configured factories
    and ``extra`` (which wins)."""
    surveyed = {channel for survey in config.surveys.values() for channel in survey.channels}
    channels: dict[str, OutboundChannel] = {}
    if "web" in surveyed:
        channels["web"] = WebOutbound(engine)
    for channel, target in config.dispatcher.outbound.items():
        channels[channel] = load_outbound(target)
    channels.update(extra or {})
    return channels


class SurveyService:
    """Runs a :class:`Dispatcher` on its own thread and event loop until :meth:`stop`.

    Use it in a process without an event loop of its own (a worker, a WSGI app). In an ASGI
    app, ``asyncio.create_task(dispatcher.run(stop_event))`` in the lifespan does the same
    on the app's loop.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        """Start the dispatcher thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="chatmw-surveys", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=5)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            self._loop.run_until_complete(self.dispatcher.run(self._stop))
        finally:
            self._loop.close()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the dispatcher to stop after its current round; ``False`` if it did not in time."""
        if self._thread is None or self._loop is None or self._stop is None:
            return True
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if not stopped:
            logger.warning("survey dispatcher did not stop within %.1f s", timeout)
        self._thread = None
        return stopped
