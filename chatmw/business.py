"""Recording conversions, leads and advertising spend, and writing them to the store.

Call :func:`install` once on the runtime's writer to store the business events and to
detect leads and query types in user messages. Then record from Python with
:func:`record_conversion`, :func:`record_lead` and :func:`record_spend` (each submits an
event to the recorder and returns at once), over HTTP with
:func:`chatmw.api_business.create_business_router`, or import spend with
``chatmw spend import FILE.csv``.

One deployment uses one currency: ``BusinessSettings.currency``, or else the currency of
the first conversion or spend stored. The HTTP API and the CSV import reject another
currency. The recorder never raises into the caller, so the writer drops (and logs) a
conversion or spend recorded from Python in another currency.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, delete, func, select, union_all
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.business_detect import (
    QueryRule,
    classify,
    find_emails,
    find_phones,
    hash_value,
    load_query_rules,
)
from chatmw.events_business import (
    Conversion,
    Lead,
    LeadKind,
    Spend,
    check_currency,
    parse_amount,
    to_micros,
)
from chatmw.recorder import Recorder
from chatmw.store import models
from chatmw.store import models_business as bm
from chatmw.store.changes import record_changes
from chatmw.store.identity import CHUNK, id_in, insert_ignore, select_by_keys, upsert
from chatmw.store.writer import Writer, stored_messages, write_attributes

__all__ = [
    "BusinessSettings",
    "CurrencyMismatch",
    "QUERY_TYPE_ATTRIBUTE",
    "install",
    "record_conversion",
    "record_lead",
    "record_spend",
    "lead_key",
    "deployment_currency",
    "check_deployment_currency",
    "SpendRowError",
    "parse_spend_csv",
    "SPEND_COLUMNS",
]

logger = logging.getLogger("chatmw")

# The conversation attribute that keyword rules set; the query-types metric reads it.
QUERY_TYPE_ATTRIBUTE = "query_type"
SPEND_COLUMNS = ("day", "channel", "campaign", "amount", "currency")
_MAX_TEXT = 255
# Narrower columns of the business tables (chatmw/store/models_business.py).
_MAX_CHARS = {"channel": 32, "name": 128}


@dataclass(slots=True)
class BusinessSettings:
    """Settings of the business figures.

    ``currency`` (ISO 4217) fixes the deployment's currency; when ``None`` the first
    conversion or spend stored fixes it. ``redact_leads`` stores only a hash of each lead's
    e-mail address or phone number, not the value. ``None`` (the default) follows the
    privacy text mode given to :func:`install`: the value is kept only when message text
    is stored in full, and without a text mode only the hash is stored. ``lead_hash_key``
    makes that hash an HMAC, so it cannot be reversed by hashing guessed addresses.
    ``detect_leads`` looks for leads in user messages. ``query_rules`` (or
    ``query_rules_path``, a TOML or JSON file read once here) classify each conversation's
    first user message into a query type, stored as the conversation attribute
    ``query_type``.
    """

    currency: str | None = None
    redact_leads: bool | None = None
    lead_hash_key: bytes | None = field(default=None, repr=False)
    detect_leads: bool = True
    query_rules: Sequence[QueryRule] = ()
    query_rules_path: str | Path | None = None

    def __post_init__(self) -> None:
        if self.currency is not None:
            try:
                check_currency(self.currency)
            except ValueError as error:
                # Named like the other settings errors: "business.currency: invalid ...".
                raise ValueError(f"currency: {error}") from None
        if self.query_rules_path is not None and not self.query_rules:
            self.query_rules = load_query_rules(self.query_rules_path)


class CurrencyMismatch(ValueError):
    """A conversion or spend in a currency other than the deployment's."""

    def __init__(self, currency: str, expected: str) -> None:
        super().__init__(
            f"currency {currency} differs from this deployment's currency {expected}; "
            f"record amounts in {expected}"
        )
        self.currency = currency
        self.expected = expected


# Recording from Python


def _check_text(name: str, value: str | None, required: bool = True) -> None:
    if value is None or value == "":
        if required:
            raise ValueError(f"{name} is required")
        return
    limit = _MAX_CHARS.get(name, _MAX_TEXT)
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise ValueError(f"{name} must be a string of at most {limit} characters without NUL")


def _check_time(name: str, moment: datetime | None) -> datetime:
    if moment is None:
        return ev.now_utc()
    if moment.tzinfo is None:
        raise ValueError(f"{name} {moment.isoformat()} has no time zone; give an aware datetime")
    return moment


def record_conversion(
    recorder: Recorder,
    *,
    key: str,
    name: str,
    value: Decimal | str | int,
    currency: str,
    channel: str,
    user_id: str | None = None,
    conversation_id: str | None = None,
    occurred_at: datetime | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bool:
    """Submit a conversion; returns ``False`` when the recorder dropped it (queue full).

    Raises ``ValueError`` for invalid input: a missing ``key``, ``name`` or ``channel``,
    neither ``user_id`` nor ``conversation_id``, an invalid amount or currency code, or a
    naive ``occurred_at`` (default: now).
    """
    for label, text in (("key", key), ("name", name), ("channel", channel)):
        _check_text(label, text)
    _check_text("user_id", user_id, required=False)
    _check_text("conversation_id", conversation_id, required=False)
    if not user_id and not conversation_id:
        raise ValueError("user_id or conversation_id is required")
    event = Conversion(
        channel=channel,
        occurred_at=_check_time("occurred_at", occurred_at),
        key=key,
        name=name,
        value_micros=to_micros(parse_amount(value)),
        currency=check_currency(currency),
        user_id=user_id or None,
        conversation_id=conversation_id or None,
        meta=dict(meta or {}),
    )
    return recorder.submit(event)


def lead_key(channel: str, user_id: str, kind: str, value_hash: str) -> str:
    """Return the idempotency key of a lead: one lead per user and normalised value."""
    return f"lead:{channel}:{user_id}:{kind}:{value_hash[:32]}"


def record_lead(
    recorder: Recorder,
    *,
    channel: str,
    user_id: str,
    kind: LeadKind,
    value: str,
    conversation_id: str | None = None,
    occurred_at: datetime | None = None,
    score: float | None = None,
    key: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bool:
    """Submit a lead (an e-mail address or a phone number a user gave).

    ``value`` must already be normalised (see :mod:`chatmw.business_detect`); ``score`` is
    optional, from 0 to 100. Without ``key`` the lead is keyed by user and value, so the
    same details recorded twice count once.
    """
    _check_text("channel", channel)
    _check_text("user_id", user_id)
    _check_text("conversation_id", conversation_id, required=False)
    if kind not in ("email", "phone"):
        raise ValueError(f"kind must be 'email' or 'phone', got {kind!r}")
    if not value:
        raise ValueError("value is required")
    if score is not None and not 0 <= score <= 100:
        raise ValueError(f"score must be between 0 and 100, got {score}")
    key = key or lead_key(channel, user_id, kind, hash_value(kind, value))
    event = Lead(
        channel=channel,
        occurred_at=_check_time("occurred_at", occurred_at),
        key=key,
        user_id=user_id,
        kind=kind,
        value=value,
        conversation_id=conversation_id,
        origin="api",
        score=score,
        meta=dict(meta or {}),
    )
    return recorder.submit(event)


def record_spend(
    recorder: Recorder,
    *,
    day: date,
    channel: str,
    amount: Decimal | str | int,
    currency: str,
    campaign: str = "",
) -> bool:
    """Submit the spend of one day, channel and campaign; it replaces an earlier record."""
    _check_text("channel", channel)
    _check_text("campaign", campaign, required=False)
    return recorder.submit(
        _spend_event(day, channel, campaign, parse_amount(amount), check_currency(currency))
    )


def _spend_event(day: date, channel: str, campaign: str, amount: Decimal, currency: str) -> Spend:
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    return Spend.for_day(day, channel, amount, currency, campaign or "")


# Deployment currency


def stored_currency(session_or_engine: Session | Engine) -> str | None:
    """Return the currency of the first conversion or spend stored, or ``None``."""
    first_conversion = (
        select(bm.Conversion.currency, bm.Conversion.id.label("position"))
        .order_by(bm.Conversion.id)
        .limit(1)
    )
    first_spend = (
        select(bm.Spend.currency, bm.Spend.id.label("position")).order_by(bm.Spend.id).limit(1)
    )
    statement = union_all(first_conversion.subquery().select(), first_spend.subquery().select())
    if isinstance(session_or_engine, Session):
        rows = session_or_engine.execute(statement).all()
    else:
        with session_or_engine.connect() as connection:
            rows = connection.execute(statement).all()
    return rows[0][0] if rows else None


def deployment_currency(engine: Engine, settings: BusinessSettings) -> str | None:
    """Return the configured currency, else the stored one, else ``None``."""
    return settings.currency or stored_currency(engine)


def check_deployment_currency(engine: Engine, settings: BusinessSettings, currency: str) -> None:
    """Raise :class:`CurrencyMismatch` when ``currency`` is not the deployment's currency."""
    expected = deployment_currency(engine, settings)
    if expected is not None and currency != expected:
        raise CurrencyMismatch(currency, expected)


# Spend CSV


class SpendRowError(ValueError):
    """An invalid spend CSV row: ``line`` (1-based, the header is line 1) and ``column``."""

    def __init__(self, line: int, column: str, message: str) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.message = message


def parse_spend_csv(text: str, default_currency: str | None) -> list[Spend]:
    """Parse spend CSV with columns ``day,channel,campaign,amount[,currency]``.

    ``day`` is an ISO date; ``campaign`` may be empty; ``amount`` is a non-negative decimal
    with a dot; ``currency`` defaults to ``default_currency``. Every row must use one
    currency. Raises :class:`SpendRowError` on the first invalid row, so nothing is
    stored from a file with an error.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    try:
        return _spend_rows(reader, default_currency)
    except csv.Error as error:
        # For example a field over csv.field_size_limit() characters. line_num does not
        # count the line that failed yet.
        raise SpendRowError(reader.line_num + 1, "(row)", f"invalid CSV: {error}") from None


def _spend_rows(reader: csv.DictReader[str], default_currency: str | None) -> list[Spend]:
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    for required in ("day", "channel", "amount"):
        if required not in header:
            raise SpendRowError(1, required, f"missing column; expected {','.join(SPEND_COLUMNS)}")
    unknown = [name for name in header if name not in SPEND_COLUMNS]
    if unknown:
        raise SpendRowError(1, unknown[0], f"unknown column; expected {','.join(SPEND_COLUMNS)}")
    events: list[Spend] = []
    seen: dict[tuple[date, str, str], int] = {}
    currencies: set[str] = set()
    for row in reader:
        line = reader.line_num
        event = _spend_row(row, line, default_currency)
        identity = (event.day, event.channel, event.campaign)
        if identity in seen:
            raise SpendRowError(
                line, "day", f"same day, channel and campaign as line {seen[identity]}"
            )
        seen[identity] = line
        currencies.add(event.currency)
        if len(currencies) > 1:
            raise SpendRowError(
                line,
                "currency",
                f"currency {event.currency} differs from "
                f"{sorted(currencies - {event.currency})[0]} above",
            )
        events.append(event)
    return events


def _spend_row(row: Mapping[str, str | None], line: int, default_currency: str | None) -> Spend:
    if None in row:
        raise SpendRowError(line, "(row)", "more fields than columns in the header")
    values = {name: (value or "").strip() for name, value in row.items()}

    try:
        day = date.fromisoformat(values.get("day", ""))
    except ValueError:
        raise SpendRowError(
            line, "day", f"invalid date {values.get('day')!r}; expected YYYY-MM-DD"
        ) from None
    channel = values.get("channel", "")
    campaign = values.get("campaign", "")
    for name, text in (("channel", channel), ("campaign", campaign)):
        try:
            _check_text(name, text, required=name == "channel")
        except ValueError as error:
            raise SpendRowError(line, name, str(error)) from None

    try:
        amount = parse_amount(values.get("amount", ""))
    except ValueError as error:
        raise SpendRowError(line, "amount", str(error)) from None
    if amount < 0:
        raise SpendRowError(line, "amount", f"amount must not be negative, got {amount}")

    currency = values.get("currency") or default_currency
    if not currency:
        raise SpendRowError(
            line, "currency", "missing; add a currency column or configure the deployment currency"
        )
    try:
        check_currency(currency)
    except ValueError as error:
        raise SpendRowError(line, "currency", str(error)) from None

    return _spend_event(day, channel, campaign, amount, currency)


# Writer handlers


def _table(model: type[models.Base]) -> Table:
    return cast(Table, model.__table__)


@dataclass
class _Handlers:
    settings: BusinessSettings
    redact: bool

    def _allowed(self, session: Session, items: Sequence[Conversion | Spend]) -> list[Any]:
        expected = self.settings.currency or stored_currency(session)
        if expected is None and items:
            expected = items[0].currency
        allowed_items = [item for item in items if item.currency == expected]
        if len(allowed_items) < len(items):
            logger.error(
                "business writer dropped %d records in a currency other than %s",
                len(items) - len(allowed_items),
                expected,
            )
        return allowed_items

    def conversions(self, session: Session, items: list[Conversion]) -> None:
        rows = [
            {
                "key": item.key,
                "name": item.name,
                "value_micros": item.value_micros,
                "currency": item.currency,
                "channel": item.channel,
                "user_id": item.user_id,
                "conversation_external_id": item.conversation_id,
                "occurred_at_ms": ev.to_ms(item.occurred_at),
                "meta": dict(item.meta) or None,
            }
            for item in self._allowed(session, items)
        ]
        insert_ignore(session, _table(bm.Conversion), rows, ["key"])
        _record_conversions(session, rows)

    def spend(self, session: Session, items: list[Spend]) -> None:
        now_ms = ev.to_ms(ev.now_utc())
        latest: dict[tuple[date, str, str], dict[str, Any]] = {}
        for item in self._allowed(session, items):
            latest[(item.day, item.channel, item.campaign)] = {
                "day": item.day,
                "channel": item.channel,
                "campaign": item.campaign,
                "amount_micros": item.amount_micros,
                "currency": item.currency,
                "updated_at_ms": now_ms,
            }
        upsert(
            session,
            _table(bm.Spend),
            list(latest.values()),
            ["day", "channel", "campaign"],
            ["amount_micros", "currency", "updated_at_ms"],
        )

    def leads(
        self, session: Session, items: list[Lead], conversation_ids: Mapping[str, int] | None = None
    ) -> None:
        rows = []
        for item in items:
            digest = hash_value(item.kind, item.value, self.settings.lead_hash_key)
            rows.append(
                {
                    "key": item.key,
                    "channel": item.channel,
                    "user_id": item.user_id,
                    "conversation_id": (conversation_ids or {}).get(item.key),
                    "conversation_external_id": item.conversation_id,
                    "kind": item.kind,
                    "value_hash": digest,
                    "value": None if self.redact else item.value,
                    "origin": item.origin,
                    "score": item.score,
                    "occurred_at_ms": ev.to_ms(item.occurred_at),
                    "meta": dict(item.meta) or None,
                }
            )
        insert_ignore(session, _table(bm.Lead), rows, ["key"])
        _record_leads(session, rows)


def _named_conversations(
    session: Session, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, int | None]]:
    """Return the id and contact of each stored conversation among ``(channel, external id)``."""
    found = select_by_keys(session, _table(models.Conversation), ("channel", "external_id"),
                           sorted(set(keys)), ("channel", "external_id", "id", "contact_id"))
    return {(channel, external): (cid, contact) for channel, external, cid, contact in found}


def _user_contacts(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Return the contact id of each stored contact among ``(channel, user id)``."""
    found = select_by_keys(session, _table(models.Contact), ("channel", "external_id"),
                           sorted(set(keys)), ("channel", "external_id", "id"))
    return {(channel, external): contact_id for channel, external, contact_id in found}


def _record_conversions(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    # A conversion counts for the conversation it names, or else for the conversations of
    # its user (chatmw.metrics.conversion). Its contact's latest conversion also decides
    # whether that contact's leads converted, so the contact is logged in both cases.
    named = _named_conversations(session, [
        (row["channel"], row["conversation_external_id"]) for row in rows
        if row["conversation_external_id"] is not None])
    users = _user_contacts(session, [
        (row["channel"], row["user_id"]) for row in rows if row["user_id"] is not None])
    conversations: list[tuple[int, None]] = []
    contacts: list[int | None] = []
    for row in rows:
        conversation = named.get((row["channel"], row["conversation_external_id"]))
        if conversation is not None:
            conversations.append((conversation[0], None))
        contact = users.get((row["channel"], row["user_id"]))
        contacts.append(contact if contact is not None or conversation is None else conversation[1])
    record_changes(session.connection(), conversations=conversations, contacts=contacts)


def _record_leads(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    # A lead counts for the conversation it was found in, else the one it names, else its
    # user's latest conversation (chatmw.metrics.leads.lead_conversations).
    named = _named_conversations(session, [
        (row["channel"], row["conversation_external_id"]) for row in rows
        if row["conversation_id"] is None and row["conversation_external_id"] is not None])
    conversations: list[tuple[int, None]] = []
    unplaced: list[tuple[str, str]] = []
    for row in rows:
        if row["conversation_id"] is not None:
            conversations.append((row["conversation_id"], None))
            continue
        conversation = named.get((row["channel"], row["conversation_external_id"]))
        if conversation is not None:
            conversations.append((conversation[0], None))
        else:
            unplaced.append((row["channel"], row["user_id"]))
    contacts = _user_contacts(session, unplaced).values() if unplaced else ()
    record_changes(session.connection(), conversations=conversations, contacts=contacts)


def install(
    writer: Writer, settings: BusinessSettings | None = None, text_mode: str | None = None
) -> None:
    """Register the business event handlers on ``writer`` (idempotent).

    Adds handlers for :class:`Conversion`, :class:`Lead` and :class:`Spend`, and wraps the
    message handler so that, after messages are stored, leads are detected in user
    messages and query-type rules classify each conversation's first user message.
    ``text_mode`` is the privacy text mode (``full``, ``redacted`` or ``none``); it decides
    lead redaction when ``settings.redact_leads`` is ``None``.
    """
    settings = settings or BusinessSettings()
    redact = settings.redact_leads
    if redact is None:
        redact = text_mode != "full"
    handlers = _Handlers(settings, redact)
    writer.handlers[Conversion] = handlers.conversions
    writer.handlers[Lead] = handlers.leads
    writer.handlers[Spend] = handlers.spend
    current = writer.handlers[ev.Message]
    original = getattr(current, "__wrapped_by_business__", current)
    writer.handlers[ev.Message] = _BusinessMessages(original, handlers)


class _BusinessMessages:
    # The message handler followed by lead detection and query types. A class rather than
    # a closure, so that a writer can be pickled into the writer process.

    def __init__(self, original: Callable[[Session, list[ev.Message]], None],
                 handlers: _Handlers) -> None:
        self.__wrapped_by_business__ = original
        self.handlers = handlers

    def __call__(self, session: Session, messages: list[ev.Message]) -> None:
        self.__wrapped_by_business__(session, messages)
        _after_messages(session, messages, self.handlers)


def _after_messages(session: Session, messages: Sequence[ev.Message], handlers: _Handlers) -> None:
    settings = handlers.settings
    if not settings.detect_leads and not settings.query_rules:
        return
    user_messages = [m for m in messages if m.role == "user" and m.kind == "message" and m.text]
    if not user_messages:
        return
    stored = _stored_rows(session, [m.key for m in user_messages])
    if settings.detect_leads:
        _detect_leads(session, user_messages, stored, handlers)
    if settings.query_rules:
        _classify_conversations(session, user_messages, stored, settings.query_rules)


def _stored_rows(session: Session, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    keys = set(keys)
    known = stored_messages(session, keys)
    if known is not None:
        return known
    key_tuples = [(key,) for key in sorted(keys)]
    rows = select_by_keys(session, _table(models.Message), ("key",), key_tuples,
                          ("key", "conversation_id", "occurred_at_ms"))
    return {key: (conversation_id, at_ms) for key, conversation_id, at_ms in rows}


def _detect_leads(
    session: Session,
    messages: Sequence[ev.Message],
    stored: Mapping[str, tuple[int, int]],
    handlers: _Handlers,
) -> None:
    leads: list[Lead] = []
    conversation_ids: dict[str, int] = {}
    for message in messages:
        if message.key not in stored or message.text is None:
            continue
        found: list[tuple[LeadKind, str]] = [
            ("email", value) for value in find_emails(message.text)
        ]
        found += [("phone", value) for value in find_phones(message.text)]
        for kind, value in found:
            key = lead_key(message.channel, message.user_id, kind, hash_value(kind, value))
            conversation_ids[key] = stored[message.key][0]
            leads.append(
                Lead(
                    channel=message.channel,
                    occurred_at=message.occurred_at,
                    key=key,
                    user_id=message.user_id,
                    kind=kind,
                    value=value,
                    origin="message",
                )
            )
    if leads:
        handlers.leads(session, leads, conversation_ids)


def _first_user_message_times(session: Session, conversation_ids: Sequence[int]) -> dict[int, int]:
    message = models.Message
    times: dict[int, int] = {}
    if not conversation_ids:
        return times
    statement = (
        select(message.conversation_id, func.min(message.occurred_at_ms))
        .where(
            id_in(session, message.conversation_id, conversation_ids),
            message.role == "user",
            message.kind == "message",
        )
        .group_by(message.conversation_id)
    )
    for conversation_id, at_ms in session.connection().execute(statement):
        times[conversation_id] = int(at_ms)
    return times


def _classify_conversations(
    session: Session,
    messages: Sequence[ev.Message],
    stored: Mapping[str, tuple[int, int]],
    rules: Sequence[QueryRule],
) -> None:
    # The type comes from the conversation's first user message. Messages can arrive out of
    # order, so a message decides only if no earlier user message of its conversation is stored.
    earliest: dict[int, tuple[int, ev.Message]] = {}
    for message in messages:
        if message.key not in stored:
            continue
        conversation_id, at_ms = stored[message.key]
        if conversation_id not in earliest or at_ms < earliest[conversation_id][0]:
            earliest[conversation_id] = (at_ms, message)
    first_user_ms = _first_user_message_times(session, list(earliest))
    types: dict[tuple[int, str], str] = {}
    unmatched: list[int] = []
    for conversation_id, (at_ms, message) in earliest.items():
        first_ms = first_user_ms.get(conversation_id)
        if first_ms is not None and first_ms < at_ms:
            continue
        query_type = classify(message.text or "", rules)
        if query_type is None:
            unmatched.append(conversation_id)
        else:
            types[(conversation_id, QUERY_TYPE_ATTRIBUTE)] = query_type

    write_attributes(session, types)
    attribute = models.ConversationAttribute
    for start in range(0, len(unmatched), CHUNK):
        session.execute(
            delete(attribute).where(
                attribute.conversation_id.in_(unmatched[start : start + CHUNK]),
                attribute.name == QUERY_TYPE_ATTRIBUTE,
            )
        )
