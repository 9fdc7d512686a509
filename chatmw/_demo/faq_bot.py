"""A small FAQ bot on FastAPI, and the same bot wrapped by chatmw.

The bot replies by keyword after a short simulated think time. It takes
``{"user_id", "message", "conversation_id"?}`` on ``POST /chat`` and returns
``{"replies": [{"text", "intent", ...}]}``, where a reply may also carry ``resolved``,
``handed_off`` and ``ended``. ``FAQ_CODEC`` tells chatmw where those fields are.

``create_app(wrapped=True, database_url=...)`` shows the lines that add chatmw to a
FastAPI bot: a runtime, the middleware, and :func:`chatmw.app.mount_chatmw`, which adds
the metrics API, dashboard and other routes and starts and stops the runtime with the app.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from fastapi import FastAPI
from pydantic import BaseModel, Field

from chatmw.app import mount_chatmw
from chatmw.codecs import JsonCodec
from chatmw.config import Settings
from chatmw.middleware import ChatMetricsMiddleware
from chatmw.runtime import Runtime

__all__ = ["FAQ_CODEC", "CHAT_PATH", "ChatIn", "ChatOut", "Reply", "answer", "create_bot",
           "create_app"]

CHAT_PATH = "/chat"
# Think time of the bot in seconds, drawn uniformly from this range for each message.
DEFAULT_DELAY_S = (0.02, 0.05)

FAQ_CODEC = JsonCodec(
    text_path="message",
    user_id_path="user_id",
    conversation_id_path="conversation_id",
    replies_path="replies",
    reply_text_path="text",
    reply_intent_path="intent",
    reply_resolved_path="resolved",
    reply_handed_off_path="handed_off",
    reply_ended_path="ended",
)


class ChatIn(BaseModel):
    """A user's message to the bot."""

    user_id: str = Field(min_length=1, max_length=255)
    message: str = Field(max_length=4000)
    conversation_id: str | None = Field(default=None, max_length=255)


class Reply(BaseModel):
    """One bot message, with what the bot reports about the conversation."""

    text: str
    intent: str
    resolved: bool | None = None
    handed_off: bool | None = None
    ended: bool | None = None


class ChatOut(BaseModel):
    """The bot's replies to one message."""

    replies: list[Reply]


@dataclass(frozen=True, slots=True)
class _Entry:
    intent: str
    keywords: tuple[str, ...]
    text: str
    flags: dict[str, bool] = field(default_factory=dict)


FAQ = (
    _Entry("greeting", ("hello", "hi", "hey"),
           "Hi! Ask me about opening hours, prices, shipping, refunds or your password."),
    _Entry("opening_hours", ("hours", "open", "close"),
           "We are open Monday to Friday, 9:00 to 18:00."),
    _Entry("pricing", ("price", "pricing", "cost", "plan"),
           "The Basic plan is 9 EUR a month and the Pro plan 29 EUR a month."),
    _Entry("shipping", ("shipping", "delivery", "deliver", "ship"),
           "Orders ship within 2 working days; delivery takes 3 to 5 days."),
    _Entry("refund", ("refund", "return", "money back"),
           "You can return any order within 30 days for a full refund."),
    _Entry("password_reset", ("password", "reset", "log in", "login"),
           "Use 'Forgot password' on the sign-in page and follow the link we email you."),
    _Entry("human", ("human", "agent", "person"),
           "I am passing you to a colleague; they will reply here shortly.", {"handed_off": True}),
    _Entry("thanks", ("thanks", "thank you", "solved"),
           "Glad I could help!", {"resolved": True}),
    _Entry("goodbye", ("bye", "goodbye"),
           "Goodbye, and have a nice day.", {"ended": True}),
)
FALLBACK = _Entry("fallback", (), "Sorry, I did not get that. I can help with opening hours, "
                                  "prices, shipping, refunds and passwords.")


def _matches(entry: _Entry, words: set[str], text: str) -> bool:
    return any((keyword in text) if " " in keyword else (keyword in words)
               for keyword in entry.keywords)


def answer(message: str) -> Reply:
    """Return the reply of the first FAQ entry whose keyword is in ``message``, or the fallback."""
    text = message.lower()
    words = {word.strip(".,!?;:'\"()") for word in text.split()}
    entry = next((entry for entry in FAQ if _matches(entry, words, text)), FALLBACK)
    return Reply(text=entry.text, intent=entry.intent, **entry.flags)


def create_bot(delay_s: tuple[float, float] = DEFAULT_DELAY_S,
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None
               ) -> FastAPI:
    """Build the bare FAQ bot, with no chatmw code in it."""
    low, high = delay_s
    if not 0 <= low <= high:
        raise ValueError(f"delay_s must be (low, high) with 0 <= low <= high, got {delay_s}")
    bot = FastAPI(title="FAQ bot", lifespan=lifespan)

    @bot.post(CHAT_PATH, response_model=ChatOut, response_model_exclude_none=True)
    async def chat(message: ChatIn) -> ChatOut:
        await asyncio.sleep(random.uniform(low, high))
        return ChatOut(replies=[answer(message.message)])

    @bot.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return bot


def create_app(wrapped: bool, database_url: str | None = None,
               delay_s: tuple[float, float] = DEFAULT_DELAY_S,
               require_keys: bool = False) -> FastAPI:
    """Build the FAQ bot, bare or wrapped by chatmw with the metrics API under ``/metrics``.

    The wrapped app migrates the database and starts the recorder on start-up, and flushes
    it on shutdown. Its runtime is at ``app.state.chatmw``. The read routes (metrics,
    dashboard data, health) are open unless ``require_keys`` is set, which suits a demo on
    127.0.0.1 only; admin routes always need an API key of scope ``admin``.
    """
    bot = create_bot(delay_s)
    if not wrapped:
        return bot

    runtime = Runtime.from_settings(Settings.from_env(database_url=database_url))
    bot.add_middleware(ChatMetricsMiddleware, recorder=runtime.recorder, codec=FAQ_CODEC,
                       paths=[CHAT_PATH])
    mount_chatmw(bot, runtime, require_keys=require_keys)
    return bot
