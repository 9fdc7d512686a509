"""Text rules of the business figures: contact details in user messages, and query types.

Both run in the writer thread, off the bot's request path, on the text of each message as
it arrives (so they work when message text is not stored).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "find_emails",
    "find_phones",
    "normalise_email",
    "normalise_phone",
    "hash_value",
    "QueryRule",
    "load_query_rules",
    "parse_query_rules",
    "classify",
]

# A pragmatic subset of RFC 5322 addresses: dot-atom local part, a domain of labels and a
# top-level domain of letters. Quoted local parts and IP-literal domains are not leads.
_EMAIL = re.compile(
    r"(?<![\w.+-])"
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})"
    r"(?![\w@-])"
)
# A run that may be a phone number: an optional +, digits, and single separators
# (space, hyphen, dot, slash or parentheses) between them.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+/.-])(\+?\(?\d(?:[\d]|[ .\-/]\(?|\)[ .\-]?){5,24}\d)(?![\w/-]|\.\d)"
)
# E.164 numbers have at most 15 digits; national numbers shorter than 8 digits are too
# easily confused with codes and amounts to count as leads.
MIN_PHONE_DIGITS = 8
MAX_PHONE_DIGITS = 15
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_TIME_RANGE = re.compile(r"^\d{1,2}[.:]\d{2}\s*-\s*\d{1,2}[.:]\d{2}$")


def normalise_email(address: str) -> str:
    """Return ``address`` lower-cased, the form leads are compared and hashed in."""
    return address.strip().lower()


def find_emails(text: str) -> list[str]:
    """Return the distinct e-mail addresses in ``text``, normalised, in order of appearance."""
    if "@" not in text:
        # Every address has an @, and this test is a hundred times cheaper than the search.
        return []
    found = (normalise_email(match.group(1)) for match in _EMAIL.finditer(text))
    return list(dict.fromkeys(found))


def normalise_phone(number: str) -> str | None:
    """Return the digits of ``number`` with a leading ``+`` if it had one, or ``None``.

    ``None`` means the text is not a plausible phone number. That is the case for too few
    or too many digits, a date, an IPv4 address or a time range. It is also the case for a
    run of plain digits without a leading ``+`` or ``0``, because order numbers, amounts
    and postcodes look like that.
    """
    text = number.strip()
    digits = re.sub(r"\D", "", text)
    if not MIN_PHONE_DIGITS <= len(digits) <= MAX_PHONE_DIGITS:
        return None
    bare = text.strip("()")
    if _DATE.match(bare) or _IPV4.match(bare) or _TIME_RANGE.match(bare):
        return None
    if text.startswith("+"):
        return "+" + digits
    has_separators = digits != text
    if not has_separators and not text.startswith("0"):
        return None
    if len(set(digits)) == 1:
        return None
    return digits


# Every byte but the ASCII digits, deleted by bytes.translate to count the digits.
_NON_DIGITS = bytes(code for code in range(256) if not 48 <= code <= 57)


def find_phones(text: str) -> list[str]:
    """Return the distinct plausible phone numbers in ``text``, normalised, in order."""
    if text.isascii() and len(text.encode("ascii").translate(None, _NON_DIGITS)) < MIN_PHONE_DIGITS:
        # A number has at least MIN_PHONE_DIGITS digits, and counting them costs far less
        # than the search. (Other scripts' digits are digits too, hence ASCII text only.)
        return []
    numbers = []
    for match in _PHONE_CANDIDATE.finditer(text):
        candidate = match.group(1).rstrip(" .-/(")
        normalised = normalise_phone(candidate)
        if normalised is not None:
            numbers.append(normalised)
    return list(dict.fromkeys(numbers))


def hash_value(kind: str, value: str, key: bytes | None = None) -> str:
    """Return the hex digest stored for a lead: HMAC-SHA-256 with ``key``, else SHA-256.

    The kind is part of the hashed text, so an e-mail and a phone never share a digest.
    """
    message = f"{kind}:{value}".encode()
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


@dataclass(frozen=True, slots=True)
class QueryRule:
    """A query type and how to recognise it: any of ``keywords`` (whole words, any case)
    or the regular expression ``pattern`` (searched, case-insensitive)."""

    type: str
    keywords: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def matches(self, text: str) -> bool:
        if self.pattern is not None and self.pattern.search(text):
            return True
        lowered = text.lower()
        return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lowered) for word in self.keywords)


def parse_query_rules(items: Sequence[Any], origin: str = "rules") -> list[QueryRule]:
    """Build rules from plain data: a list of ``{"type", "keywords", "pattern"}`` mappings.

    Raises ``ValueError`` naming the rule (by position) and the field that is invalid.
    """
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise ValueError(f"{origin}: expected a list of rules")
    rules = []
    for index, item in enumerate(items):
        where = f"{origin}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a table with 'type' and 'keywords' or 'pattern'")
        unknown = set(item) - {"type", "keywords", "pattern"}
        if unknown:
            raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        kind = item.get("type")
        if not isinstance(kind, str) or not kind.strip() or len(kind) > 128:
            raise ValueError(f"{where}.type: expected a non-empty name of at most 128 characters")
        keywords = item.get("keywords", [])
        if not isinstance(keywords, list) or not all(
            isinstance(k, str) and k.strip() for k in keywords
        ):
            raise ValueError(f"{where}.keywords: expected a list of non-empty strings")
        pattern = item.get("pattern")
        compiled = None
        if pattern is not None:
            try:
                compiled = re.compile(pattern, re.IGNORECASE)
            except (re.error, TypeError) as error:
                raise ValueError(f"{where}.pattern: invalid regular expression: {error}") from None
        if not keywords and compiled is None:
            raise ValueError(f"{where}: needs 'keywords' or 'pattern'")
        rules.append(QueryRule(kind.strip(), tuple(k.strip().lower() for k in keywords), compiled))
    return rules


def load_query_rules(path: str | Path) -> list[QueryRule]:
    """Load rules from a ``.toml`` file (``[[rule]]`` tables) or a ``.json`` file (a list).

    The first rule that matches wins, so put specific rules before general ones.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read query rules file {source}: {error.strerror}") from None
    if source.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{source}: invalid TOML: {error}") from None
        return parse_query_rules(data.get("rule", []), origin=f"{source}: rule")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: invalid JSON: {error}") from None
    return parse_query_rules(data, origin=str(source))


def classify(text: str, rules: Iterable[QueryRule]) -> str | None:
    """Return the type of the first rule that matches ``text``, or ``None``."""
    for rule in rules:
        if rule.matches(text):
            return rule.type
    return None
