"""Webhook intake shared by the proxy and the in-process middleware.

:class:`WebhookIntake` responds to Meta's verification request, checks the signature of a
webhook over its raw bytes and hands it to the recorder. It does no I/O of its own, so the
acknowledgement depends only on the recorder accepting the webhook.

A :class:`chatmw.recorder.Recorder` gets the verified body undecoded, as one
:class:`chatmw.exchange.Exchange` whose :class:`WebhookDecoder` parses it into events
(Messenger, Instagram or WhatsApp by the body's ``object``) where the batch is written.
The acknowledgement therefore costs no JSON decoding and no event building. Any other sink,
and a durable acknowledgement, get the parsed events.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

from chatmw import events as ev
from chatmw.adapters import messenger, whatsapp
from chatmw.adapters._meta import (
    MetaSettings,
    WebhookStats,
    verification_challenge,
    verify_signature,
)
from chatmw.codecs import load_json_body
from chatmw.exchange import Exchange, captured_exchange
from chatmw.recorder import Recorder

__all__ = [
    "WebhookIntake",
    "WebhookOutcome",
    "WebhookDecoder",
    "EventSink",
    "parse_webhook",
    "WebhookFormatError",
    "header_value",
    "query_params",
]

logger = logging.getLogger("chatmw")

# RawPayload sources that mark an event kind the parsers do not know.
UNKNOWN_SOURCES = frozenset({"messenger_unknown", "instagram_unknown", "whatsapp_unknown"})


class EventSink(Protocol):
    """A destination of accepted events: :class:`chatmw.recorder.Recorder` or alike."""

    def submit(self, event: ev.Event) -> bool: ...


class WebhookFormatError(ValueError):
    """A verified body that is not a webhook the adapters know."""


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """The response to Meta, and whether the body goes on to the bot."""

    status: int
    body: bytes
    events: int = 0
    forward: bool = False


def parse_webhook(
    body: bytes, received_at: datetime, agent_app_ids: frozenset[str] = frozenset()
) -> list[ev.Event]:
    """Parse a webhook body into events; raises :class:`WebhookFormatError` when it is not one.

    Messenger and Instagram echoes from an app in ``agent_app_ids`` are agent messages.
    """
    try:
        document = load_json_body(body)
    except ValueError as error:
        raise WebhookFormatError(str(error)) from error
    if not isinstance(document, dict):
        raise WebhookFormatError("body is not a JSON object")
    kind = document.get("object")
    if kind == "page":
        return messenger.parse_webhook(document, received_at, agent_app_ids=agent_app_ids)
    if kind == "instagram":
        return messenger.parse_webhook(document, received_at, "instagram", agent_app_ids)
    if kind == "whatsapp_business_account":
        return whatsapp.parse_webhook(document, received_at)
    raise WebhookFormatError(f"unknown webhook object {kind!r}")


class WebhookDecoder:
    """Parses the verified bodies that :class:`WebhookIntake` queued undecoded.

    It runs where the batch is written: in the store writer of the writer process, or in the
    recorder's thread before it writes or spools a batch (once, however often it writes the
    batch again). It counts ``events``, ``unparseable`` and ``unknown_events`` in
    ``stats``. A writer process gets copies with counters of their own and the same
    ``token``. Once it has written a batch, it sends their counts back with the token, and
    the parent adds them to this decoder's ``stats`` (``chatmw.writer_process``).
    """

    def __init__(
        self,
        agent_app_ids: frozenset[str] = frozenset(),
        stats: WebhookStats | None = None,
        token: str | None = None,
    ) -> None:
        self.agent_app_ids = agent_app_ids
        self.stats = stats or WebhookStats()
        self.token = token or secrets.token_hex(8)
        self.skipped: Counter[str] = Counter()

    def __reduce__(self) -> tuple[type[WebhookDecoder], tuple[frozenset[str], None, str]]:
        # The counters hold a lock: a copy in another process starts its own.
        return (WebhookDecoder, (self.agent_app_ids, None, self.token))

    def expand(self, exchange: Exchange) -> list[ev.Event]:
        """Return the events of the webhook body that ``exchange`` carries."""
        found = parse_or_keep(exchange.request, exchange.occurred_at, self.agent_app_ids,
                              self.stats)
        self.stats.add("events", len(found))
        return found


def parse_or_keep(
    body: bytes, received_at: datetime, agent_app_ids: frozenset[str], stats: WebhookStats
) -> list[ev.Event]:
    """Parse a verified body into events, or into one raw payload of it when that fails."""
    try:
        found = parse_webhook(body, received_at, agent_app_ids)
    except WebhookFormatError as error:
        stats.add("unparseable")
        logger.warning("webhook body verified but not parsed (%d bytes): %s", len(body), error)
        return [_raw_body(body, received_at, str(error))]
    except Exception as error:  # noqa: BLE001 - a parser bug must not lose the body
        stats.add("unparseable")
        logger.exception("webhook parser failed on a verified body (%d bytes)", len(body))
        return [_raw_body(body, received_at, f"parser error {type(error).__name__}: {error}")]
    unknown = sum(
        1 for item in found if isinstance(item, ev.RawPayload) and item.source in UNKNOWN_SOURCES
    )
    if unknown:
        stats.add("unknown_events", unknown)
        logger.info("webhook carried %d events of unknown kinds, kept as raw payloads", unknown)
    return found


def _raw_body(body: bytes, received_at: datetime, reason: str) -> ev.RawPayload:
    return ev.RawPayload(
        channel="meta", occurred_at=received_at, source="meta_webhook", body=body, reason=reason
    )


_ACCEPTED_UNDECODED = WebhookOutcome(200, b"EVENT_RECEIVED", forward=True)


class WebhookIntake:
    """Verifies and records webhooks. One instance serves every request."""

    def __init__(
        self, settings: MetaSettings, sink: EventSink | None, stats: WebhookStats | None = None
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = stats or WebhookStats()
        self.decoder = WebhookDecoder(settings.agent_app_ids, self.stats)
        # A recorder decodes exchanges where it writes or spools them. A durable
        # acknowledgement keeps the parsed events, which the spool stores as they are.
        self._undecoded = isinstance(sink, Recorder) and not settings.durable_acknowledgement
        if settings.durable_acknowledgement and not getattr(sink, "replayable", False):
            logger.warning(
                "durable acknowledgement requested, but the recorder has no replayable "
                "spool: webhooks are acknowledged once queued in memory"
            )

    def challenge(self, query: Mapping[str, str]) -> WebhookOutcome:
        """Respond to a ``GET`` verification: the challenge with 200, or 403."""
        challenge = verification_challenge(query, self.settings.verify_token)
        if challenge is None:
            logger.warning("webhook verification rejected: wrong mode or verify token")
            return WebhookOutcome(403, b"verification failed")
        return WebhookOutcome(200, challenge.encode())

    def receive(
        self, body: bytes, signature: bytes | str | None, received_at: datetime | None = None
    ) -> WebhookOutcome:
        """Handle a ``POST`` body: 403 on a bad signature, else record and return 200.

        Returns 503 when the recorder did not take the webhook, so that Meta delivers it
        again later. ``events`` of the outcome is 0 when a recorder took the body undecoded.
        """
        self.stats.add("received")
        if not verify_signature(body, signature, self.settings.app_secret):
            return self._rejected()
        self.stats.add("verified")
        received_at = received_at or ev.now_utc()
        if self._undecoded:
            exchange = captured_exchange("meta", received_at, "", self.decoder, body, b"",
                                         None, None, "complete", b"")
            if not self.sink.submit(exchange):  # type: ignore[union-attr]
                self.stats.add("not_accepted")
                return WebhookOutcome(503, b"recorder busy, retry later")
            return _ACCEPTED_UNDECODED
        found = parse_or_keep(body, received_at, self.settings.agent_app_ids, self.stats)
        if not self._accept(found):
            self.stats.add("not_accepted")
            return WebhookOutcome(503, b"recorder busy, retry later", events=len(found))
        self.stats.add("events", len(found))
        return WebhookOutcome(200, b"EVENT_RECEIVED", events=len(found), forward=True)

    def _rejected(self) -> WebhookOutcome:
        self.stats.add("rejected_signature")
        rejected = self.stats["rejected_signature"]
        # The first rejection and every hundredth: a flood of forged requests stays readable.
        if rejected == 1 or rejected % 100 == 0:
            logger.warning(
                "webhook rejected: missing or invalid X-Hub-Signature-256 "
                "(%d rejected so far); check the app secret",
                rejected,
            )
        return WebhookOutcome(403, b"invalid signature")

    def _accept(self, found: Sequence[ev.Event]) -> bool:
        if self.sink is None or not found:
            return True
        # Durable acknowledgement needs a recorder with a replayable spool; without one,
        # Recorder.submit_durable would report every webhook as not stored.
        durable = getattr(self.sink, "submit_durable", None)
        replayable = bool(getattr(self.sink, "replayable", False))
        if self.settings.durable_acknowledgement and durable is not None and replayable:
            return bool(durable(list(found)))
        accepted = True
        for event in found:
            accepted = self.sink.submit(event) and accepted
        return accepted


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower case) from raw ASGI headers."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def query_params(query_string: bytes) -> dict[str, Any]:
    """Decode an ASGI query string into a dict of last values."""
    return dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
