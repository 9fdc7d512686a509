"""Redaction of e-mail addresses and phone numbers in message text.

The patterns err on the side of removing too much: any run of at least seven digits that
may be separated by spaces, dots, dashes, slashes or brackets (with an optional leading
``+`` or ``00``) counts as a phone number, so long order numbers are redacted too. Dates
(``2024-03-01``, ``10.5.2024``, ``01/03/24``) and times are kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from chatmw.events import Message

__all__ = ["TEXT_MODES", "TextMode", "redact_text", "text_enricher", "EMAIL_MARK", "PHONE_MARK"]

TextMode = Literal["full", "redacted", "none"]
TEXT_MODES: tuple[str, ...] = ("full", "redacted", "none")
EMAIL_MARK = "[email]"
PHONE_MARK = "[phone]"
MIN_PHONE_DIGITS = 7

EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
PHONE = re.compile(r"(?<![\w+])(?:\+|00)?\(?\d[\d\s./()-]{5,}\d(?!\w)")
# Dates: 2024-03-01, 10.5.2024, 01/03/24.
DATE = re.compile(r"^(?:\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4})$")


def _phone(match: re.Match[str]) -> str:
    found = match.group(0)
    if DATE.match(found.strip()):
        return found
    if sum(char.isdigit() for char in found) < MIN_PHONE_DIGITS:
        return found
    return PHONE_MARK


def redact_text(text: str) -> str:
    """Return ``text`` with e-mail addresses and phone numbers replaced by markers."""
    return PHONE.sub(_phone, EMAIL.sub(EMAIL_MARK, text))


def text_enricher(mode: TextMode) -> Callable[[Message], Mapping[str, Any]] | None:
    """Return a Writer enricher that stores message text in ``mode``; ``None`` for full.

    Add it last to ``Writer.enrichers``: it overrides the ``text`` column only, so other
    enrichers (sentiment, lead capture) and preprocessors still see the full text.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {', '.join(TEXT_MODES)}, got {mode!r}")
    if mode == "full":
        return None
    return drop_text if mode == "none" else redact_message


# Module-level functions, so that a writer holding them can be copied to the writer process.

def drop_text(message: Message) -> Mapping[str, Any]:
    """Return the ``text`` column of a message stored without text."""
    return {"text": None}


def redact_message(message: Message) -> Mapping[str, Any]:
    """Return the ``text`` column of a message stored with addresses and numbers redacted."""
    return {"text": None if message.text is None else redact_text(message.text)}
