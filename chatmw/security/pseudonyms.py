"""Keyed pseudonyms of platform user ids and conversation ids (HMAC-SHA256).

A pseudonym is ``ps_`` followed by the first 128 bits of HMAC-SHA256(key, kind + id) in
hex. The same id always gives the same pseudonym under one key, so contacts and
conversations still join up; without the key an id cannot be recovered, and guesses (a
phone number, say) cannot be tested against the stored pseudonyms.

The key comes from ``CHATMW_PSEUDONYM_KEY``. When it is not set, a random key is generated
once and stored in the ``chatmw_secrets`` table, so that every process on the database
uses the same one; a warning says so at each start, because anyone with a copy of that
database then also has the key. Changing the key splits every person into a new contact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatmw.events import Event, field_reader, values_builder
from chatmw.security.secret import Secret

__all__ = [
    "PSEUDONYM_KEY_ENV",
    "PSEUDONYM_PREFIX",
    "PSEUDONYMISED_FIELDS",
    "MIN_KEY_LENGTH",
    "Pseudonymiser",
    "load_or_create_key",
]

logger = logging.getLogger("chatmw")

# The pseudonym key: at least MIN_KEY_LENGTH characters, for example `openssl rand -hex 32`.
PSEUDONYM_KEY_ENV = "CHATMW_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 16
PSEUDONYM_PREFIX = "ps_"
# Pseudonyms remembered per Pseudonymiser, so a busy user is hashed once, not per message.
RECENT_PSEUDONYMS = 10_000
STORED_KEY_NAME = "pseudonym_key"
# Event fields replaced by pseudonyms, on every event type that has them.
PSEUDONYMISED_FIELDS = {"user_id": "user", "conversation_id": "conversation"}


# Per event class: its field reader, its builder from field values, and the positions and
# kinds of the fields to replace (see Pseudonymiser.apply).
_Plan = tuple[Callable[[Any], tuple[Any, ...]], Callable[[Sequence[Any]], Any],
              tuple[tuple[int, str], ...]]


class Pseudonymiser:
    """Maps platform ids to keyed pseudonyms; :meth:`apply` rewrites a whole event."""

    def __init__(self, key: Secret,
                 fields: tuple[str, ...] = tuple(PSEUDONYMISED_FIELDS)) -> None:
        if len(key.reveal()) < MIN_KEY_LENGTH:
            raise ValueError(f"the pseudonym key must be at least {MIN_KEY_LENGTH} characters "
                             f"long, got {len(key.reveal())}: generate one with "
                             "`openssl rand -hex 32`")
        unknown = set(fields) - set(PSEUDONYMISED_FIELDS)
        if unknown:
            raise ValueError(f"cannot pseudonymise fields {sorted(unknown)}: "
                             f"choose from {sorted(PSEUDONYMISED_FIELDS)}")
        self._key = key.reveal().encode("utf-8")
        self.fields = fields
        self._recent: dict[tuple[str, str], str] = {}
        self._plans: dict[type, _Plan] = {}

    def __repr__(self) -> str:
        return "Pseudonymiser(key=[secure])"

    def pseudonymise(self, value: str, kind: str = "user") -> str:
        """Return the pseudonym of ``value``, a user id (``kind="user"``) or a conversation id."""
        known = self._recent.get((kind, value))
        if known is not None:
            return known
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256)
        pseudonym = PSEUDONYM_PREFIX + digest.hexdigest()[:32]
        if len(self._recent) >= RECENT_PSEUDONYMS:
            # A user writes several messages in a row; forgetting all at once keeps this cheap.
            self._recent.clear()
        self._recent[(kind, value)] = pseudonym
        return pseudonym

    def apply(self, event: Event) -> Event:
        """Return ``event`` with its id fields (``user_id``, ``conversation_id``) pseudonymised."""
        plan = self._plans.get(event.__class__)
        if plan is None:
            plan = self._plans[event.__class__] = self._plan(event.__class__)
        read, build, targets = plan
        if not targets:
            return event
        values = read(event)
        changed: list[Any] | None = None
        for position, kind in targets:
            value = values[position]
            if isinstance(value, str) and value:
                if changed is None:
                    changed = list(values)
                changed[position] = self.pseudonymise(value, kind)
        # Pseudonyms are short hex strings, so the copy skips the checks a new event runs.
        return event if changed is None else build(changed)

    def _plan(self, event_class: type) -> _Plan:
        # The event class's field reader and builder, and the position and kind of each
        # of its fields that this pseudonymiser replaces.
        names = tuple(spec.name for spec in dataclasses.fields(event_class))
        targets = tuple((names.index(name), PSEUDONYMISED_FIELDS[name])
                        for name in self.fields if name in names)
        return field_reader(event_class), values_builder(event_class), targets

    def apply_all(self, events: Iterable[Event]) -> list[Event]:
        """Pseudonymise ``events`` (for sources that write through the Writer directly)."""
        return [self.apply(event) for event in events]


def load_or_create_key(engine: Engine, configured: Secret | None,
                       clock: Callable[[], float] = time.time) -> Secret:
    """Return ``configured``, or the key stored in the database, created on first use."""
    if configured is not None:
        return configured
    from chatmw.store.models_security import StoredSecret

    def read() -> str | None:
        with Session(engine) as session:
            return session.scalar(select(StoredSecret.value)
                                  .where(StoredSecret.name == STORED_KEY_NAME))

    stored = read()
    if stored is None:
        candidate = secrets.token_hex(32)
        try:
            with Session(engine) as session, session.begin():
                session.add(StoredSecret(name=STORED_KEY_NAME, value=candidate,
                                         created_at_ms=int(clock() * 1000)))
            stored = candidate
        except IntegrityError:  # another process stored its key first: use that one
            stored = read()
    if stored is None:
        raise RuntimeError("the generated pseudonym key could not be stored or read back")
    logger.warning("%s is not set: user ids are pseudonymised with a key stored in the "
                   "database, so a copy of the database can be matched against guessed ids; "
                   "set %s to keep the key elsewhere", PSEUDONYM_KEY_ENV, PSEUDONYM_KEY_ENV)
    return Secret(stored)
