"""Privacy settings and their wiring into the writer and the recorder.

By default user ids and conversation ids are stored as keyed pseudonyms (see
:mod:`chatmw.security.pseudonyms`), message text is stored with e-mail addresses and phone
numbers redacted, and the bodies of unparseable payloads are not kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from chatmw.events import Event, RawPayload
from chatmw.security.pseudonyms import PSEUDONYM_KEY_ENV, Pseudonymiser, load_or_create_key
from chatmw.security.redaction import TEXT_MODES, TextMode, text_enricher
from chatmw.security.secret import Secret

if TYPE_CHECKING:
    from chatmw.recorder import Recorder
    from chatmw.store.writer import Writer

__all__ = ["PrivacySettings", "Privacy", "PSEUDONYMISE_ENV", "TEXT_MODE_ENV", "KEEP_RAW_ENV"]

# "0"/"false"/"no"/"off" stores platform ids as they are; anything else pseudonymises.
PSEUDONYMISE_ENV = "CHATMW_PSEUDONYMISE"
# full | redacted | none: how message text is stored.
TEXT_MODE_ENV = "CHATMW_TEXT_MODE"
# "1"/"true"/"yes"/"on" keeps the bodies of payloads that could not be parsed.
KEEP_RAW_ENV = "CHATMW_KEEP_RAW_PAYLOADS"
FALSE_WORDS = ("0", "false", "no", "off")
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(slots=True)
class PrivacySettings:
    """Rules for what chatmw stores about people.

    ``pseudonymise`` replaces user and conversation ids by keyed pseudonyms made with
    ``pseudonym_key``, which is generated and kept in the database when ``None``.
    ``text_mode`` is ``full``, ``redacted`` (e-mail addresses and phone numbers replaced)
    or ``none``. ``keep_raw_payloads`` keeps the bodies of payloads a source could not
    parse, which contain ids and text as the platform sent them.
    ``pseudonymise_conversations`` also replaces the sources' conversation ids, which
    often contain the user id (Rasa's ``sender_id``); turn it off when they are ticket
    numbers that must stay readable.
    """

    pseudonymise: bool = True
    pseudonym_key: Secret | None = None
    text_mode: TextMode = "redacted"
    keep_raw_payloads: bool = False
    pseudonymise_conversations: bool = True

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {', '.join(TEXT_MODES)}, "
                             f"got {self.text_mode!r}")
        if self.pseudonym_key is not None and not isinstance(self.pseudonym_key, Secret):
            raise TypeError("pseudonym_key must be a chatmw.security.Secret")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PrivacySettings:
        """Read ``CHATMW_PSEUDONYMISE``, ``CHATMW_PSEUDONYM_KEY``, ``CHATMW_TEXT_MODE`` and
        ``CHATMW_KEEP_RAW_PAYLOADS``; unset variables keep the defaults."""
        environ = os.environ if environ is None else environ
        key = environ.get(PSEUDONYM_KEY_ENV) or None
        return cls(
            pseudonymise=environ.get(PSEUDONYMISE_ENV, "1").strip().lower() not in FALSE_WORDS,
            pseudonym_key=Secret(key) if key else None,
            text_mode=environ.get(TEXT_MODE_ENV, "redacted").strip().lower(),  # type: ignore[arg-type]
            keep_raw_payloads=environ.get(KEEP_RAW_ENV, "0").strip().lower() in TRUE_WORDS,
        )


class Privacy:
    """Privacy settings resolved for one database: the pseudonymiser and the text rule."""

    def __init__(self, settings: PrivacySettings, pseudonymiser: Pseudonymiser | None) -> None:
        self.settings = settings
        self.pseudonymiser = pseudonymiser

    def __repr__(self) -> str:
        return (f"Privacy(pseudonymise={self.pseudonymiser is not None}, "
                f"text_mode={self.settings.text_mode!r})")

    @classmethod
    def load(cls, settings: PrivacySettings, engine: Engine) -> Privacy:
        """Resolve the pseudonym key (from the settings or the database) for ``engine``."""
        if not settings.pseudonymise:
            return cls(settings, None)
        try:
            key = load_or_create_key(engine, settings.pseudonym_key)
        except Exception as error:
            raise RuntimeError(
                f"the pseudonym key could not be read from the database ({type(error).__name__}):"
                f" run `chatmw db upgrade`, or set {PSEUDONYM_KEY_ENV}") from error
        fields = ("user_id", "conversation_id") if settings.pseudonymise_conversations else (
            "user_id",)
        return cls(settings, Pseudonymiser(key, fields=fields))

    def transform(self, event: Event) -> Event:
        """Return ``event`` as it may be stored: pseudonymised, raw bodies removed."""
        if self.pseudonymiser is not None:
            event = self.pseudonymiser.apply(event)
        if isinstance(event, RawPayload) and not self.settings.keep_raw_payloads and event.body:
            reason = f"{event.reason} (body of {len(event.body)} bytes not kept)"
            event = dataclasses.replace(event, body=b"", reason=reason)
        return event

    def subject_id(self, user_id: str, pseudonymised: bool = False) -> str:
        """Return the id the store keeps for ``user_id`` (its pseudonym when pseudonymising)."""
        if pseudonymised or self.pseudonymiser is None:
            return user_id
        return self.pseudonymiser.pseudonymise(user_id)

    def erasure_ids(self, user_id: str, pseudonymised: bool = False) -> dict[str, Any]:
        """Return the keyword arguments of :func:`~chatmw.security.erasure.erase_person`.

        They name ``user_id`` as stored now (its pseudonym), as stored before pseudonyms
        were turned on (the platform id), and as a conversation id. With
        ``pseudonymised`` the caller passes the stored pseudonym itself.
        """
        if pseudonymised:
            return {"user_id": user_id}
        if self.pseudonymiser is None:
            return {"user_id": user_id, "raw_user_id": user_id}
        return {
            "user_id": self.pseudonymiser.pseudonymise(user_id),
            "stored_ids": [user_id],
            "conversation_ids": [self.pseudonymiser.pseudonymise(user_id, "conversation"),
                                 user_id],
            "raw_user_id": user_id,
        }

    def install(self, writer: Writer, recorder: Recorder | None = None) -> None:
        """Add the text rule to ``writer`` (last enricher) and the transform to ``recorder``.

        ``writer`` gets the transform too, for the events it decodes from chat exchanges.
        """
        enricher = text_enricher(self.settings.text_mode)
        if enricher is not None:
            writer.enrichers.append(enricher)
        writer.transform = self.transform
        if recorder is not None:
            recorder.transform = self.transform
