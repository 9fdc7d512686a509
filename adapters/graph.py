"""Graph API sends: recognise a send call and record the message it created.

The proxy's pass-through and the httpx hooks both see a bot's Graph API call as a
request and Meta's response; :func:`record_send` turns a successful Messenger Send API or
WhatsApp Cloud API message call into a bot message. It never raises.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from chatmw import events as ev
from chatmw.adapters import messenger, whatsapp
from chatmw.adapters._meta import Submit, WebhookStats, as_dict, submit_all

__all__ = ["SEND_PATH", "is_send", "record_send", "events_from_exchange", "send_channel"]

logger = logging.getLogger("chatmw")

# ``/{version}/me/messages``, ``/{version}/{page-id}/messages`` and
# ``/{version}/{phone-number-id}/messages``; the version is optional in Graph API paths.
SEND_PATH = re.compile(r"^/(?:v\d+(?:\.\d+)?/)?(?P<node>[^/]+)/messages/?$")


def is_send(method: str, path: str) -> bool:
    """Return whether a Graph API call is a message send (Messenger or WhatsApp)."""
    return method.upper() == "POST" and SEND_PATH.match(path) is not None


def events_from_exchange(
    request_body: bytes,
    content_type: str | None,
    status_code: int,
    response_body: bytes,
    sent_at: datetime,
    channel: str = messenger.CHANNEL,
) -> list[ev.Event]:
    """Return the bot message created by a send call, or nothing when it failed or sent none.

    A body with ``messaging_product: "whatsapp"`` is a WhatsApp send; any other is a Send
    API call recorded on ``channel`` (``messenger``, or ``instagram`` as
    :func:`send_channel` decides).
    """
    if not 200 <= status_code < 300:
        return []
    request = messenger.decode_send_request(request_body, content_type)
    try:
        response = as_dict(json.loads(response_body))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if request is None:
        return []
    if request.get("messaging_product") == "whatsapp":
        return whatsapp.events_from_send(request, response, sent_at)
    return messenger.events_from_send(request, response, sent_at, channel=channel)


def send_channel(path: str, instagram_account_ids: frozenset[str]) -> str:
    """Return the channel of a Send API call: ``instagram`` for an Instagram account's path.

    Instagram sends have the same body as Messenger sends, so only the account id in the
    path (``/{ig-user-id}/messages``) distinguishes them.
    """
    match = SEND_PATH.match(path)
    if match is not None and match.group("node") in instagram_account_ids:
        return "instagram"
    # NOTE: A send to /me/messages with an Instagram token is recorded on messenger.
    return messenger.CHANNEL


def record_send(
    request_body: bytes,
    content_type: str | None,
    status_code: int,
    response_body: bytes,
    sent_at: datetime,
    submit: Submit | None,
    stats: WebhookStats | None = None,
    channel: str = messenger.CHANNEL,
) -> list[ev.Event]:
    """Record the bot message of a send call; counts ``sends_recorded`` and ``sends_failed``."""
    try:
        found = events_from_exchange(
            request_body, content_type, status_code, response_body, sent_at, channel
        )
    except Exception:  # noqa: BLE001 - recording must never break the bot's send
        logger.exception("recording a Graph API send failed (HTTP %d)", status_code)
        found = []
    if stats is not None:
        if status_code >= 400:
            stats.add("sends_failed")
        stats.add("sends_recorded", len(found))
    submit_all(submit, found)
    return found
