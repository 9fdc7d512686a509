"""Serve one app under uvicorn for a load benchmark: ``python -m bench.serve KIND PORT [URL]``.

Kinds: ``bare`` (the FAQ bot alone), ``wrapped`` (the FAQ bot with chatmw as it comes:
sentiment on, the store writer in a child process), ``wrapped-nosentiment``,
``wrapped-thread`` (the store writer in the recorder's thread, ``CHATMW_WRITER=thread``),
``wrapped-nowrite`` (the recorder takes the exchanges and a no-op writer drops them
undecoded, isolating the middleware's own cost in the bot's process), ``proxy`` (the
Messenger and WhatsApp proxy, recording only, writer process) and ``proxy-thread``.
The bot answers at once (think time 0), so the benchmark measures the framework and
chatmw, not a simulated delay.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from chatmw.sentiment import sentiment_enricher

APP_SECRET = "bench-app-secret"
VERIFY_TOKEN = "bench-verify-token"


def build(kind: str, database_url: str | None):  # type: ignore[no-untyped-def]
    import os

    from chatmw._demo.faq_bot import create_app

    if kind in ("wrapped-thread", "wrapped-nowrite", "proxy-thread"):
        os.environ["CHATMW_WRITER"] = "thread"
    if kind == "bare":
        return create_app(False, delay_s=(0.0, 0.0))
    if kind.startswith("wrapped"):
        app = create_app(True, database_url, delay_s=(0.0, 0.0))
        runtime = app.state.chatmw
        if kind == "wrapped-nosentiment":
            runtime.writer.enrichers.remove(sentiment_enricher)
        elif kind == "wrapped-nowrite":
            runtime.recorder.writer = _NullWriter()
            # With the writer in the recorder's thread the runtime would refresh the rollups
            # in this process, which the default (a writer process) does in the child.
            runtime.rollup_interval_s = None
        elif kind not in ("wrapped", "wrapped-thread"):
            raise SystemExit(f"unknown kind {kind!r}")
        return app
    if kind in ("proxy", "proxy-thread"):
        import contextlib

        from starlette.applications import Starlette
        from starlette.routing import Mount

        from chatmw.adapters._meta import MetaSettings
        from chatmw.adapters.proxy import create_proxy_app
        from chatmw.collector import settle_after_startup
        from chatmw.config import Settings
        from chatmw.runtime import Runtime

        runtime = Runtime.from_settings(Settings(database_url=database_url or "sqlite:///bench.db"))
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

        served = Starlette(routes=[Mount("/", app=proxy)], lifespan=lifespan)
        # The collector policy `chatmw proxy` applies once it has started.
        settle_after_startup(served)
        return served
    raise SystemExit(f"unknown kind {kind!r}")


class _NullWriter:
    # Takes the exchanges undecoded, as the writer process does, and stores nothing.
    expands_exchanges = True

    def write(self, batch: object) -> int:
        return 0


SETTLED = "+settled"


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    url = sys.argv[3] if len(sys.argv) > 3 else None
    logging.getLogger("chatmw").setLevel(logging.WARNING)
    settled = kind.endswith(SETTLED)
    app = build(kind.removesuffix(SETTLED), url)
    if settled:
        from chatmw.collector import settle_after_startup

        settle_after_startup(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
