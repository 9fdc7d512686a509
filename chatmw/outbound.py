"""The outbound interface: how the core sends a message through a platform.

Surveys and other proactive features build an :class:`OutboundMessage` and hand it to the
channel's :class:`OutboundChannel`. Each platform adapter implements the protocol
(``chatmw.adapters.messenger.MessengerSender``, ``chatmw.adapters.whatsapp.WhatsAppSender``)
and records every successful send as a bot message, so the core never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["OutboundMessage", "QuickReply", "ListRow", "Template", "SendResult", "OutboundChannel"]


@dataclass(frozen=True, slots=True)
class QuickReply:
    """A choice shown under the message (a Messenger quick reply, a WhatsApp reply button).

    ``payload`` comes back in the user's reply; ``title`` is what the user sees.
    """

    title: str
    payload: str


@dataclass(frozen=True, slots=True)
class ListRow:
    """A row of a list message (WhatsApp interactive list); ``payload`` is the row id."""

    title: str
    payload: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Template:
    """A pre-approved template (WhatsApp message templates outside the 24-hour window).

    ``components`` is passed to the platform as given (header, body and button parameters).
    """

    name: str
    language: str
    components: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message to send.

    ``user_id`` is the platform's id of the recipient (a Messenger PSID, a WhatsApp phone
    number or business-scoped user id). Give ``text`` with optional ``quick_replies`` or
    ``list_rows`` (with ``list_button``, the label of the button that opens the list), or a
    ``template``. ``meta`` is stored with the recorded bot message (for example a survey id).
    """

    channel: str
    user_id: str
    text: str | None = None
    quick_replies: Sequence[QuickReply] = ()
    list_rows: Sequence[ListRow] = ()
    list_button: str = "Choose"
    template: Template | None = None
    kind: str = "message"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("user_id must not be empty")
        if self.text is None and self.template is None:
            raise ValueError("an outbound message needs text or a template")
        if self.quick_replies and self.list_rows:
            raise ValueError("give quick_replies or list_rows, not both")


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one send.

    ``platform_message_id`` is the platform's id of the sent message when it was accepted.
    ``retryable`` is whether the same send may succeed later (network errors, HTTP 5xx
    and 429, platform throttling); it is ``False`` for a successful send.
    """

    ok: bool
    platform_message_id: str | None = None
    error: str | None = None
    retryable: bool = False


class OutboundChannel(Protocol):
    """Sends messages through one platform."""

    channel: str

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send ``message``; never raises for platform or network errors."""
        ...
