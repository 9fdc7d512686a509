"""Forwarding a visitor's message to the bot and reading its replies."""

from __future__ import annotations

import asyncio
import logging

import httpx

from chatmw.codecs import ChatReply, ChatRequest, CodecError
from chatmw.widget.settings import WidgetSettings, is_codec

__all__ = ["BotClient", "BotError"]

logger = logging.getLogger("chatmw")


class BotError(Exception):
    """The bot did not reply: ``kind`` is ``timeout``, ``unavailable`` or ``bad_response``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class BotClient:
    """Sends a ``ChatRequest`` to the configured bot: over HTTP through a codec, or in-process.

    The HTTP client is created on first use, in the event loop that serves the requests;
    call :meth:`aclose` when the server stops.
    """

    def __init__(
        self, settings: WidgetSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def ask(self, request: ChatRequest) -> list[ChatReply]:
        """Return the bot's replies to ``request``; raises :class:`BotError` when it fails."""
        if is_codec(self.settings.bot):
            return await self._ask_http(request)
        return await self._ask_handler(request)

    async def aclose(self) -> None:
        """Close the HTTP client, if one was opened."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _ask_http(self, request: ChatRequest) -> list[ChatReply]:
        codec = self.settings.bot
        url = self.settings.bot_url or ""  # WidgetSettings requires bot_url with a codec
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=self.settings.bot_timeout_s
            )
        try:
            response = await self._client.post(
                url,
                content=codec.encode_request(request),  # type: ignore[union-attr]
                headers={"Content-Type": "application/json"},
            )
        except httpx.TimeoutException as error:
            raise BotError(
                "timeout", f"bot timed out after {self.settings.bot_timeout_s}s"
            ) from error
        except httpx.HTTPError as error:
            raise BotError("unavailable", f"bot request failed: {type(error).__name__}") from error
        if response.status_code >= 400:
            raise BotError("unavailable", f"bot returned HTTP {response.status_code}")
        try:
            return codec.decode_response(response.content, request)  # type: ignore[union-attr]
        except CodecError as error:
            raise BotError("bad_response", f"bot response could not be read: {error}") from error

    async def _ask_handler(self, request: ChatRequest) -> list[ChatReply]:
        handler = self.settings.bot
        try:
            replies = await asyncio.wait_for(
                handler(request),  # type: ignore[operator]
                timeout=self.settings.bot_timeout_s,
            )
        except TimeoutError as error:
            raise BotError(
                "timeout", f"bot timed out after {self.settings.bot_timeout_s}s"
            ) from error
        except Exception as error:  # noqa: BLE001 - the bot's failure becomes a 502 for the visitor
            logger.warning("widget bot handler failed: %s", type(error).__name__)
            raise BotError("unavailable", f"bot handler raised {type(error).__name__}") from error
        if not isinstance(replies, list):
            raise BotError("bad_response", "bot handler must return a list of ChatReply")
        return [reply for reply in replies if isinstance(reply, ChatReply)]
