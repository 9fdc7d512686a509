"""The widget's wire format: request bodies parsed and checked, replies and touches built.

Every rejection is a :class:`WidgetError` with an HTTP status, a short machine-readable
``error`` code and a ``detail`` sentence for people, sent as ``{"error", "detail"}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chatmw import events as ev
from chatmw.codecs import ChatReply, load_json_body

__all__ = [
    "WidgetError",
    "MessageRequest",
    "EventRequest",
    "parse_message_request",
    "parse_event_request",
    "reply_payload",
    "touch_events",
    "ID_PATTERN",
    "EXPOSURE_KINDS",
]

# The widget makes visitor, conversation, message and event ids from 16 random bytes (22
# base64url characters). Other ids of 8 to 64 such characters are accepted too.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
EXPOSURE_KINDS = ("impression", "open")

# Attribution never blocks a message: values of the wrong type are dropped and long ones
# are cut to these widths (the widths of the touches table's columns).
_TOUCH_FIELD_CHARS = {
    "source": 255,
    "medium": 255,
    "campaign": 255,
    "term": 255,
    "content": 255,
    "gclid": 512,
    "fbclid": 512,
}
_URL_CHARS = 2048
# The query parameters kept in a stored landing URL. Others are dropped, because query
# strings can carry personal data (emails, tokens); a referrer keeps no query at all.
ATTRIBUTION_PARAMS = (
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
)
_MAX_BUTTONS = 10
_BUTTON_TITLE_CHARS = 200
# A touch time from the widget is trusted only inside this window around the server's clock.
_TOUCH_MAX_AGE = timedelta(days=400)
_TOUCH_MAX_SKEW = timedelta(minutes=5)


class WidgetError(Exception):
    """A request the endpoint rejects, with the HTTP status and the JSON error to send."""

    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class TouchData:
    """One touch as the widget captured it (first touch of the visitor or last of the session)."""

    source: str | None = None
    medium: str | None = None
    campaign: str | None = None
    term: str | None = None
    content: str | None = None
    gclid: str | None = None
    fbclid: str | None = None
    referrer: str | None = None
    landing_url: str | None = None
    at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class MessageRequest:
    """A visitor's message as the widget sends it."""

    visitor_id: str
    conversation_id: str
    message_id: str
    text: str
    display: str | None = None
    page_url: str | None = None
    touches: Mapping[str, TouchData] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventRequest:
    """A funnel event: the widget was shown (``impression``) or opened (``open``)."""

    visitor_id: str
    event_id: str
    kind: Literal["impression", "open"]
    conversation_id: str | None = None
    page_url: str | None = None


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        document = load_json_body(body)
    except ValueError as error:
        raise WidgetError(400, "invalid_json", f"request {error}") from error
    if not isinstance(document, dict):
        raise WidgetError(422, "invalid_body", "request body must be a JSON object")
    return document


def _required_id(document: Mapping[str, Any], name: str) -> str:
    value = document.get(name)
    if value is None:
        raise WidgetError(422, "invalid_id", f"{name} is missing")
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise WidgetError(
            422, "invalid_id", f"{name} must be 8 to 64 characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    return value


def _optional_text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:limit]


def _parse_touch(value: Any) -> TouchData | None:
    if not isinstance(value, Mapping):
        return None
    fields = {
        name: _optional_text(value.get(name), limit) for name, limit in _TOUCH_FIELD_CHARS.items()
    }
    at = value.get("at")
    touch = TouchData(
        **fields,
        referrer=_trimmed_url(value.get("referrer"), keep_params=()),
        landing_url=_trimmed_url(value.get("landing_url"), keep_params=ATTRIBUTION_PARAMS),
        at_ms=at if isinstance(at, int) and not isinstance(at, bool) else None,
    )
    has_campaign = any(fields.values())
    return touch if has_campaign or touch.referrer else None


def _trimmed_url(value: Any, keep_params: tuple[str, ...]) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:  # an invalid IPv6 host such as "http://[::1"
        return None
    query = urlencode(
        [(name, item) for name, item in parse_qsl(parts.query) if name in keep_params]
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))[:_URL_CHARS]


def parse_message_request(body: bytes, max_chars: int) -> MessageRequest:
    """Parse and check a ``POST /chat/messages`` body.

    Raises :class:`WidgetError`: 400 for invalid JSON, 422 for a missing or malformed
    field, 413 for a text longer than ``max_chars`` characters.
    """
    document = _load_object(body)
    visitor_id = _required_id(document, "visitor_id")
    conversation_id = _required_id(document, "conversation_id")
    message_id = _required_id(document, "message_id")
    text = document.get("text")
    if not isinstance(text, str) or not text.strip():
        raise WidgetError(422, "invalid_text", "text must be a non-empty string")
    if len(text) > max_chars:
        raise WidgetError(
            413,
            "message_too_long",
            f"message has {len(text)} characters; the maximum is {max_chars}",
        )
    attribution = document.get("attribution")
    touches: dict[str, TouchData] = {}
    if isinstance(attribution, Mapping):
        for position in ("first", "last"):
            touch = _parse_touch(attribution.get(position))
            if touch is not None:
                touches[position] = touch
    return MessageRequest(
        visitor_id=visitor_id,
        conversation_id=conversation_id,
        message_id=message_id,
        text=text,
        display=_optional_text(document.get("display"), _BUTTON_TITLE_CHARS),
        page_url=_optional_text(document.get("page_url"), _URL_CHARS),
        touches=touches,
    )


def parse_event_request(body: bytes) -> EventRequest:
    """Parse and check a ``POST /chat/events`` body; raises :class:`WidgetError`."""
    document = _load_object(body)
    visitor_id = _required_id(document, "visitor_id")
    event_id = _required_id(document, "event_id")
    kind = document.get("kind")
    if kind not in EXPOSURE_KINDS:
        raise WidgetError(422, "invalid_kind", f"kind must be one of {', '.join(EXPOSURE_KINDS)}")
    conversation_id = None
    if document.get("conversation_id") is not None:
        conversation_id = _required_id(document, "conversation_id")
    return EventRequest(
        visitor_id=visitor_id,
        event_id=event_id,
        kind=kind,
        conversation_id=conversation_id,
        page_url=_optional_text(document.get("page_url"), _URL_CHARS),
    )


def reply_payload(reply: ChatReply) -> dict[str, Any] | None:
    """Return the widget's form of a bot reply, ``{"text", "buttons"}``, or ``None`` if empty.

    Buttons come from the reply's ``extra["buttons"]``, in the Rasa REST shape: a list of
    ``{"title", "payload"}``. A button without a string title is skipped. A button without
    a payload sends its title.
    """
    buttons = []
    raw_buttons = reply.extra.get("buttons") if isinstance(reply.extra, Mapping) else None
    for item in raw_buttons if isinstance(raw_buttons, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("title"), str):
            continue
        title = item["title"][:_BUTTON_TITLE_CHARS]
        payload = item.get("payload")
        buttons.append({"title": title, "payload": payload if isinstance(payload, str) else title})
        if len(buttons) == _MAX_BUTTONS:
            break
    if not reply.text and not buttons:
        return None
    return {"text": reply.text, "buttons": buttons}


def _touch_time(at_ms: int | None, now: datetime) -> datetime:
    if at_ms is None:
        return now
    try:
        moment = ev.from_ms(at_ms)
    except (OverflowError, OSError, ValueError):
        return now
    if now - _TOUCH_MAX_AGE <= moment <= now + _TOUCH_MAX_SKEW:
        return moment
    return now


def _touch_key(channel: str, conversation_id: str, position: str, touch: TouchData) -> str:
    # The same touch sent with every message of a conversation is stored once.
    fingerprint = json.dumps(
        [
            touch.source,
            touch.medium,
            touch.campaign,
            touch.term,
            touch.content,
            touch.gclid,
            touch.fbclid,
            touch.referrer,
            touch.landing_url,
            touch.at_ms,
        ]
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    return f"{channel}:touch:{conversation_id}:{position}:{digest}"


def touch_events(request: MessageRequest, channel: str, now: datetime) -> list[ev.Touch]:
    """Build the first-touch and last-touch events that a message carries.

    The kind is ``click`` when there is a gclid or fbclid (stored as ``click_id``), ``utm``
    when there are UTM parameters, and ``referral`` when only the referrer is known.
    """
    touches = []
    for position in ("first", "last"):
        touch = request.touches.get(position)
        if touch is None:
            continue
        click_id = touch.gclid or touch.fbclid
        meta: dict[str, Any] = {"touch": position}
        if click_id:
            kind = "click"
            meta["click_id_param"] = "gclid" if touch.gclid else "fbclid"
        elif any((touch.source, touch.medium, touch.campaign, touch.term, touch.content)):
            kind = "utm"
        else:
            kind = "referral"
        touches.append(
            ev.Touch(
                channel=channel,
                occurred_at=_touch_time(touch.at_ms, now),
                key=_touch_key(channel, request.conversation_id, position, touch),
                user_id=request.visitor_id,
                conversation_id=request.conversation_id,
                kind=kind,
                source=touch.source,
                medium=touch.medium,
                campaign=touch.campaign,
                term=touch.term,
                content=touch.content,
                click_id=click_id,
                referrer=touch.referrer,
                landing_url=touch.landing_url,
                meta=meta,
            )
        )
    return touches
