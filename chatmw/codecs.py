"""Bot codecs: where the chat sits in a bot's HTTP exchange.

A codec reads the user's message from the request body the bot receives and the bot's
replies from the response body it returns. The ASGI middleware uses a codec to record a
wrapped bot; the web widget endpoint uses one to build the request it forwards to the bot
and to read the replies.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ChatRequest",
    "ChatReply",
    "Codec",
    "CodecError",
    "JsonCodec",
    "RasaCodec",
    "get_path",
    "load_json_body",
    "replace_lone_surrogates",
]


class CodecError(ValueError):
    """A body does not have the shape the codec expects; the message names the field."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The user's side of one exchange."""

    user_id: str
    text: str | None
    conversation_id: str | None = None
    channel: str | None = None
    message_id: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatReply:
    """One bot message in the response, with what the bot reports about the conversation."""

    text: str | None
    intent: str | None = None
    resolved: bool | None = None
    handed_off: bool | None = None
    ended: bool | None = None
    step: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Codec(Protocol):
    """Translates a bot's HTTP exchange to and from chat terms."""

    def decode_request(self, body: bytes) -> ChatRequest | None:
        """Read the user's message; ``None`` when the body is not a chat message."""
        ...

    def decode_response(self, body: bytes, request: ChatRequest) -> list[ChatReply]:
        """Read the bot's replies to ``request`` from the response body."""
        ...

    def encode_request(self, request: ChatRequest) -> bytes:
        """Build the body the bot expects for ``request``."""
        ...


_MISSING = object()


@functools.lru_cache(maxsize=1024)
def _path_parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def get_path(document: Any, path: str | None) -> Any:
    """Return the value at a dotted ``path`` (``a.b.0.c``) or ``None`` where it is absent."""
    if path is None:
        return None
    if document.__class__ is dict and "." not in path:
        return document.get(path)  # The common case: one key of a JSON object.
    value = document
    for part in _path_parts(path):
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else _MISSING
        else:
            return None
        if value is _MISSING:
            return None
    return value


def _set_path(document: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    target = document
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


# The input that json.loads decodes to a surrogate: a \u escape of one, or its three-byte encoding
# (json.loads decodes bytes with "surrogatepass").
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def replace_lone_surrogates(value: Any) -> Any:
    """Return ``value`` with each lone surrogate in its strings replaced by U+FFFD.

    JSON may escape half of a UTF-16 pair (``"\\ud800"``). Python decodes it to a string that
    cannot be encoded as UTF-8, so neither the database nor a JSON response could take it.
    """
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [replace_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {
            replace_lone_surrogates(key): replace_lone_surrogates(item)
            for key, item in value.items()
        }
    return value


# First bytes of a JSON object or array ({ and [).
_JSON_OPENERS = frozenset(b"{[")


def load_json_body(body: bytes) -> Any:
    """Parse a JSON body, with lone surrogates replaced; raises ValueError when it is invalid.

    Besides invalid JSON and UTF-8, this rejects what ``json.loads`` refuses with other
    errors: integers of more than 4300 digits and nesting deeper than the recursion limit.
    """
    try:
        if len(body) > 1 and body[0] in _JSON_OPENERS and body[1]:
            # json.loads would detect UTF-8 from the first two bytes and decode the same way.
            document = json.loads(body.decode("utf-8", "surrogatepass"))
        else:
            document = json.loads(body)
            if not json.detect_encoding(body).startswith("utf-8"):
                # A UTF-16 or UTF-32 body: the expression below reads UTF-8 bytes only.
                return replace_lone_surrogates(document)
        # The substring tests skip the regular expression for bodies without either prefix.
        if (b"\\u" in body or b"\xed" in body) and _SURROGATE_ESCAPE.search(body):
            document = replace_lone_surrogates(document)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"body is not valid JSON: {error}") from None
    return document


def _load_json(body: bytes) -> Any:
    try:
        return load_json_body(body)
    except ValueError as error:
        raise CodecError(str(error)) from error


def _optional_str(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _optional_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class JsonCodec:
    """A codec for JSON bots, configured with dotted field paths.

    Request paths point into the request body; ``replies_path`` points at the reply list
    (or a single reply object) in the response body, and the ``reply_*`` paths point into
    each reply. ``attribute_paths`` maps attribute names to request paths.
    """

    text_path: str = "message"
    user_id_path: str = "user_id"
    conversation_id_path: str | None = None
    channel_path: str | None = None
    message_id_path: str | None = None
    replies_path: str | None = None
    reply_text_path: str = "text"
    reply_intent_path: str | None = None
    reply_resolved_path: str | None = None
    reply_handed_off_path: str | None = None
    reply_ended_path: str | None = None
    reply_step_path: str | None = None
    attribute_paths: Mapping[str, str] = field(default_factory=dict)

    def decode_request(self, body: bytes) -> ChatRequest | None:
        document = _load_json(body)
        if not isinstance(document, dict):
            raise CodecError("request body must be a JSON object")
        user_id = _optional_str(get_path(document, self.user_id_path))
        if user_id is None:
            raise CodecError(f"request field {self.user_id_path!r} (user id) is missing")
        text = get_path(document, self.text_path)
        if text is not None and not isinstance(text, str):
            raise CodecError(f"request field {self.text_path!r} (text) must be a string")
        attributes = {}
        for name, path in self.attribute_paths.items():
            value = _optional_str(get_path(document, path))
            if value is not None:
                attributes[name] = value
        return ChatRequest(
            user_id=user_id,
            text=text,
            conversation_id=_optional_str(get_path(document, self.conversation_id_path)),
            channel=_optional_str(get_path(document, self.channel_path)),
            message_id=_optional_str(get_path(document, self.message_id_path)),
            attributes=attributes,
        )

    def decode_response(self, body: bytes, request: ChatRequest) -> list[ChatReply]:
        document = _load_json(body)
        replies = get_path(document, self.replies_path) if self.replies_path else document
        if replies is None:
            return []
        if isinstance(replies, dict):
            replies = [replies]
        if not isinstance(replies, list):
            raise CodecError(
                f"response field {self.replies_path or '(body)'!r} must be a list or object"
            )
        return [self._reply(item) for item in replies if isinstance(item, dict)]

    def _reply(self, item: Mapping[str, Any]) -> ChatReply:
        return ChatReply(
            text=_optional_str(get_path(item, self.reply_text_path)),
            intent=_optional_str(get_path(item, self.reply_intent_path)),
            resolved=_optional_bool(get_path(item, self.reply_resolved_path)),
            handed_off=_optional_bool(get_path(item, self.reply_handed_off_path)),
            ended=_optional_bool(get_path(item, self.reply_ended_path)),
            step=_optional_str(get_path(item, self.reply_step_path)),
        )

    def encode_request(self, request: ChatRequest) -> bytes:
        document: dict[str, Any] = {}
        _set_path(document, self.user_id_path, request.user_id)
        _set_path(document, self.text_path, request.text)
        if self.conversation_id_path and request.conversation_id is not None:
            _set_path(document, self.conversation_id_path, request.conversation_id)
        if self.message_id_path and request.message_id is not None:
            _set_path(document, self.message_id_path, request.message_id)
        return json.dumps(document, ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class RasaCodec:
    """The Rasa REST channel: ``{"sender", "message"}`` in, ``[{"recipient_id", "text"}]`` out.

    Replies without text (images, buttons only) are recorded with ``text`` set to ``None``
    and the other fields kept in ``extra``.
    """

    def decode_request(self, body: bytes) -> ChatRequest | None:
        document = _load_json(body)
        if not isinstance(document, dict):
            raise CodecError("request body must be a JSON object with 'sender' and 'message'")
        sender = _optional_str(document.get("sender"))
        if sender is None:
            raise CodecError("request field 'sender' is missing")
        message = document.get("message")
        if message is not None and not isinstance(message, str):
            raise CodecError("request field 'message' must be a string")
        metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
        return ChatRequest(
            user_id=sender,
            text=message,
            conversation_id=_optional_str(metadata.get("conversation_id")),
            channel=_optional_str(metadata.get("channel")),
        )

    def decode_response(self, body: bytes, request: ChatRequest) -> list[ChatReply]:
        document = _load_json(body)
        if not isinstance(document, list):
            raise CodecError("response body must be a JSON list of bot messages")
        replies = []
        for item in document:
            if not isinstance(item, dict):
                continue
            extra = {k: v for k, v in item.items() if k not in ("recipient_id", "text")}
            replies.append(ChatReply(text=_optional_str(item.get("text")), extra=extra))
        return replies

    def encode_request(self, request: ChatRequest) -> bytes:
        document: dict[str, Any] = {"sender": request.user_id, "message": request.text or ""}
        return json.dumps(document, ensure_ascii=False).encode()


def decode_replies(codec: Codec, body: bytes, request: ChatRequest) -> Sequence[ChatReply]:
    """Decode replies, returning an empty list for a body the codec cannot read."""
    try:
        return codec.decode_response(body, request)
    except CodecError:
        return []
