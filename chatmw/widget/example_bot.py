"""A tiny bot with Rasa's REST channel shape, for the demo site and the widget's tests.

``POST /webhooks/rest/webhook`` takes ``{"sender", "message"}`` and returns
``[{"recipient_id", "text", "buttons"?}]``. It greets, describes pricing with two buttons,
replies to the buttons' payloads, waits about a second on "slow", and echoes anything else.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["create_example_bot", "EXAMPLE_BOT_PATH"]

EXAMPLE_BOT_PATH = "/webhooks/rest/webhook"


def _replies_to(text: str) -> list[dict[str, Any]]:
    lowered = text.strip().lower()
    if lowered in ("hi", "hello", "hey"):
        return [{"text": "Hello! Ask me about pricing, or anything else."}]
    if "pric" in lowered or "plan" in lowered:
        return [
            {"text": "Starter is $19 a month and Team is $49 a month."},
            {
                "text": "Would you like a demo?",
                "buttons": [
                    {"title": "Yes, book a demo", "payload": "/request_demo"},
                    {"title": "No, thanks", "payload": "/deny"},
                ],
            },
        ]
    if lowered == "/request_demo":
        return [{"text": "Great, a demo request is on its way to our team."}]
    if lowered == "/deny":
        return [{"text": "No problem. I'm here if you need anything."}]
    return [{"text": f"You said: {text}"}]


def create_example_bot() -> FastAPI:
    """Build the example bot's ASGI app."""
    app = FastAPI(title="chatmw example bot")

    @app.post(EXAMPLE_BOT_PATH)
    async def webhook(request: Request) -> JSONResponse:
        document = await request.json()
        sender = str(document.get("sender", ""))
        text = str(document.get("message", ""))
        if text.strip().lower() == "slow":
            await asyncio.sleep(1.0)
            replies = [{"text": "Sorry for the wait: that took a moment."}]
        else:
            replies = _replies_to(text)
        return JSONResponse([{"recipient_id": sender, **reply} for reply in replies])

    return app
