"""A Messenger echo bot behind the chatmw proxy, both in one process.

Meta sends webhooks to the proxy (``PROXY_PORT``, path ``/webhook``); the proxy records
them and forwards the same signed bytes to the bot (``BOT_PORT``). The bot checks the
signature itself, then replies through the Send API at the proxy's address, which records
the reply and passes it on to the Graph API.

Settings, read from the environment:

- ``CHATMW_META_APP_SECRET``: your Meta app's secret (required).
- ``CHATMW_META_VERIFY_TOKEN``: the verify token you typed in the webhook settings (required).
- ``CHATMW_MESSENGER_PAGE_ACCESS_TOKEN``: the page access token the bot sends with (required).
- ``CHATMW_BOT_WEBHOOK_URL``: where the proxy forwards webhooks
  (default ``http://127.0.0.1:$BOT_PORT/bot/webhook``).
- ``CHATMW_GRAPH_BASE_URL``: where Graph API calls finally go (default Meta's
  ``https://graph.facebook.com``; point it at a local stub to try the example offline).
- ``CHATMW_DATABASE_URL``: where chatmw stores what it records (default ``sqlite:///chatmw.db``).
- ``CHATMW_PSEUDONYMISE``, ``CHATMW_PSEUDONYM_KEY``, ``CHATMW_TEXT_MODE``: what chatmw stores
  about people (by default pseudonymised ids and redacted text; see docs/security.md).
- ``PROXY_PORT`` (default 8200) and ``BOT_PORT`` (default 8300).

Run ``python examples/messenger_bot.py`` and set the app's callback URL to the public
address of ``http://<host>:$PROXY_PORT/webhook``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.proxy import create_proxy_app
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.security.privacy import PrivacySettings


def make_bot(app_secret: str, page_token: str, graph_url: str) -> Starlette:
    """Build the bot: its own signature check, then an echo of each text message."""

    async def webhook(request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("x-hub-signature-256", ""), expected):
            return PlainTextResponse("invalid signature", status_code=403)
        document = json.loads(body)
        async with httpx.AsyncClient(base_url=graph_url, timeout=30) as client:
            for entry in document.get("entry", []):
                for item in entry.get("messaging", []):
                    message = item.get("message", {})
                    if "text" not in message or message.get("is_echo"):
                        continue
                    reply = {
                        "recipient": {"id": item["sender"]["id"]},
                        "messaging_type": "RESPONSE",
                        "message": {"text": f"You said: {message['text']}"},
                    }
                    await client.post(
                        "/v21.0/me/messages", json=reply, params={"access_token": page_token}
                    )
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/bot/webhook", webhook, methods=["POST"])])


async def main() -> None:
    proxy_port = int(os.environ.get("PROXY_PORT", "8200"))
    bot_port = int(os.environ.get("BOT_PORT", "8300"))
    page_token = os.environ.get("CHATMW_MESSENGER_PAGE_ACCESS_TOKEN", "")
    if not page_token:
        raise SystemExit("set CHATMW_MESSENGER_PAGE_ACCESS_TOKEN to the page access token")
    default_bot_url = f"http://127.0.0.1:{bot_port}/bot/webhook"
    meta = MetaSettings.from_env(
        bot_webhook_url=os.environ.get("CHATMW_BOT_WEBHOOK_URL", default_bot_url)
    )

    runtime = Runtime.from_settings(Settings.from_env(), privacy=PrivacySettings.from_env())
    runtime.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process
    # before the recorder is flushed; turn it into a normal exit instead.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    proxy = uvicorn.Server(
        # No access log: the bot passes its page access token in the query string.
        uvicorn.Config(
            create_proxy_app(meta, runtime), host="127.0.0.1", port=proxy_port, access_log=False
        )
    )
    bot_app = make_bot(meta.app_secret, page_token, f"http://127.0.0.1:{proxy_port}")
    # uvicorn's access logger is shared by both servers, so it is off for both.
    bot = uvicorn.Server(uvicorn.Config(bot_app, host="127.0.0.1", port=bot_port, access_log=False))
    try:
        await asyncio.gather(proxy.serve(), bot.serve())
    finally:
        runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
