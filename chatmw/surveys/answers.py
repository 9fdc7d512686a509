"""Reading a survey answer: button payloads and typed scores.

Accepted forms:

- a button payload made by :func:`score_payload` or :func:`range_payload`;
- a number (``4``, ``4.``) or a score over the scale (``10/10``, ``4 out of 5``);
- stars (``⭐⭐⭐⭐``) or keycap digits (``4️⃣``);
- a number word in English, Spanish, French, German or Portuguese (``four``, ``diez``).

Text after a score and a separator (``9 - quick and friendly``) is kept as the comment.
Anything else is unclear and returns ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "is_survey_payload",
    "Answer",
    "parse_answer",
    "score_payload",
    "range_payload",
    "parse_payload",
    "PAYLOAD_PREFIX",
]

PAYLOAD_PREFIX = "survey"
_PAYLOAD = re.compile(r"^survey:(\d{1,18}):(?:(\d{1,2})|range:(\d{1,2})-(\d{1,2}))$")

_WORDS = {
    # English
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    # Spanish
    "cero": 0,
    "uno": 1,
    "una": 1,
    "dos": 2,
    "tres": 3,
    "cuatro": 4,
    "cinco": 5,
    "seis": 6,
    "siete": 7,
    "ocho": 8,
    "nueve": 9,
    "diez": 10,
    # French
    "zéro": 0,
    "un": 1,
    "une": 1,
    "deux": 2,
    "trois": 3,
    "quatre": 4,
    "cinq": 5,
    "sept": 7,
    "huit": 8,
    "neuf": 9,
    "dix": 10,
    # German
    "null": 0,
    "eins": 1,
    "ein": 1,
    "zwei": 2,
    "drei": 3,
    "vier": 4,
    "fünf": 5,
    "sechs": 6,
    "sieben": 7,
    "acht": 8,
    "neun": 9,
    "zehn": 10,
    # Portuguese
    "um": 1,
    "uma": 1,
    "dois": 2,
    "duas": 2,
    "três": 3,
    "quatro": 4,
    "sete": 7,
    "oito": 8,
    "nove": 9,
    "dez": 10,
}
_WORD_PATTERN = "|".join(sorted((re.escape(word) for word in _WORDS), key=len, reverse=True))
_SCORE = re.compile(
    rf"^(?P<number>\d{{1,3}}|{_WORD_PATTERN})(?![\w])"
    r"\s*(?:(?:/|out\s+of|of|sur|de|von|em)\s*(?P<denominator>\d{1,3}))?"
    r"\s*(?P<unit>stars?|points?|[⭐★]+)?"
    r"(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_DECIMAL = re.compile(r"^\d+[.,]\d")
# The title of an NPS range button ("0-6", "9 – 10") when a platform sends no payload.
_RANGE = re.compile(r"^(\d{1,2})\s*[-–—]\s*(\d{1,2})$")
_SEPARATOR = re.compile(r"^\s*[-–—:,.;!)\n]+\s*|^\s*\n\s*")
_FILLED_STARS = "⭐★"
_EMPTY_STARS = "☆"
# Keycap digits such as 4️⃣ arrive as the digit, U+FE0F and U+20E3.
_KEYCAP = re.compile("[\ufe0f\u20e3]")


@dataclass(frozen=True, slots=True)
class Answer:
    """A readable answer: a ``score``, or the NPS ``score_range`` picked in a first step.

    ``survey_id`` is set when the answer came from a button payload; ``comment`` is text
    typed after the score.
    """

    score: int | None = None
    score_range: tuple[int, int] | None = None
    comment: str | None = None
    survey_id: int | None = None


def is_survey_payload(text: str | None) -> bool:
    """Return whether ``text`` is a survey button payload, which the bot should not receive."""
    return text is not None and _PAYLOAD.match(text.strip()) is not None


def score_payload(survey_id: int, score: int) -> str:
    """Return the button payload that answers survey ``survey_id`` with ``score``."""
    return f"{PAYLOAD_PREFIX}:{survey_id}:{score}"


def range_payload(survey_id: int, low: int, high: int) -> str:
    """Return the button payload that picks the range ``low``-``high`` of an NPS question."""
    return f"{PAYLOAD_PREFIX}:{survey_id}:range:{low}-{high}"


def parse_payload(payload: str, scale: tuple[int, int]) -> Answer | None:
    """Read a payload of :func:`score_payload` or :func:`range_payload`; ``None`` otherwise."""
    match = _PAYLOAD.match(payload.strip())
    if match is None:
        return None
    survey_id = int(match.group(1))
    low, high = scale
    if match.group(2) is not None:
        score = int(match.group(2))
        return Answer(score=score, survey_id=survey_id) if low <= score <= high else None
    start, end = int(match.group(3)), int(match.group(4))
    if not low <= start <= end <= high:
        return None
    return Answer(score_range=(start, end), survey_id=survey_id)


def _parse_stars(text: str, scale: tuple[int, int]) -> Answer | None:
    compact = re.sub(r"\s", "", _KEYCAP.sub("", text))
    if not compact or any(char not in _FILLED_STARS + _EMPTY_STARS for char in compact):
        return None
    score = sum(1 for char in compact if char in _FILLED_STARS)
    return Answer(score=score) if scale[0] <= score <= scale[1] else None


def _number(token: str) -> int | None:
    # IGNORECASE also matches letters whose lower() is not in _WORDS ("ſix", "eİns").
    return int(token) if token.isdigit() else _WORDS.get(token.lower())


def parse_answer(text: str | None, payload: str | None, scale: tuple[int, int]) -> Answer | None:
    """Read an answer on ``scale`` (inclusive bounds) from a payload or typed text.

    Returns ``None`` for an unclear or out-of-range answer.
    """
    for candidate in (payload, text):
        if candidate and candidate.strip().startswith(f"{PAYLOAD_PREFIX}:"):
            return parse_payload(candidate, scale)
    if text is None:
        return None
    stripped = text.strip()
    if "🔟" in stripped:
        stripped = stripped.replace("🔟", "10")
    stripped = _KEYCAP.sub("", stripped)
    if not stripped:
        return None
    stars = _parse_stars(stripped, scale)
    if stars is not None:
        return stars
    if _DECIMAL.match(stripped):
        return None
    ranged = _RANGE.match(stripped)
    if ranged is not None:
        start, end = int(ranged.group(1)), int(ranged.group(2))
        valid = scale[0] <= start < end <= scale[1]
        return Answer(score_range=(start, end)) if valid else None
    match = _SCORE.match(stripped)
    if match is None:
        return None
    score = _number(match.group("number"))
    if score is None:
        return None
    denominator = match.group("denominator")
    if denominator is not None and int(denominator) != scale[1]:
        return None
    if not scale[0] <= score <= scale[1]:
        return None
    rest = match.group("rest")
    comment = None
    if rest.strip():
        separator = _SEPARATOR.match(rest)
        # Without a separator, "2 questions about my order" is a sentence, not a score.
        if separator is None and denominator is None and match.group("unit") is None:
            return None
        comment = rest[separator.end() :] if separator else rest
        comment = comment.strip() or None
    return Answer(score=score, comment=comment)
