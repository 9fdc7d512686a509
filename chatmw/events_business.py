"""Business events: conversions, leads and advertising spend, and the money helpers they share.

Amounts are exact decimals. The store keeps them as integer micros (millionths of the
currency unit, as the Google Ads API does), so sums are exact on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal

from chatmw.events import Event

__all__ = [
    "Conversion",
    "Lead",
    "Spend",
    "LeadKind",
    "MICROS",
    "MAX_DECIMAL_PLACES",
    "CURRENCY_PATTERN",
    "parse_amount",
    "to_micros",
    "format_micros",
    "check_currency",
]

LeadKind = Literal["email", "phone"]

# Micros per currency unit; amounts with more decimal places than this are rejected.
MICROS = 1_000_000
MAX_DECIMAL_PLACES = 6
# The largest amount that fits a signed 64-bit integer of micros, with room for sums.
MAX_AMOUNT = Decimal(10) ** 12
# An ISO 4217 alphabetic code.
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")


def parse_amount(text: str | int | float | Decimal) -> Decimal:
    """Parse a money amount; raises ``ValueError`` naming the problem.

    Accepts at most six decimal places and an absolute value below 10^12.
    """
    try:
        amount = text if isinstance(text, Decimal) else Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"invalid decimal amount {text!r}; expected e.g. 12.50") from None
    if not amount.is_finite():
        raise ValueError(f"amount must be a finite number, got {text!r}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES:
        raise ValueError(f"amount {text!r} has more than {MAX_DECIMAL_PLACES} decimal places")
    if abs(amount) >= MAX_AMOUNT:
        raise ValueError(f"amount {text!r} is too large; the maximum is below {MAX_AMOUNT}")
    return amount


def to_micros(amount: Decimal) -> int:
    """Convert an amount parsed by :func:`parse_amount` to integer micros."""
    return int(amount * MICROS)


def format_micros(micros: int | None, places: int | None = None) -> str | None:
    """Render micros as a decimal string with at least two places (``"12.50"``).

    With ``places`` the value is rounded half-to-even to exactly that many places.
    """
    if micros is None:
        return None
    value = Decimal(micros) / MICROS
    if places is not None:
        return str(value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))
    text = f"{value.normalize():f}"
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def check_currency(code: str) -> str:
    """Return ``code`` if it is an ISO 4217 alphabetic code; raises ``ValueError`` otherwise."""
    if not isinstance(code, str) or not CURRENCY_PATTERN.match(code):
        raise ValueError(
            f"invalid currency {code!r}; expected a 3-letter ISO 4217 code such as EUR"
        )
    return code


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversion(Event):
    """A conversion (a purchase, a sign-up, a booking) made by a chat user.

    It names the user (``user_id`` on ``channel``) or the conversation
    (``conversation_id``, the source's own id on ``channel``), or both. ``key`` is the
    idempotency key: a conversion stored twice under one key counts once. The amount is
    kept in integer micros, a type the recorder's disk spool can store exactly.
    """

    key: str
    name: str
    value_micros: int
    currency: str
    user_id: str | None = None
    conversation_id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> Decimal:
        """The amount as a decimal in ``currency``."""
        return Decimal(self.value_micros) / MICROS


@dataclass(frozen=True, slots=True, kw_only=True)
class Lead(Event):
    """Contact details a user gave: an e-mail address or a phone number.

    ``value`` is the normalised address or number (lower-case e-mail, phone digits with a
    leading ``+`` where given). The writer stores it, or only its hash when leads are
    redacted. ``origin`` is ``message`` for leads found in user messages, ``api`` for
    recorded ones. ``score`` is an optional quality score from 0 to 100.
    """

    key: str
    user_id: str
    kind: LeadKind
    value: str
    conversation_id: str | None = None
    origin: str = "api"
    score: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Spend(Event):
    """Advertising spend of one day on one channel and campaign (``""`` for none).

    A later record of the same day, channel and campaign replaces the earlier amount. The
    day is ``occurred_at``'s date in UTC (build one with :meth:`for_day`), and the amount
    is in integer micros, so the recorder's disk spool can store both exactly.
    """

    amount_micros: int
    currency: str
    campaign: str = ""

    @classmethod
    def for_day(
        cls, day: date, channel: str, amount: Decimal, currency: str, campaign: str = ""
    ) -> Spend:
        """Build the spend of ``day``, with ``amount`` as parsed by :func:`parse_amount`."""
        return cls(
            channel=channel,
            occurred_at=datetime(day.year, day.month, day.day, tzinfo=UTC),
            amount_micros=to_micros(amount),
            currency=currency,
            campaign=campaign,
        )

    @property
    def day(self) -> date:
        """The day the spend belongs to."""
        return self.occurred_at.astimezone(UTC).date()

    @property
    def amount(self) -> Decimal:
        """The amount as a decimal in ``currency``."""
        return Decimal(self.amount_micros) / MICROS
