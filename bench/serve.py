"""Serve one app under uvicorn for a load benchmark: ``python -m bench.serve KIND PORT [URL]``.

Kinds: ``bare`` (the FAQ bot alone), ``wrapped`` (the FAQ bot with chatmw, sentiment on),
``wrapped-nosentiment``, ``wrapped-nowrite`` (the recorder takes events and a no-op writer
drops them, isolating the middleware's own cost), ``wrapped-process`` (the store writer in
a child process, :class:`chatmw.writer_process.ProcessWriter`), ``proxy`` (the Messenger and
WhatsApp proxy, recording only) and ``proxy-process``.
The bot answers at once (think time 0), so the benchmark measures the framework and
chatmw, not a simulated delay.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

APP_SECRET = "bench-app-secret"
VERIFY_TOKEN = "bench-verify-token"


def build(kind: str, database_url: str | None):  # type: ignore[no-untyped-def]
    from chatmw._demo.faq_bot import create_app

    if kind == "bare":
        return create_app(False, delay_s=(0.0, 0.0))
    if kind.startswith("wrapped"):
        app = create_app(True, database_url, delay_s=(0.0, 0.0))
        runtime = app.state.chatmw
        if kind == "wrapped-nosentiment":
            runtime.writer.enrichers.clear()
        elif kind == "wrapped-nowrite":
            runtime.recorder.writer = _NullWriter()
        elif kind == "wrapped-process":
            use_process_writer(runtime)
        elif kind != "wrapped":
            raise SystemExit(f"unknown kind {kind!r}")
        return app
    if kind in ("proxy", "proxy-process"):
        import contextlib

        from starlette.applications import Starlette
        from starlette.routing import Mount

        from chatmw.adapters._meta import MetaSettings
        from chatmw.adapters.proxy import create_proxy_app
        from chatmw.config import Settings
        from chatmw.runtime import Runtime

        runtime = Runtime.from_settings(Settings(database_url=database_url or "sqlite:///bench.db"))
        if kind == "proxy-process":
            use_process_writer(runtime, proxy_writer)
        proxy = create_proxy_app(
            MetaSettings(app_secret=APP_SECRET, verify_token=VERIFY_TOKEN), runtime
        )

        @contextlib.asynccontextmanager
        async def lifespan(_app):  # type: ignore[no-untyped-def]
            runtime.start()
            await proxy.state.proxy.ensure_started()
            try:
                yield
            finally:
                await proxy.state.proxy.stop()
                runtime.stop()

        return Starlette(routes=[Mount("/", app=proxy)], lifespan=lifespan)
    raise SystemExit(f"unknown kind {kind!r}")


class _NullWriter:
    def write(self, batch: object) -> None:
        return None


def proxy_writer(database_url: str, session_gap_ms: int, sentiment: bool):  # type: ignore[no-untyped-def]
    """Build the proxy's writer in the child: the standard one plus the Messenger handlers."""
    from chatmw.adapters import messenger
    from chatmw.writer_process import build_writer

    writer = build_writer(database_url, session_gap_ms, sentiment)
    messenger.register_handlers(writer)
    return writer


def use_process_writer(runtime, build=None) -> None:  # type: ignore[no-untyped-def]
    """Give the runtime's recorder a writer in a child process, built like the runtime's own."""
    import functools

    from chatmw.writer_process import ProcessWriter, build_writer

    settings = runtime.settings
    factory = functools.partial(
        build or build_writer, settings.database_url, settings.session_gap_ms, settings.sentiment
    )
    writer = ProcessWriter(factory)
    writer.start()
    runtime.recorder.writer = writer


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    url = sys.argv[3] if len(sys.argv) > 3 else None
    logging.getLogger("chatmw").setLevel(logging.WARNING)
    uvicorn.run(
        build(kind, url), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
