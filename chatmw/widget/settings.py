"""Settings of the web chat widget endpoint, validated when they are built."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chatmw.codecs import ChatReply, ChatRequest, Codec, RasaCodec

__all__ = ["WidgetSettings", "BotHandler"]

# A bot called in-process instead of over HTTP.
BotHandler = Callable[[ChatRequest], Awaitable[list[ChatReply]]]

_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


@dataclass(frozen=True, slots=True)
class WidgetSettings:
    """Settings of the chat endpoint that the widget talks to.

    ``allowed_origins`` lists the site origins (``scheme://host[:port]``) whose pages may
    use the endpoint; a request with any other ``Origin`` is rejected with 403.
    ``bot`` is a codec (the endpoint then POSTs each message to ``bot_url``) or an async
    callable that takes a ``ChatRequest`` and returns the replies. ``prefix`` is prepended
    to the ``/chat/...`` paths.

    Limits: ``max_message_chars`` per message text, ``max_body_bytes`` per request body,
    ``rate_per_minute`` messages per visitor with bursts of up to ``rate_burst`` (a token
    bucket), ``event_rate_per_minute``/``event_burst`` for impressions and opens, and
    ``max_tracked_visitors`` buckets kept in memory (the least recently used go first).
    ``bot_timeout_s`` bounds one call to the bot.
    """

    allowed_origins: Sequence[str]
    bot: Codec | BotHandler = field(default_factory=RasaCodec)
    bot_url: str | None = None
    prefix: str = ""
    channel: str = "web"
    max_message_chars: int = 2000
    max_body_bytes: int = 32_768
    rate_per_minute: float = 20.0
    rate_burst: int = 8
    event_rate_per_minute: float = 60.0
    event_burst: int = 20
    max_tracked_visitors: int = 10_000
    bot_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        origins = tuple(self.allowed_origins)
        object.__setattr__(self, "allowed_origins", origins)
        if isinstance(self.allowed_origins, str) or not origins:
            raise ValueError(
                "allowed_origins must list at least one site origin, "
                "such as 'https://www.example.com'"
            )
        for origin in origins:
            _check_origin(origin)
        self._check_bot()
        if not _PREFIX.match(self.prefix):
            raise ValueError(
                f"prefix must be empty or start with '/' and not end with '/', got {self.prefix!r}"
            )
        if not self.channel:
            raise ValueError("channel must not be empty")
        self._check_limits()

    def _check_bot(self) -> None:
        if is_codec(self.bot):
            if not self.bot_url:
                raise ValueError("bot_url is required when bot is a codec")
            parts = urlsplit(self.bot_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"bot_url must be an http or https URL, got {self.bot_url!r}")
        elif not callable(self.bot):
            raise ValueError(
                f"bot must be a codec or an async callable, got {type(self.bot).__name__}"
            )

    def _check_limits(self) -> None:
        for name in (
            "max_message_chars",
            "max_body_bytes",
            "rate_burst",
            "event_burst",
            "max_tracked_visitors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rate_per_minute", "event_rate_per_minute", "bot_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_body_bytes < self.max_message_chars:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) must be at least "
                f"max_message_chars ({self.max_message_chars})"
            )

    @property
    def chat_path(self) -> str:
        """The path under which the widget's files and endpoints are served."""
        return f"{self.prefix}/chat"


def is_codec(bot: object) -> bool:
    """Return whether ``bot`` is a codec rather than an in-process handler."""
    return all(hasattr(bot, name) for name in ("encode_request", "decode_response"))


def _check_origin(origin: str) -> None:
    parts = urlsplit(origin)
    well_formed = (
        parts.scheme in ("http", "https")
        and parts.hostname
        and parts.path == ""
        and not parts.query
        and not parts.fragment
        and parts.username is None
        and origin == origin.lower()
    )
    if not well_formed:
        raise ValueError(
            f"allowed_origins entry {origin!r} is not an origin: write it as "
            "lower-case 'scheme://host[:port]' with no path or trailing slash"
        )
