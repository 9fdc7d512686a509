"""Captured chat exchanges, decoded into messages off the request path.

The ASGI middleware copies a request and its response and hands them to the recorder as
one :class:`Exchange` event, without reading either body. The exchange's
:class:`ExchangeDecoder` turns it into the user's message, the bot's replies and a
conversation update where the batch is written: in the store writer of the writer process,
or in the recorder's thread before it writes or spools a batch. The bot's event loop
therefore spends no time on JSON decoding or on building events.

Expanding an exchange is deterministic: the keys of the messages come from the exchange
(``key``), so a batch written again after a failure stores the same rows once.
"""

from __future__ import annotations

import logging
import operator
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from chatmw import events as ev
from chatmw.codecs import ChatReply, ChatRequest, Codec, CodecError

__all__ = ["Exchange", "ExchangeDecoder", "Expander", "captured_exchange", "expand_all",
           "EXCHANGE_PARTS", "RESPONSE_STATES"]

logger = logging.getLogger("chatmw")

# States of the response body: read in full, streamed (server-sent events, never copied),
# larger than the copy limit, or never finished.
RESPONSE_STATES = ("complete", "streamed", "too_large", "unfinished")


class Expander(Protocol):
    """The decoder of an :class:`Exchange`: :class:`ExchangeDecoder` for chat exchanges,
    ``chatmw.adapters.webhook.WebhookDecoder`` for Meta webhook bodies."""

    skipped: Counter[str]

    def expand(self, exchange: Exchange) -> list[ev.Event]: ...


# Builders of the decoded events (see ``chatmw.events.checked_builder``): each exchange
# makes two or three events, which the dataclass constructors would build more slowly.
_build_user_message = ev.checked_builder(ev.Message, (
    "channel", "occurred_at", "key", "role", "user_id", "text", "conversation_id",
    "platform_message_id", "attributes"))
_REPLY_COMMON = ("channel", "occurred_at", "role", "user_id", "conversation_id", "latency_ms",
                 "reply_to")
_build_reply = ev.checked_builder(ev.Message, (*_REPLY_COMMON, "key", "text", "intent"))
_build_unread_reply = ev.checked_builder(ev.Message, (*_REPLY_COMMON, "key", "text", "meta"))
_build_update = ev.checked_builder(ev.ConversationUpdate, (
    "channel", "occurred_at", "user_id", "conversation_id", "ended", "ended_reason",
    "resolved", "handed_off", "intent", "step"))
# Facts about the conversation that a reply may report, in the order _read_facts returns them.
_REPLY_FACTS = ("intent", "resolved", "handed_off", "ended", "step")
_read_facts = operator.attrgetter(*_REPLY_FACTS)


@dataclass(frozen=True, slots=True)
class ExchangeDecoder:
    """Turns an :class:`Exchange` into events with a bot's codec.

    ``channel`` names the channel when the codec gives none; ``record_text`` set to false
    stores messages without their text; ``max_body_bytes`` bounds a decompressed response.
    Exchanges left unrecorded for an expected reason (a body that is not a chat message)
    are counted in ``skipped`` of the process that decodes them.
    """

    codec: Codec
    channel: str = "web"
    record_text: bool = True
    max_body_bytes: int = 1024 * 1024
    skipped: Counter[str] = field(default_factory=Counter, compare=False, repr=False)

    def expand(self, exchange: Exchange) -> list[ev.Event]:
        """Return the events of ``exchange``: none when it was not a chat message."""
        key, _, body, response, status, latency_ms, response_state, encoding = exchange.parts
        if status is not None and 400 <= status < 500:
            return []  # The bot rejected the request: it was not a chat message.
        try:
            request = self.codec.decode_request(body)
        except CodecError:
            self._skip("request_not_decoded")
            return []
        if request is None:
            return []
        user_message = self._user_message(exchange.occurred_at, key, request)
        if latency_ms is None or (status or 500) >= 500:
            # The bot failed or never finished its response: the user's message went unanswered.
            return [user_message]
        finished_at = exchange.occurred_at + timedelta(milliseconds=latency_ms)
        replies = self._replies(response_state, response, encoding, request)
        events: list[ev.Event] = [user_message]
        events.extend(self._bot_messages(request, user_message, replies, latency_ms,
                                         finished_at))
        update = self._conversation_update(request, replies, finished_at)
        if update is not None:
            events.append(update)
        return events

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        count = self.skipped[reason]
        if count == 1 or count % 1000 == 0:
            logger.warning("chat middleware skipped an exchange (%s), %d so far", reason, count)

    def _replies(self, response_state: str, response: bytes, encoding: bytes,
                 request: ChatRequest) -> list[ChatReply] | str:
        """Return the replies, or why the response body could not be read."""
        if response_state != "complete":
            return response_state
        body = decoded_body(response, encoding, self.max_body_bytes)
        if body is None:
            self._skip("response_encoding")
            return "encoded"
        try:
            return self.codec.decode_response(body, request)
        except CodecError:
            self._skip("response_not_decoded")
            return "not_decoded"

    def _user_message(self, occurred_at: datetime, key: str, request: ChatRequest) -> ev.Message:
        channel = request.channel or self.channel
        if request.message_id is not None:
            key = f"{channel}:{request.message_id}"
        text = request.text if self.record_text else None
        return _build_user_message(channel, occurred_at, key, "user", request.user_id,
                                   text, request.conversation_id, request.message_id,
                                   dict(request.attributes))

    def _bot_messages(self, request: ChatRequest, user_message: ev.Message,
                      replies: list[ChatReply] | str, latency_ms: float,
                      finished_at: datetime) -> list[ev.Message]:
        common = (user_message.channel, finished_at, "bot", request.user_id,
                  request.conversation_id, latency_ms, user_message.key)
        if isinstance(replies, str):
            # The body was streamed, too large or unreadable: one reply without text keeps the
            # time, and ``meta["body"]`` gives the reason the text is missing.
            return [_build_unread_reply(*common, f"{user_message.key}:reply:0", None,
                                        {"body": replies})]
        return [
            _build_reply(*common, f"{user_message.key}:reply:{index}",
                         reply.text if self.record_text else None, reply.intent)
            for index, reply in enumerate(replies)
        ]

    def _conversation_update(self, request: ChatRequest, replies: list[ChatReply] | str,
                             finished_at: datetime) -> ev.ConversationUpdate | None:
        # The last reply that sets a fact wins.
        facts: list[Any] = [None] * len(_REPLY_FACTS)
        for reply in replies if isinstance(replies, list) else ():
            for index, value in enumerate(_read_facts(reply)):
                if value is not None:
                    facts[index] = value
        if all(fact is None for fact in facts):
            return None
        intent, resolved, handed_off, ended, step = facts
        return _build_update(request.channel or self.channel, finished_at, request.user_id,
                             request.conversation_id, ended, "bot" if ended is True else None,
                             resolved, handed_off, intent, step)


# The parts of an Exchange, in the order of ``Exchange.parts``.
EXCHANGE_PARTS = ("key", "decoder", "request", "response", "status", "latency_ms",
                  "response_state", "content_encoding")


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange(ev.Event):
    """One chat request and its response as the middleware copied them, not yet decoded.

    ``occurred_at`` is the request's arrival. ``parts`` holds the rest, in the order of
    :data:`EXCHANGE_PARTS`, each also readable by its name: ``key``, the key of the user's
    message when the codec gives no message id; ``decoder``, the :class:`Expander` that
    decodes it; ``request`` and ``response``, the bodies; ``status``; ``latency_ms``, the
    time until the response ended (``None`` when it never did); ``response_state``, one of
    :data:`RESPONSE_STATES`; ``content_encoding``, that of the response.

    The parts share one field because the middleware builds an exchange for every chat
    request on the bot's event loop, where each field set costs a call: build exchanges
    with :func:`captured_exchange`.
    """

    parts: tuple[Any, ...]

    def __post_init__(self) -> None:
        # Event's check of storable text is skipped: an exchange is never stored itself,
        # and the events decoded from it run the check when they are built.
        if len(self.parts) != len(EXCHANGE_PARTS):
            raise ValueError(f"an exchange has {len(EXCHANGE_PARTS)} parts "
                             f"({', '.join(EXCHANGE_PARTS)}), got {len(self.parts)}")

    key = property(lambda self: self.parts[0], doc="The key of the user's message.")
    decoder = property(lambda self: self.parts[1], doc="The decoder of this exchange.")
    request = property(lambda self: self.parts[2], doc="The request body.")
    response = property(lambda self: self.parts[3], doc="The response body.")
    status = property(lambda self: self.parts[4], doc="The response status.")
    latency_ms = property(lambda self: self.parts[5], doc="Milliseconds until the response ended.")
    response_state = property(lambda self: self.parts[6], doc="One of RESPONSE_STATES.")
    content_encoding = property(lambda self: self.parts[7], doc="The response's encoding.")


def _slot_setter(name: str) -> Callable[[Any, Any], None]:
    for cls in Exchange.__mro__:
        if name in cls.__dict__:
            return cls.__dict__[name].__set__  # type: ignore[no-any-return]
    raise AttributeError(f"Exchange has no slot {name!r}")


_DECODER = EXCHANGE_PARTS.index("decoder")
_set_channel = _slot_setter("channel")
_set_occurred_at = _slot_setter("occurred_at")
_set_parts = _slot_setter("parts")


def captured_exchange(channel: str, occurred_at: datetime, key: str, decoder: Expander,
                      request: bytes, response: bytes = b"", status: int | None = None,
                      latency_ms: float | None = None, response_state: str = "complete",
                      content_encoding: bytes = b"") -> Exchange:
    """Build an :class:`Exchange` from its channel, arrival and parts.

    The middleware builds one per chat request on the bot's event loop, so this sets the
    three slots directly instead of going through the frozen dataclass's constructor,
    which sets each field through ``object.__setattr__`` and checks the parts.
    """
    exchange = object.__new__(Exchange)
    _set_channel(exchange, channel)
    _set_occurred_at(exchange, occurred_at)
    _set_parts(exchange, (key, decoder, request, response, status, latency_ms, response_state,
                          content_encoding))
    return exchange


def expand_all(batch: Sequence[ev.Event],
               transform: Callable[[list[ev.Event]], list[ev.Event]] | None = None
               ) -> Sequence[ev.Event]:
    """Return ``batch`` with each :class:`Exchange` replaced by its events, in order.

    ``transform`` is applied to the events of each exchange (the other events of a batch
    were transformed when they were submitted). ``batch`` itself is returned when it contains
    no exchange. A decoder that fails is logged and its exchange left out: a bug in a codec
    must not keep the rest of the batch from being stored.
    """
    if not any(event.__class__ is Exchange for event in batch):
        return batch
    result: list[ev.Event] = []
    for event in batch:
        if event.__class__ is not Exchange:
            result.append(event)
            continue
        decoder = event.parts[_DECODER]  # type: ignore[attr-defined]
        try:
            decoded = decoder.expand(event)
        except Exception as error:  # noqa: BLE001 - one bad exchange must not stop the batch
            decoder.skipped["decode_error"] += 1
            logger.error("chat exchange could not be decoded (%s), so it was not recorded",
                         type(error).__name__)
            continue
        result.extend(decoded if transform is None else transform(decoded))
    return result


def decoded_body(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """Undo a gzip or deflate content encoding; ``None`` for another encoding or a larger body."""
    if encoding in (b"", b"identity"):
        return body
    if encoding not in (b"gzip", b"deflate"):
        return None
    wbits = 16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        decoded = decompressor.decompress(body, limit + 1)
    except zlib.error:
        return None
    return None if len(decoded) > limit else decoded
