"""Facebook Messenger: webhook events to chatmw events, Send API calls to bot messages.

Webhook bodies have ``"object": "page"`` and one ``entry`` per page, each with a list of
``messaging`` items (``standby`` when another app owns the thread, ``changes`` in the App
Dashboard's test deliveries). Each item has ``sender``, ``recipient``, ``timestamp``
(integer milliseconds) and one event field: ``message`` (``is_echo`` for the page's own
messages), ``postback``, ``referral``, ``delivery``, ``read``, ``reaction`` or ``optin``.
The same parser reads Instagram messaging webhooks (``"object": "instagram"``).

Send API: ``POST /{version}/me/messages`` (or ``/{page-id}/messages``) with ``recipient``
and ``message``; Meta returns ``{"recipient_id", "message_id"}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.adapters._meta import (
    MetaSettings,
    Submit,
    as_dict,
    as_list,
    as_str,
    fit_touch,
    send_and_record,
    stable_key,
    time_from_epoch,
)
from chatmw.outbound import OutboundMessage, SendResult
from chatmw.store import models
from chatmw.store.identity import insert_ignore
from chatmw.store.writer import STATUS_RANK, Writer, refresh_statuses

__all__ = [
    "CHANNEL",
    "Watermark",
    "parse_webhook",
    "parse_item",
    "decode_send_request",
    "events_from_send",
    "write_watermarks",
    "register_handlers",
    "register_sink_handlers",
    "drop_recorded_echoes",
    "build_send_request",
    "sender_from_env",
    "MessengerSender",
]

CHANNEL = "messenger"
logger = logging.getLogger("chatmw")

# Item fields that carry the event; the first one present names the kind.
_KINDS = ("message", "postback", "referral", "delivery", "read", "reaction", "optin")


@dataclass(frozen=True, slots=True, kw_only=True)
class Watermark(ev.Event):
    """Every outbound message to ``user_id`` sent at or before ``watermark`` reached ``status``.

    Messenger reports reads, and deliveries without message ids, this way.
    """

    user_id: str
    status: str
    watermark: datetime


# Webhooks


def parse_webhook(
    document: Mapping[str, Any],
    received_at: datetime,
    channel: str = CHANNEL,
    agent_app_ids: frozenset[str] = frozenset(),
) -> list[ev.Event]:
    """Translate a ``page`` (or ``instagram``) webhook body into events.

    Items of unknown kinds become :class:`~chatmw.events.RawPayload` events with source
    ``<channel>_unknown``, so they are kept and counted. Echoes sent by an app in
    ``agent_app_ids`` (a help desk, the page inbox) are recorded as agent messages.
    """
    found: list[ev.Event] = []
    for entry in as_list(document.get("entry")):
        entry = as_dict(entry)
        page_id = as_str(entry.get("id"))
        entry_time = time_from_epoch(entry.get("time"), received_at)
        for item in as_list(entry.get("messaging")):
            found.extend(parse_item(as_dict(item), page_id, entry_time, channel, agent_app_ids))
        for item in as_list(entry.get("standby")):
            found.extend(
                parse_item(as_dict(item), page_id, entry_time, channel, agent_app_ids, standby=True)
            )
        for change in as_list(entry.get("changes")):
            value = as_dict(as_dict(change).get("value"))
            found.extend(parse_item(value, page_id, entry_time, channel, agent_app_ids))
    return found


def parse_item(
    item: Mapping[str, Any],
    page_id: str | None,
    fallback: datetime,
    channel: str = CHANNEL,
    agent_app_ids: frozenset[str] = frozenset(),
    standby: bool = False,
) -> list[ev.Event]:
    """Translate one ``messaging`` item into events."""
    at = time_from_epoch(item.get("timestamp"), fallback)
    kind = next((name for name in _KINDS if isinstance(item.get(name), dict)), None)
    sender = _party(item.get("sender"))
    if kind is None or sender is None:
        return [_unknown(item, channel, at, kind or _first_key(item))]
    context = _Context(
        channel=channel,
        page_id=page_id,
        at=at,
        standby=standby,
        sender=sender,
        recipient=_party(item.get("recipient")),
        agent_app_ids=agent_app_ids,
    )
    body = item[kind]
    if kind == "message":
        return _message(context, body)
    if kind == "postback":
        return _postback(context, body)
    if kind == "referral":
        return _touches(context, body, origin="referral")
    if kind == "delivery":
        return _delivery(context, body)
    if kind == "read":
        return [_watermark(context, body, "read")]
    if kind == "reaction":
        return [_reaction(context, body)]
    return _optin(context, body)


@dataclass(frozen=True, slots=True)
class _Context:
    channel: str
    page_id: str | None
    at: datetime
    standby: bool
    sender: str
    recipient: str | None
    agent_app_ids: frozenset[str] = frozenset()

    def meta(self, **values: Any) -> dict[str, Any]:
        found = {"page_id": self.page_id, "standby": True if self.standby else None, **values}
        return {name: value for name, value in found.items() if value not in (None, [], {})}


def _party(value: Any) -> str | None:
    party = as_dict(value)
    return as_str(party.get("id")) or as_str(party.get("user_ref"))


def _first_key(item: Mapping[str, Any]) -> str:
    extra = [key for key in item if key not in ("sender", "recipient", "timestamp")]
    return extra[0] if extra else "empty"


def _unknown(item: Mapping[str, Any], channel: str, at: datetime, kind: str) -> ev.RawPayload:
    body = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
    return ev.RawPayload(
        channel=channel,
        occurred_at=at,
        source=f"{channel}_unknown",
        body=body,
        reason=f"unknown {channel} event kind {kind!r}",
    )


def _message(context: _Context, message: Mapping[str, Any]) -> list[ev.Event]:
    mid = as_str(message.get("mid"))
    echo = message.get("is_echo") is True
    user_id = context.recipient if echo else context.sender
    if mid is None or user_id is None:
        return [
            _unknown({"message": dict(message)}, context.channel, context.at, "message without mid")
        ]
    attachments = [as_dict(item) for item in as_list(message.get("attachments"))]
    meta = context.meta(
        quick_reply_payload=as_dict(message.get("quick_reply")).get("payload"),
        attachments=[as_str(item.get("type")) for item in attachments] or None,
        app_id=as_str(message.get("app_id")) if echo else None,
        metadata=message.get("metadata") if echo else None,
        echo=True if echo else None,
    )
    role: ev.Role = "user"
    if echo:
        # An echo is the page's own message: sent by an app (a bot), by an app through
        # which people reply (agent_app_ids), or without app_id (a person on the page).
        app_id = as_str(message.get("app_id"))
        role = "agent" if app_id is None or app_id in context.agent_app_ids else "bot"
    found: list[ev.Event] = [
        ev.Message(
            channel=context.channel,
            occurred_at=context.at,
            key=f"{context.channel}:{mid}",
            role=role,
            user_id=user_id,
            text=as_str(message.get("text")),
            platform_message_id=mid,
            reply_to=as_str(as_dict(message.get("reply_to")).get("mid")),
            meta=meta,
        )
    ]
    if not echo and isinstance(message.get("referral"), dict):
        found.extend(_touches(context, message["referral"], origin="message"))
    return found


def _postback(context: _Context, postback: Mapping[str, Any]) -> list[ev.Event]:
    user_id = context.sender
    payload = as_str(postback.get("payload"))
    mid = as_str(postback.get("mid"))
    key = (
        f"{context.channel}:{mid}"
        if mid
        else stable_key(f"{context.channel}:postback", user_id, context.at.timestamp(), payload)
    )
    found: list[ev.Event] = [
        ev.Message(
            channel=context.channel,
            occurred_at=context.at,
            key=key,
            role="user",
            user_id=user_id,
            kind="postback",
            text=as_str(postback.get("title")) or payload,
            platform_message_id=mid,
            meta=context.meta(postback_payload=payload),
        )
    ]
    if isinstance(postback.get("referral"), dict):
        # The Get Started button carries the referral that opened the thread.
        found.extend(_touches(context, postback["referral"], origin="postback"))
    return found


def _touches(context: _Context, referral: Mapping[str, Any], origin: str) -> list[ev.Event]:
    user_id = context.sender
    ref = as_str(referral.get("ref"))
    ad_id = as_str(referral.get("ad_id"))
    source = as_str(referral.get("source"))
    ads_context = as_dict(referral.get("ads_context_data"))
    meta = {
        name: value
        for name, value in {
            "type": as_str(referral.get("type")),
            "origin": origin,
            **ads_context,
            "product_id": as_str(referral.get("product", {}).get("id"))
            if isinstance(referral.get("product"), dict)
            else None,
        }.items()
        if value not in (None, "")
    }
    key = stable_key(
        f"{context.channel}:touch", user_id, context.at.timestamp(), source, ref, ad_id
    )
    # The medium is how the user came: an ad, or a link, plugin or code (a referral).
    kind = "ad" if ad_id or source == "ADS" else "referral"
    return [
        fit_touch(
            ev.Touch(
                channel=context.channel,
                occurred_at=context.at,
                key=key,
                user_id=user_id,
                kind=kind,
                source=source,
                medium=kind,
                campaign=ref,
                ref=ref,
                ad_id=ad_id,
                referrer=as_str(referral.get("referer_uri")),
                meta=meta,
            )
        )
    ]


def _delivery(context: _Context, delivery: Mapping[str, Any]) -> list[ev.Event]:
    # Each status keeps the time of the event that reported it (Meta's item timestamp, or
    # the entry time when the item has none).
    found: list[ev.Event] = [
        ev.Status(
            channel=context.channel,
            occurred_at=context.at,
            platform_message_id=str(mid),
            status="delivered",
            user_id=context.sender,
        )
        for mid in as_list(delivery.get("mids"))
        if as_str(mid)
    ]
    if delivery.get("watermark") is not None:
        found.append(_watermark(context, delivery, "delivered"))
    return found


def _watermark(context: _Context, body: Mapping[str, Any], status: str) -> ev.Event:
    watermark = time_from_epoch(body.get("watermark"), context.at)
    return Watermark(
        channel=context.channel,
        occurred_at=context.at,
        user_id=context.sender,
        status=status,
        watermark=watermark,
    )


def _reaction(context: _Context, reaction: Mapping[str, Any]) -> ev.Message:
    user_id = context.sender
    target = as_str(reaction.get("mid"))
    action = as_str(reaction.get("action")) or "react"
    emoji = as_str(reaction.get("emoji"))
    # A reaction has no id of its own: the key combines the user, the target and the time.
    key = stable_key(f"{context.channel}:reaction", user_id, target, action, context.at.timestamp())
    return ev.Message(
        channel=context.channel,
        occurred_at=context.at,
        key=key,
        role="user",
        user_id=user_id,
        kind="reaction",
        text=emoji if action == "react" else None,
        reply_to=target,
        meta=context.meta(action=action, reaction=as_str(reaction.get("reaction"))),
    )


def _optin(context: _Context, optin: Mapping[str, Any]) -> list[ev.Event]:
    ref = as_str(optin.get("ref"))
    if ref is None:
        return [_unknown({"optin": dict(optin)}, context.channel, context.at, "optin without ref")]
    user_id = context.sender
    key = stable_key(f"{context.channel}:touch", user_id, context.at.timestamp(), "OPTIN", ref)
    return [
        fit_touch(
            ev.Touch(
                channel=context.channel,
                occurred_at=context.at,
                key=key,
                user_id=user_id,
                kind="optin",
                source="OPTIN",
                campaign=ref,
                ref=ref,
                meta={"type": as_str(optin.get("type"))} if optin.get("type") else {},
            )
        )
    ]


# Delivery and read watermarks


def write_watermarks(session: Session, items: list[Watermark]) -> None:
    """Store a status for every outbound message at or before each watermark.

    Each status keeps the time of the event that reported it. Only messages whose current
    status is behind the reported one are touched, so a long history is not rewritten on
    every read, and a message's status only moves forward.
    """
    message, contact = models.Message, models.Contact
    touched: list[tuple[str, str]] = []
    for item in items:
        rank = STATUS_RANK.get(item.status, 0)
        behind = [name for name, other in STATUS_RANK.items() if other < rank]
        rows: Sequence[str] = (
            session.execute(
                select(message.platform_message_id)
                .join(contact, contact.id == message.contact_id)
                .where(
                    contact.channel == item.channel,
                    contact.external_id == item.user_id,
                    message.channel == item.channel,
                    message.role != "user",
                    message.platform_message_id.is_not(None),
                    message.occurred_at_ms <= ev.to_ms(item.watermark),
                    or_(message.status.is_(None), message.status.in_(behind)),
                )
            )
            .scalars()
            .all()
        )
        status_rows = [
            {
                "channel": item.channel,
                "platform_message_id": platform_id,
                "status": item.status,
                "occurred_at_ms": ev.to_ms(item.occurred_at),
                "error_code": None,
                "error_title": None,
            }
            for platform_id in rows
        ]
        insert_ignore(
            session,
            models.MessageStatus.__table__,
            status_rows,
            ["channel", "platform_message_id", "status"],
        )
        touched.extend((item.channel, platform_id) for platform_id in rows)
    if touched:
        refresh_statuses(session, touched)


def drop_recorded_echoes(session: Session, messages: list[ev.Message]) -> list[ev.Message]:
    """Drop echoes of messages already stored, or recorded in the same batch.

    The survey dispatcher stores a prompt with its own key and Meta's message id. The echo
    of that prompt carries the same id, so it would otherwise count as a second bot message.
    """
    echoes = {
        (item.channel, item.platform_message_id)
        for item in messages
        if item.meta.get("echo") and item.platform_message_id
    }
    if not echoes:
        return messages
    message = models.Message
    known: set[tuple[str, str | None]] = set()
    for channel in {channel for channel, _ in echoes}:
        ids = [platform_id for other, platform_id in echoes if other == channel]
        rows = session.execute(
            select(message.platform_message_id).where(
                message.channel == channel, message.platform_message_id.in_(ids)
            )
        )
        known.update((channel, platform_id) for platform_id in rows.scalars())
    # Within the batch, a message recorded from the send itself wins over its echo.
    for item in messages:
        if not item.meta.get("echo") and item.platform_message_id:
            known.add((item.channel, item.platform_message_id))
    return [
        item
        for item in messages
        if not (item.meta.get("echo") and (item.channel, item.platform_message_id) in known)
    ]


def register_handlers(writer: Writer) -> None:
    """Teach ``writer`` to store :class:`Watermark` events and to drop duplicate echoes.

    Idempotent: registering twice changes nothing.
    """
    writer.handlers.setdefault(Watermark, write_watermarks)
    if drop_recorded_echoes not in writer.preprocessors:
        writer.preprocessors.append(drop_recorded_echoes)


def register_sink_handlers(sink: object) -> None:
    """Register the handlers on the writer behind ``sink`` when it is a recorder.

    A writer without the :class:`Watermark` handler would reject every batch holding one.
    """
    writer = getattr(sink, "writer", None)
    # A writer process copies its local writer: register there, then let it copy again.
    local = getattr(writer, "local_writer", None)
    if isinstance(local, Writer):
        register_handlers(local)
        writer.refresh()  # type: ignore[union-attr]
    elif isinstance(writer, Writer):
        register_handlers(writer)
    else:
        logger.warning(
            "event sink has no chatmw writer: register Messenger handlers on the "
            "writer that stores its events (chatmw.adapters.messenger.register_handlers)"
        )


# Send API


def decode_send_request(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    """Read a Send API request body (JSON or form-encoded); ``None`` when it is neither."""
    if content_type and "application/x-www-form-urlencoded" in content_type:
        try:
            fields = parse_qs(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            return None
        document: dict[str, Any] = {}
        for name, values in fields.items():
            try:
                document[name] = json.loads(values[-1])
            except json.JSONDecodeError:
                document[name] = values[-1]
        return document
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def events_from_send(
    request: Mapping[str, Any],
    response: Mapping[str, Any],
    sent_at: datetime,
    channel: str = CHANNEL,
    kind: str = "message",
    meta: Mapping[str, Any] | None = None,
) -> list[ev.Event]:
    """Return the bot message of a successful Send API call (nothing for sender actions).

    The ``message_id`` Meta returned becomes the platform message id, so delivery and read
    events and the echo of the same message link to this row.
    """
    message_id = as_str(response.get("message_id"))
    message = as_dict(request.get("message"))
    user_id = as_str(response.get("recipient_id")) or _party(request.get("recipient"))
    if message_id is None or not message or user_id is None:
        return []
    attachment = as_dict(message.get("attachment"))
    details = {
        "messaging_type": as_str(request.get("messaging_type")),
        "tag": as_str(request.get("tag")),
        "quick_replies": len(as_list(message.get("quick_replies"))) or None,
        "attachment_type": as_str(attachment.get("type")),
        "template_type": as_str(as_dict(attachment.get("payload")).get("template_type")),
        **(meta or {}),
    }
    return [
        ev.Message(
            channel=channel,
            occurred_at=sent_at,
            key=f"{channel}:{message_id}",
            role="bot",
            user_id=user_id,
            text=as_str(message.get("text")),
            platform_message_id=message_id,
            kind=kind,
            meta={name: value for name, value in details.items() if value is not None},
        )
    ]


def build_send_request(
    message: OutboundMessage, messaging_type: str = "RESPONSE", tag: str | None = None
) -> dict[str, Any]:
    """Return the Send API body for ``message``; list rows become quick replies."""
    choices = [(item.title, item.payload) for item in message.quick_replies]
    choices += [(item.title, item.payload) for item in message.list_rows]
    content: dict[str, Any] = {"text": message.text}
    if choices:
        content["quick_replies"] = [
            {"content_type": "text", "title": title, "payload": payload}
            for title, payload in choices
        ]
    body: dict[str, Any] = {
        "recipient": {"id": message.user_id},
        "messaging_type": messaging_type,
        "message": content,
    }
    if tag is not None:
        body["tag"] = tag
    return body


class MessengerSender:
    """Sends text and quick replies through the Send API and records each sent message.

    ``submit`` is usually ``runtime.recorder.submit``. ``messaging_type`` is ``RESPONSE``
    inside the 24-hour window; outside it Meta requires ``MESSAGE_TAG`` with a ``tag``.
    """

    channel = CHANNEL

    def __init__(
        self,
        settings: MetaSettings,
        submit: Submit | None = None,
        client: httpx.AsyncClient | None = None,
        messaging_type: str = "RESPONSE",
        tag: str | None = None,
    ) -> None:
        if not settings.page_access_token:
            raise ValueError("page_access_token must be set to send Messenger messages")
        self.settings = settings
        self.submit = submit
        # Without submit, the caller records what was sent (the survey dispatcher does).
        self.records_sends = submit is not None
        self.messaging_type = messaging_type
        self.tag = tag
        self._client = client

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send ``message``; network and platform errors come back as a failed result."""
        if message.template is not None:
            return SendResult(
                ok=False, error="Messenger has no message templates: send text", retryable=False
            )
        if len(message.quick_replies) + len(message.list_rows) > 13:
            return SendResult(
                ok=False, error="Messenger allows at most 13 quick replies", retryable=False
            )
        body = build_send_request(message, self.messaging_type, self.tag)
        result, _, document = await send_and_record(
            self._client,
            self.settings,
            self.settings.graph_url("me/messages"),
            self.settings.page_access_token or "",
            body,
            events_from_send,
            message,
            self.submit,
            "messenger",
        )
        if not result.ok:
            return result
        return SendResult(ok=True, platform_message_id=as_str(document.get("message_id")))


def sender_from_env() -> MessengerSender:
    """Build a sender from the ``CHATMW_*`` environment, for ``[dispatcher.outbound]``.

    It does not record its sends: the survey dispatcher records each prompt itself.
    """
    return MessengerSender(MetaSettings.from_env())
