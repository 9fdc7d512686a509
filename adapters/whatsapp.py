"""WhatsApp Cloud API: webhook events to chatmw events, message sends to bot messages.

Webhook bodies have ``"object": "whatsapp_business_account"``. Each ``entry`` has
``changes`` whose ``field`` is ``messages`` and whose ``value`` contains ``metadata`` (the
business phone number), ``contacts``, ``messages``, ``statuses`` and ``errors``. A contact
has a profile, the phone number ``wa_id`` and the business-scoped ``user_id``, but either
id, the profile or the whole list may be missing. Timestamps are strings of seconds.

Sends: ``POST /{version}/{phone-number-id}/messages`` with ``messaging_product:
"whatsapp"`` and ``to``; Meta returns ``{"messages": [{"id": "wamid..."}]}``. The same
endpoint marks messages read (``"status": "read"``), which is not a message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx

from chatmw import events as ev
from chatmw.adapters._meta import (
    MetaSettings,
    Submit,
    as_dict,
    as_list,
    as_str,
    fit_touch,
    send_and_record,
    time_from_epoch,
)
from chatmw.outbound import OutboundMessage, SendResult

__all__ = [
    "CHANNEL",
    "parse_webhook",
    "parse_value",
    "events_from_send",
    "build_send_request",
    "WhatsAppSender",
    "sender_from_env",
]

CHANNEL = "whatsapp"
logger = logging.getLogger("chatmw")

# Message types whose content sits in an object of the same name with an optional caption.
_MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})


# Webhooks


def parse_webhook(document: Mapping[str, Any], received_at: datetime) -> list[ev.Event]:
    """Translate a ``whatsapp_business_account`` webhook body into events.

    Changes of other fields (template or account updates), system messages and top-level
    errors become :class:`~chatmw.events.RawPayload` events, kept for inspection.
    """
    found: list[ev.Event] = []
    for entry in as_list(document.get("entry")):
        for change in as_list(as_dict(entry).get("changes")):
            change = as_dict(change)
            value = as_dict(change.get("value"))
            if change.get("field") != "messages":
                found.append(
                    _raw(
                        value or change,
                        received_at,
                        "whatsapp_unknown",
                        f"unknown whatsapp change field {change.get('field')!r}",
                    )
                )
                continue
            found.extend(parse_value(value, received_at))
    return found


def parse_value(value: Mapping[str, Any], received_at: datetime) -> list[ev.Event]:
    """Translate the ``value`` of one ``messages`` change into events."""
    metadata = as_dict(value.get("metadata"))
    phone_number_id = as_str(metadata.get("phone_number_id"))
    contacts = [as_dict(item) for item in as_list(value.get("contacts"))]
    found: list[ev.Event] = []
    for message in as_list(value.get("messages")):
        found.extend(_message(as_dict(message), contacts, phone_number_id, received_at))
    for status in as_list(value.get("statuses")):
        found.append(_status(as_dict(status), received_at))
    if as_list(value.get("errors")):
        codes = ", ".join(str(as_dict(error).get("code")) for error in value["errors"])
        logger.warning("whatsapp webhook reported errors: codes %s", codes)
        found.append(_raw(value, received_at, "whatsapp_error", f"whatsapp errors {codes}"))
    return found


def _raw(document: Mapping[str, Any], at: datetime, source: str, reason: str) -> ev.RawPayload:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return ev.RawPayload(channel=CHANNEL, occurred_at=at, source=source, body=body, reason=reason)


def _sender(message: Mapping[str, Any], contacts: list[dict[str, Any]]) -> str | None:
    # The phone number (wa_id) identifies a user while Meta still shares it, because the
    # bot's sends address that number. A username-only user has just the business-scoped id.
    direct = as_str(message.get("from")) or as_str(message.get("from_user_id"))
    if direct is not None:
        return direct
    if len(contacts) == 1:
        return as_str(contacts[0].get("wa_id")) or as_str(contacts[0].get("user_id"))
    return None


def _message(
    message: Mapping[str, Any],
    contacts: list[dict[str, Any]],
    phone_number_id: str | None,
    received_at: datetime,
) -> list[ev.Event]:
    wamid = as_str(message.get("id"))
    user_id = _sender(message, contacts)
    at = time_from_epoch(message.get("timestamp"), received_at)
    kind_name = as_str(message.get("type")) or "unknown"
    if wamid is None or user_id is None:
        return [_raw(message, at, "whatsapp_unknown", "whatsapp message without id or sender")]
    if kind_name == "system":
        system = as_dict(message.get("system"))
        return [
            _raw(
                message,
                at,
                "whatsapp_system",
                f"whatsapp system event {as_str(system.get('type')) or 'unknown'}",
            )
        ]

    text, details = _content(kind_name, message)
    context = as_dict(message.get("context"))
    errors = [as_dict(error) for error in as_list(message.get("errors"))]
    meta = {
        "type": kind_name,
        "phone_number_id": phone_number_id,
        **details,
        "forwarded": True
        if context.get("forwarded") or context.get("frequently_forwarded")
        else None,
        "errors": [{"code": error.get("code"), "title": error.get("title")} for error in errors]
        or None,
    }
    reply_to = as_str(context.get("id"))
    if kind_name == "reaction":
        reply_to = as_str(as_dict(message.get("reaction")).get("message_id"))
    found: list[ev.Event] = [
        ev.Message(
            channel=CHANNEL,
            occurred_at=at,
            key=f"{CHANNEL}:{wamid}",
            role="user",
            user_id=user_id,
            kind="reaction" if kind_name == "reaction" else "message",
            text=text,
            platform_message_id=wamid,
            reply_to=reply_to,
            meta={name: value for name, value in meta.items() if value is not None},
        )
    ]
    referral = message.get("referral")
    if isinstance(referral, dict):
        found.append(_touch(referral, user_id, wamid, at))
    return found


def _content(kind_name: str, message: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    body = as_dict(message.get(kind_name))
    if kind_name == "text":
        return as_str(body.get("body")), {}
    if kind_name == "interactive":
        reply_type = as_str(body.get("type"))
        reply = as_dict(body.get(reply_type or ""))
        return as_str(reply.get("title")), {
            "interactive_type": reply_type,
            "reply_id": as_str(reply.get("id")),
        }
    if kind_name == "button":
        return as_str(body.get("text")), {"button_payload": as_str(body.get("payload"))}
    if kind_name in _MEDIA_TYPES:
        return as_str(body.get("caption")), {"mime_type": as_str(body.get("mime_type"))}
    if kind_name == "reaction":
        return as_str(body.get("emoji")), {}
    if kind_name == "contacts":
        return None, {"contacts": len(as_list(message.get("contacts")))}
    if kind_name == "location":
        return as_str(body.get("name")), {}
    return None, {}


def _touch(referral: Mapping[str, Any], user_id: str, wamid: str, at: datetime) -> ev.Touch:
    # Click-to-WhatsApp ads and posts: the ad or post id, its URL and Meta's click id. A
    # post id is kept in meta only, so that ad groupings hold ad ids alone.
    source_type = as_str(referral.get("source_type"))
    source_id = as_str(referral.get("source_id"))
    fields = (
        "source_id",
        "headline",
        "body",
        "media_type",
        "image_url",
        "video_url",
        "thumbnail_url",
    )
    meta = {name: as_str(referral.get(name)) for name in fields}
    return fit_touch(
        ev.Touch(
            channel=CHANNEL,
            occurred_at=at,
            key=f"{CHANNEL}:touch:{wamid}",
            user_id=user_id,
            kind=source_type or "referral",
            source=source_type,
            medium="ad" if source_type == "ad" else "referral",
            ad_id=source_id if source_type == "ad" else None,
            click_id=as_str(referral.get("ctwa_clid")),
            landing_url=as_str(referral.get("source_url")),
            meta={name: value for name, value in meta.items() if value is not None},
        )
    )


def _status(status: Mapping[str, Any], received_at: datetime) -> ev.Event:
    wamid = as_str(status.get("id"))
    name = as_str(status.get("status"))
    at = time_from_epoch(status.get("timestamp"), received_at)
    if wamid is None or name is None:
        return _raw(status, at, "whatsapp_unknown", "whatsapp status without id or status")
    error = as_dict(as_list(status.get("errors"))[0]) if as_list(status.get("errors")) else {}
    return ev.Status(
        channel=CHANNEL,
        occurred_at=at,
        platform_message_id=wamid,
        status=name,
        user_id=as_str(status.get("recipient_id")) or as_str(status.get("recipient_user_id")),
        error_code=as_str(error.get("code")),
        error_title=as_str(error.get("title")),
    )


# Sends


def events_from_send(
    request: Mapping[str, Any],
    response: Mapping[str, Any],
    sent_at: datetime,
    kind: str = "message",
    meta: Mapping[str, Any] | None = None,
) -> list[ev.Event]:
    """Return the bot message of a successful send (nothing for read receipts).

    ``messages[0].id`` of Meta's response becomes the platform message id, so statuses link
    to this row. The user is the ``wa_id`` Meta resolved, or ``to`` as the bot wrote it.
    """
    wamid = (
        as_str(as_dict(as_list(response.get("messages"))[0]).get("id"))
        if as_list(response.get("messages"))
        else None
    )
    if wamid is None or "status" in request:
        return []
    resolved = (
        as_dict(as_list(response.get("contacts"))[0]) if as_list(response.get("contacts")) else {}
    )
    user_id = (
        as_str(resolved.get("wa_id"))
        or as_str(request.get("to"))
        or as_str(request.get("recipient"))
    )
    if user_id is None:
        return []
    type_name = as_str(request.get("type")) or "text"
    text, details = _sent_content(type_name, request)
    merged = {"type": type_name, **details, **(meta or {})}
    return [
        ev.Message(
            channel=CHANNEL,
            occurred_at=sent_at,
            key=f"{CHANNEL}:{wamid}",
            role="bot",
            user_id=user_id,
            kind=kind,
            text=text,
            platform_message_id=wamid,
            reply_to=as_str(as_dict(request.get("context")).get("message_id")),
            meta={name: value for name, value in merged.items() if value is not None},
        )
    ]


def _sent_content(type_name: str, request: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    body = as_dict(request.get(type_name))
    if type_name == "text":
        return as_str(body.get("body")), {}
    if type_name == "interactive":
        return as_str(as_dict(body.get("body")).get("text")), {
            "interactive_type": as_str(body.get("type"))
        }
    if type_name == "template":
        return None, {
            "template": as_str(body.get("name")),
            "language": as_str(as_dict(body.get("language")).get("code")),
        }
    if type_name in _MEDIA_TYPES:
        return as_str(body.get("caption")), {}
    return None, {}


def build_send_request(message: OutboundMessage) -> dict[str, Any]:
    """Return the Cloud API body for ``message``.

    Up to three quick replies become reply buttons; more, or list rows, become a list.
    """
    base: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.user_id,
    }
    if message.template is not None:
        template: dict[str, Any] = {
            "name": message.template.name,
            "language": {"code": message.template.language},
        }
        if message.template.components:
            template["components"] = [dict(item) for item in message.template.components]
        return {**base, "type": "template", "template": template}
    rows = [(item.title, item.payload, item.description) for item in message.list_rows]
    if not rows and len(message.quick_replies) > 3:
        rows = [(item.title, item.payload, None) for item in message.quick_replies]
    if rows:
        list_rows = [
            {"id": payload, "title": title, **({"description": text} if text else {})}
            for title, payload, text in rows
        ]
        interactive = {
            "type": "list",
            "body": {"text": message.text},
            "action": {"button": message.list_button, "sections": [{"rows": list_rows}]},
        }
        return {**base, "type": "interactive", "interactive": interactive}
    if message.quick_replies:
        buttons = [
            {"type": "reply", "reply": {"id": item.payload, "title": item.title}}
            for item in message.quick_replies
        ]
        interactive = {
            "type": "button",
            "body": {"text": message.text},
            "action": {"buttons": buttons},
        }
        return {**base, "type": "interactive", "interactive": interactive}
    return {**base, "type": "text", "text": {"body": message.text, "preview_url": False}}


class WhatsAppSender:
    """Sends text, buttons, lists and templates through the Cloud API and records each send.

    ``submit`` is usually ``runtime.recorder.submit``.
    """

    channel = CHANNEL

    def __init__(
        self,
        settings: MetaSettings,
        submit: Submit | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not settings.whatsapp_access_token:
            raise ValueError("whatsapp_access_token must be set to send WhatsApp messages")
        if not settings.whatsapp_phone_number_id:
            raise ValueError("whatsapp_phone_number_id must be set to send WhatsApp messages")
        self.settings = settings
        self.submit = submit
        # Without submit, the caller records what was sent (the survey dispatcher does).
        self.records_sends = submit is not None
        self._client = client

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send ``message``; network and platform errors come back as a failed result."""
        if len(message.list_rows) > 10 or (
            not message.list_rows and len(message.quick_replies) > 10
        ):
            return SendResult(
                ok=False, error="WhatsApp lists allow at most 10 rows", retryable=False
            )
        body = build_send_request(message)
        url = self.settings.graph_url(f"{self.settings.whatsapp_phone_number_id}/messages")
        result, found, _ = await send_and_record(
            self._client,
            self.settings,
            url,
            self.settings.whatsapp_access_token or "",
            body,
            events_from_send,
            message,
            self.submit,
            "whatsapp",
        )
        if not result.ok:
            return result
        wamid = found[0].platform_message_id if found else None  # type: ignore[attr-defined]
        return SendResult(ok=True, platform_message_id=wamid)


def sender_from_env() -> WhatsAppSender:
    """Build a sender from the ``CHATMW_*`` environment, for ``[dispatcher.outbound]``.

    It does not record its sends: the survey dispatcher records each prompt itself.
    """
    return WhatsAppSender(MetaSettings.from_env())
