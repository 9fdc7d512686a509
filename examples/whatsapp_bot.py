"""A WhatsApp echo bot recorded in process: no proxy, the bot keeps its own webhook URL.

``MetaWebhookMiddleware`` wraps the bot's ASGI app and records each verified webhook on
its way in. ``AsyncRecordingTransport`` wraps the bot's httpx client and records each
message the bot sends through the Cloud API. Neither changes what the bot receives or gets back.

Settings, read from the environment:

- ``CHATMW_META_APP_SECRET``: your Meta app's secret (required).
- ``CHATMW_META_VERIFY_TOKEN``: the verify token you typed in the webhook settings (required).
- ``CHATMW_WHATSAPP_ACCESS_TOKEN``: the token the bot sends with (required).
- ``CHATMW_WHATSAPP_PHONE_NUMBER_ID``: the business phone number id (required).
- ``CHATMW_GRAPH_BASE_URL``: the Graph API base URL (default Meta's
  ``https://graph.facebook.com``; point it at a local stub to try the example offline).
- ``CHATMW_DATABASE_URL``: where chatmw stores what it records (default ``sqlite:///chatmw.db``).
- ``CHATMW_PSEUDONYMISE``, ``CHATMW_PSEUDONYM_KEY``, ``CHATMW_TEXT_MODE``: what chatmw stores
  about people (by default pseudonymised ids and redacted text; see docs/security.md).
- ``BOT_PORT`` (default 8300).

Run ``python examples/whatsapp_bot.py`` and set the app's callback URL to the public
address of ``http://<host>:$BOT_PORT/webhook``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.httpx_hooks import AsyncRecordingTransport
from chatmw.adapters.middleware import MetaWebhookMiddleware
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.security.privacy import PrivacySettings


def make_bot(meta: MetaSettings, runtime: Runtime) -> Starlette:
    """Build the bot: verification, its own signature check, and an echo of each text."""
    transport = AsyncRecordingTransport(runtime.recorder.submit, graph_base_url=meta.graph_base_url)
    client = httpx.AsyncClient(
        transport=transport,
        base_url=meta.graph_base_url,
        timeout=30,
        headers={"Authorization": f"Bearer {meta.whatsapp_access_token}"},
    )

    async def verify(request: Request) -> Response:
        query = request.query_params
        if (
            query.get("hub.mode") == "subscribe"
            and query.get("hub.verify_token") == meta.verify_token
        ):
            return PlainTextResponse(query.get("hub.challenge", ""))
        return PlainTextResponse("forbidden", status_code=403)

    async def webhook(request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(meta.app_secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("x-hub-signature-256", ""), expected):
            return PlainTextResponse("invalid signature", status_code=403)
        for entry in json.loads(body).get("entry", []):
            for change in entry.get("changes", []):
                for message in change.get("value", {}).get("messages", []):
                    if message.get("type") != "text":
                        continue
                    reply = {
                        "messaging_product": "whatsapp",
                        "to": message["from"],
                        "type": "text",
                        "text": {"body": f"You said: {message['text']['body']}"},
                    }
                    await client.post(
                        f"/{meta.graph_api_version}/{meta.whatsapp_phone_number_id}/messages",
                        json=reply,
                    )
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/webhook", verify, methods=["GET"]),
            Route("/webhook", webhook, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    meta = MetaSettings.from_env()
    if not meta.whatsapp_access_token or not meta.whatsapp_phone_number_id:
        raise SystemExit("set CHATMW_WHATSAPP_ACCESS_TOKEN and CHATMW_WHATSAPP_PHONE_NUMBER_ID")
    runtime = Runtime.from_settings(Settings.from_env(), privacy=PrivacySettings.from_env())
    runtime.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process
    # before the recorder is flushed; turn it into a normal exit instead.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    app = MetaWebhookMiddleware(make_bot(meta, runtime), meta, runtime=runtime)
    try:
        uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("BOT_PORT", "8300")))
    finally:
        runtime.stop()


if __name__ == "__main__":
    main()
