"""Platform ids of pseudonymised users, kept so that surveys can reach them.

With pseudonymisation on, the store keeps only a keyed pseudonym of each user id, which
cannot be turned back into the id a platform needs. :func:`capture_addresses` wraps the
recorder's transform: before the ids are pseudonymised it copies the platform id of each
user message on a surveyed channel into the message meta under
:data:`ADDRESS_META_KEY`. The survey answer preprocessor moves it from there into
``survey_addresses`` (keyed by the pseudonym) and removes it from the meta, so the
messages table never stores it. Erasure removes the rows with the person's other data
because the table has ``channel`` and ``user_id`` columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.store.models_surveys import SURVEY_ADDRESSES, SurveyAddress

__all__ = [
    "ADDRESS_META_KEY",
    "PSEUDONYM_PREFIX",
    "capture_addresses",
    "install_address_capture",
    "store_addresses",
    "find_address",
]

ADDRESS_META_KEY = "_chatmw_survey_address"
# The prefix of stored pseudonyms (``chatmw.security.pseudonyms.PSEUDONYM_PREFIX``).
PSEUDONYM_PREFIX = "ps_"

Transform = Callable[[ev.Event], ev.Event]


def capture_addresses(transform: Transform | None, channels: Collection[str]) -> Transform:
    """Return a transform that keeps user messages' platform ids, then applies ``transform``."""
    return _CaptureAddresses(transform, frozenset(channels))


@dataclasses.dataclass(frozen=True, slots=True)
class _CaptureAddresses:
    # A class rather than a closure, so that the writer process can receive it.
    transform: Transform | None
    surveyed: frozenset[str]

    def __call__(self, event: ev.Event) -> ev.Event:
        if (isinstance(event, ev.Message) and event.role == "user"
                and event.channel in self.surveyed):
            event = dataclasses.replace(event, meta={**event.meta, ADDRESS_META_KEY: event.user_id})
        return self.transform(event) if self.transform is not None else event


def install_address_capture(recorder: object, channels: Collection[str]) -> None:
    """Wrap ``recorder.transform`` (install privacy first, so that this runs before it)."""
    current = getattr(recorder, "transform", None)
    recorder.transform = capture_addresses(current, channels)  # type: ignore[attr-defined]


def store_addresses(
    session: Session, addresses: Mapping[tuple[str, str], str], now_ms: int
) -> None:
    """Insert or update ``(channel, stored user id) -> platform id`` rows."""
    rows = [
        {
            "channel": channel,
            "user_id": user_id,
            "platform_id": platform_id,
            "created_at_ms": now_ms,
        }
        for (channel, user_id), platform_id in sorted(addresses.items())
        if platform_id != user_id
    ]
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(SURVEY_ADDRESSES)
    statement = statement.on_conflict_do_update(
        index_elements=["channel", "user_id"],
        set_={
            "platform_id": statement.excluded.platform_id,
            "created_at_ms": statement.excluded.created_at_ms,
        },
    )
    session.execute(statement, rows)


def find_address(session: Session, channel: str, user_id: str) -> str | None:
    """Return the platform id to send to for a stored user id, or ``None`` if unknown.

    A stored id that is not a pseudonym is the platform id itself.
    """
    platform_id = session.execute(
        select(SurveyAddress.platform_id).where(
            SurveyAddress.channel == channel, SurveyAddress.user_id == user_id
        )
    ).scalar_one_or_none()
    if platform_id is not None:
        return platform_id
    return None if user_id.startswith(PSEUDONYM_PREFIX) else user_id
