"""The ``chatmw proxy`` command: the Messenger and WhatsApp proxy in front of any bot."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Annotated

import typer

from chatmw.cli import DbOption, app, settings_from

__all__ = ["proxy_command"]


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


@app.command("proxy")
def proxy_command(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8200,
    bot_url: Annotated[
        str | None,
        typer.Option(
            "--bot-url",
            envvar="CHATMW_BOT_WEBHOOK_URL",
            show_envvar=True,
            help="The bot's own webhook URL; verified webhooks are forwarded there. "
            "Without it the proxy only records.",
        ),
    ] = None,
    graph_base_url: Annotated[
        str | None,
        typer.Option(
            "--graph-base-url",
            envvar="CHATMW_GRAPH_BASE_URL",
            show_envvar=True,
            help="Where Graph API calls are passed through (default https://graph.facebook.com).",
        ),
    ] = None,
    webhook_path: Annotated[
        str, typer.Option(help="Path that receives Meta's webhooks.")
    ] = "/webhook",
    max_body_bytes: Annotated[
        int | None,
        typer.Option(
            help="Largest webhook body accepted, in bytes (default 1 MiB); larger gets 413."
        ),
    ] = None,
    survey_channels: Annotated[
        str,
        typer.Option(
            "--survey-channels",
            envvar="CHATMW_SURVEY_CHANNELS",
            show_envvar=True,
            help="Comma-separated channels (messenger, whatsapp) whose users' platform ids "
            "are kept for the survey dispatcher while ids are pseudonymised.",
        ),
    ] = "",
) -> None:
    """Receive Meta webhooks, record them and forward them to the bot; pass Graph API calls through.

    The app secret and verify token come from CHATMW_META_APP_SECRET and
    CHATMW_META_VERIFY_TOKEN. Privacy follows CHATMW_PSEUDONYMISE and CHATMW_TEXT_MODE.
    With CHATMW_SPOOL_DIR set, a webhook is acknowledged only once its events are on disk.
    """
    import uvicorn

    from chatmw.adapters._meta import MetaSettings
    from chatmw.adapters.proxy import create_proxy_app
    from chatmw.collector import settle_after_startup
    from chatmw.runtime import Runtime
    from chatmw.security.privacy import PrivacySettings
    from chatmw.spool import FileSpool, SpoolSettings

    settings = settings_from(db)
    try:
        spool_settings = SpoolSettings.from_env()
        privacy = PrivacySettings.from_env()
        meta = MetaSettings.from_env(
            bot_webhook_url=bot_url,
            graph_base_url=graph_base_url,
            webhook_path=webhook_path,
            max_body_bytes=max_body_bytes,
            durable_acknowledgement=True if spool_settings is not None else None,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    spool = FileSpool(spool_settings) if spool_settings is not None else None
    runtime = Runtime.from_settings(settings, spool=spool, privacy=privacy)
    runtime.survey_channels = tuple(
        channel.strip() for channel in survey_channels.split(",") if channel.strip()
    )
    runtime.start()
    # httpx logs each request URL at INFO, and Graph API URLs may carry access_token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler the
    # process would die before the finally clause flushes the recorder.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    proxy = create_proxy_app(meta, runtime)
    settle_after_startup(proxy)
    try:
        # No access log: bots often pass the page access token in the query string.
        uvicorn.run(
            proxy,
            host=host,
            port=port,
            log_level="info",
            access_log=False,
        )
    finally:
        runtime.stop()
