"""Survey messages per channel, within each platform's documented limits.

- Web widget: one button per score (stars for CSAT, 0-10 for NPS).
- Messenger: one quick reply per score. Meta's quick replies reference allows at most 13
  quick replies, titles of 20 characters and payloads of 1000 characters:
  https://developers.facebook.com/docs/messenger-platform/reference/buttons/quick-replies
- WhatsApp: an interactive list for CSAT (5 rows). NPS has 11 scores, more than the 10 rows
  a list may hold, so it asks in two steps: three reply buttons for the ranges 0-6, 7-8 and
  9-10, then a list of the scores in the chosen range. Typed numbers are accepted at
  either step. Limits from Meta's Cloud API pages: at most 3 reply buttons with titles of
  20 characters
  (https://developers.facebook.com/docs/whatsapp/cloud-api/messages/interactive-reply-buttons-messages),
  at most 10 rows in a list with row titles of 24 characters and a list button label of 20
  characters
  (https://developers.facebook.com/documentation/business-messaging/whatsapp/messages/interactive-list-messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatmw.outbound import ListRow, OutboundMessage, QuickReply, Template
from chatmw.surveys.answers import range_payload, score_payload
from chatmw.surveys.config import SCALES, SurveyTexts, TemplateSettings

__all__ = [
    "RenderRequest",
    "render",
    "NPS_RANGES",
    "MESSENGER_QUICK_REPLIES_MAX",
    "MESSENGER_TITLE_MAX",
    "WHATSAPP_REPLY_BUTTONS_MAX",
    "WHATSAPP_BUTTON_TITLE_MAX",
    "WHATSAPP_LIST_ROWS_MAX",
    "WHATSAPP_ROW_TITLE_MAX",
    "PURPOSES",
]

MESSENGER_QUICK_REPLIES_MAX = 13
MESSENGER_TITLE_MAX = 20
MESSENGER_PAYLOAD_MAX = 1000
WHATSAPP_REPLY_BUTTONS_MAX = 3
WHATSAPP_BUTTON_TITLE_MAX = 20
WHATSAPP_BUTTON_ID_MAX = 256
WHATSAPP_LIST_ROWS_MAX = 10
WHATSAPP_ROW_TITLE_MAX = 24
WHATSAPP_ROW_ID_MAX = 200
# The first step of a two-step NPS question: detractors, passives, promoters.
NPS_RANGES = ((0, 6), (7, 8), (9, 10))
PURPOSES = ("prompt", "reask", "step2", "follow_up", "thanks")
STAR = "⭐"


@dataclass(frozen=True, slots=True)
class RenderRequest:
    """The input of one survey message: the survey, its recipient and the message's purpose.

    ``score_range`` is the NPS range chosen in the first step (for ``step2``);
    ``template`` is set when the prompt must go as a WhatsApp template.
    """

    survey_id: int
    kind: str
    channel: str
    user_id: str
    conversation_id: str
    purpose: str
    texts: SurveyTexts
    score_range: tuple[int, int] | None = None
    template: TemplateSettings | None = None


def _title(kind: str, score: int) -> str:
    return STAR * score if kind == "csat" else str(score)


def _score_choices(request: RenderRequest, low: int, high: int) -> list[tuple[str, str]]:
    return [
        (_title(request.kind, score), score_payload(request.survey_id, score))
        for score in range(low, high + 1)
    ]


def _check(
    choices: list[tuple[str, str]], count: int, title: int, payload: int, label: str
) -> None:
    # Titles and payloads are built here, so exceeding a limit is a programming error.
    if len(choices) > count:
        raise ValueError(f"{label}: {len(choices)} choices, the platform allows {count}")
    for choice_title, choice_payload in choices:
        if len(choice_title) > title or len(choice_payload) > payload:
            raise ValueError(
                f"{label}: choice {choice_title!r} exceeds the platform's length limits"
            )


def _whatsapp_message(request: RenderRequest, text: str, meta: dict[str, Any]) -> OutboundMessage:
    low, high = SCALES[request.kind]
    if request.purpose == "step2" and request.score_range is not None:
        low, high = request.score_range
    elif request.kind == "nps":
        buttons = [
            (f"{start}-{end}", range_payload(request.survey_id, start, end))
            for start, end in NPS_RANGES
        ]
        _check(
            buttons,
            WHATSAPP_REPLY_BUTTONS_MAX,
            WHATSAPP_BUTTON_TITLE_MAX,
            WHATSAPP_BUTTON_ID_MAX,
            "WhatsApp reply buttons",
        )
        return OutboundMessage(
            channel=request.channel,
            user_id=request.user_id,
            text=text,
            quick_replies=[QuickReply(t, p) for t, p in buttons],
            kind="survey_prompt",
            meta=meta,
        )
    rows = _score_choices(request, low, high)
    _check(
        rows,
        WHATSAPP_LIST_ROWS_MAX,
        WHATSAPP_ROW_TITLE_MAX,
        WHATSAPP_ROW_ID_MAX,
        "WhatsApp list rows",
    )
    return OutboundMessage(
        channel=request.channel,
        user_id=request.user_id,
        text=text,
        list_rows=[ListRow(t, p) for t, p in rows],
        list_button=request.texts.list_button,
        kind="survey_prompt",
        meta=meta,
    )


def _choices_message(request: RenderRequest, text: str, meta: dict[str, Any]) -> OutboundMessage:
    low, high = SCALES[request.kind]
    if request.purpose == "step2" and request.score_range is not None:
        low, high = request.score_range
    choices = _score_choices(request, low, high)
    if request.channel == "messenger":
        _check(
            choices,
            MESSENGER_QUICK_REPLIES_MAX,
            MESSENGER_TITLE_MAX,
            MESSENGER_PAYLOAD_MAX,
            "Messenger quick replies",
        )
    return OutboundMessage(
        channel=request.channel,
        user_id=request.user_id,
        text=text,
        quick_replies=[QuickReply(t, p) for t, p in choices],
        kind="survey_prompt",
        meta=meta,
    )


def render(request: RenderRequest) -> OutboundMessage:
    """Build the outbound message of ``request`` for its channel."""
    if request.purpose not in PURPOSES:
        raise ValueError(f"unknown survey message purpose {request.purpose!r}")
    meta = {
        "survey_id": request.survey_id,
        "purpose": request.purpose,
        "conversation_id": request.conversation_id,
    }
    if request.template is not None:
        template = Template(
            request.template.name, request.template.language, request.template.components
        )
        return OutboundMessage(
            channel=request.channel,
            user_id=request.user_id,
            template=template,
            kind="survey_prompt",
            meta=meta,
        )
    texts = request.texts
    if request.purpose in ("follow_up", "thanks"):
        text = texts.follow_up if request.purpose == "follow_up" else texts.thanks
        if text is None:
            raise ValueError(f"no {request.purpose} text configured")
        return OutboundMessage(
            channel=request.channel,
            user_id=request.user_id,
            text=text,
            kind="survey_prompt",
            meta=meta,
        )
    text = {
        "prompt": texts.prompt,
        "reask": texts.reask,
        "step2": texts.step2_prompt or texts.prompt,
    }[request.purpose]
    if request.channel == "whatsapp":
        return _whatsapp_message(request, text, meta)
    return _choices_message(request, text, meta)
