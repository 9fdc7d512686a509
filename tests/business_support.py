"""A generated chat history with conversions, leads and spend, and its expected figures.

``World.generate`` draws users, conversations, touches, conversions, leads, exposures and
spend from a seeded random generator and keeps them as plain Python records. The
``expected_*`` functions compute each metric's figures from those records alone, with
the definitions written out again here, never by calling chatmw's metric code.
"""

from __future__ import annotations

import os
import random
import secrets
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, insert, text
from sqlalchemy.engine import make_url

from chatmw import events as ev
from chatmw.business import BusinessSettings, install
from chatmw.business_detect import parse_query_rules
from chatmw.events_business import Conversion, Spend
from chatmw.store.engine import make_engine, upgrade
from chatmw.store.models_surveys import Survey
from chatmw.store.writer import Writer

T0 = datetime(2024, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
STEPS = ("greet", "ask", "pay")
CAMPAIGNS = ("spring", "summer", None)
SOURCES = ("google", "facebook", None)
RULES = [
    {"type": "refund", "keywords": ["refund", "money back"]},
    {"type": "delivery", "pattern": r"deliver(y|ed)?\b"},
]
TEXTS = ("I want a refund please", "where is my delivery", "hello there", "what are your prices")


PG_ADMIN_URL = os.environ.get("CHATMW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_database(backend: str, directory: str) -> Iterator[str]:
    """Yield the URL of a new migrated database (SQLite file or PostgreSQL), dropped afterwards.

    Module-scoped fixtures use it: no function-scoped fixture empties it between tests.
    """
    if backend == "sqlite":
        url = f"sqlite:///{directory}/business.db"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"chatmw_test_business_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin.url).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def world_engine(backend: str, directory: str) -> Iterator[tuple[Engine, World]]:
    """Yield an engine on a fresh database holding the generated world.

    Writing the world takes seconds, so a test module writes it once per backend.
    """
    with fresh_database(backend, directory) as url:
        engine = make_engine(url)
        try:
            world = World.generate()
            world.write(engine)
            yield engine, world
        finally:
            engine.dispose()


def rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else round(numerator / denominator, 4)


def money(micros: int) -> str:
    value = Decimal(micros) / 1_000_000
    text = f"{value.normalize():f}"
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


@dataclass
class ConversationRecord:
    id: str
    channel: str
    user: str
    start: datetime
    messages: list[tuple[datetime, str, str | None, str]] = field(default_factory=list)
    resolved: bool = False
    handed_off: bool = False
    ended_at: datetime | None = None
    step: str | None = None
    touches: list[dict] = field(default_factory=list)
    csat: int | None = None

    @property
    def end(self) -> datetime:
        return self.ended_at or max(moment for moment, *_ in self.messages)

    @property
    def user_messages(self) -> int:
        return sum(1 for _, role, _, _ in self.messages if role == "user")

    @property
    def proactive(self) -> bool:
        return min(self.messages)[1] != "user"

    @property
    def intent(self) -> str | None:
        for _, _, intent, _ in sorted(self.messages):
            if intent:
                return intent
        return None

    @property
    def first_user_text(self) -> str | None:
        texts = [(moment, text) for moment, role, _, text in self.messages if role == "user"]
        return min(texts)[1] if texts else None

    @property
    def bot_intents(self) -> list[str]:
        return [intent for _, role, intent, _ in sorted(self.messages) if role == "bot" and intent]


@dataclass
class ConversionRecord:
    """A conversion, named by user (``conversation`` is None) or by conversation."""

    key: str
    channel: str
    user: str | None
    conversation: str | None
    at: datetime
    micros: int
    name: str


@dataclass
class World:
    conversations: list[ConversationRecord] = field(default_factory=list)
    conversions: list[ConversionRecord] = field(default_factory=list)
    exposures: list[tuple[str, str, datetime]] = field(default_factory=list)
    spend: list[tuple[date, str, str, int]] = field(default_factory=list)
    leads: list[tuple[str, str, str, str, datetime, str | None, float | None]] = field(
        default_factory=list
    )

    @classmethod
    def generate(cls, seed: int = 7) -> World:
        rng = random.Random(seed)
        world = cls()
        users = [("web", f"w{i}") for i in range(24)] + [("messenger", f"m{i}") for i in range(12)]
        users.append(("whatsapp", "wa0"))
        for channel, user in users:
            start = T0 + timedelta(hours=rng.randrange(0, 20 * 24))
            for number in range(rng.choice((1, 1, 2, 3))):
                world._conversation(rng, channel, user, f"{user}-c{number}", start)
                start += timedelta(hours=rng.choice((3, 20, 30, 100)))
        for index, (channel, user) in enumerate(users):
            if channel == "web" and index % 3 != 2:
                first = min(c.start for c in world.conversations if c.user == user)
                world.exposures.append((channel, user, first - timedelta(minutes=2)))
        world.exposures.append(("web", "visitor-only", T0 + 6 * DAY))
        world.exposures.append(("web", "visitor-late", T0 + 40 * DAY))
        world._conversions(rng)
        world._spend(rng)
        return world

    def _conversation(
        self, rng: random.Random, channel: str, user: str, conv_id: str, start: datetime
    ) -> None:
        conv = ConversationRecord(conv_id, channel, user, start)
        at = start
        proactive = channel == "messenger" and rng.random() < 0.3
        if proactive:
            conv.messages.append((at, "bot", None, "news for you"))
            at += timedelta(seconds=30)

        first_intent = rng.choice((None, "billing", "shipping"))
        text = rng.choice(TEXTS)
        lead = rng.random()
        if lead < 0.2:
            text += f" mail {user}@Example.com"
        elif lead < 0.3:
            text += f" call +33 6 12 {len(self.conversations):02d} 45 67"

        if not (proactive and rng.random() < 0.5):
            conv.messages.append((at, "user", None, text))
            at += timedelta(seconds=5)
            conv.messages.append((at, "bot", first_intent, "ok"))
            for step in STEPS[: rng.randrange(0, 4)]:
                at += timedelta(seconds=20)
                conv.messages.append((at, "user", None, "next"))
                at += timedelta(seconds=3)
                conv.messages.append((at, "bot", step, step))

        conv.resolved = rng.random() < 0.5
        conv.handed_off = rng.random() < 0.2
        if rng.random() < 0.5:
            conv.ended_at = at + timedelta(minutes=2)
        if rng.random() < 0.3:
            conv.step = rng.choice(STEPS)

        if rng.random() < 0.6:
            conv.touches.append(
                {
                    "at": start - timedelta(minutes=5),
                    "source": rng.choice(SOURCES),
                    "medium": "cpc",
                    "campaign": rng.choice(CAMPAIGNS),
                    "ad": f"ad{rng.randrange(3)}",
                }
            )
            if rng.random() < 0.4:
                conv.touches.append(
                    {
                        "at": start - timedelta(minutes=1),
                        "source": rng.choice(SOURCES),
                        "medium": "social",
                        "campaign": rng.choice(CAMPAIGNS),
                        "ad": None,
                    }
                )

        if rng.random() < 0.4:
            conv.csat = rng.randrange(1, 6)

        self.conversations.append(conv)
        for moment, role, _, message_text in conv.messages:
            if role != "user":
                continue
            if "mail " in message_text:
                value = f"{user}@example.com"
                self.leads.append((channel, user, "email", value, moment, conv_id, None))
            if "call " in message_text:
                digits = "".join(ch for ch in message_text.split("call ")[1] if ch.isdigit())
                self.leads.append((channel, user, "phone", "+" + digits, moment, conv_id, None))

    def _conversions(self, rng: random.Random) -> None:
        for index, conv in enumerate(self.conversations):
            roll = rng.random()
            micros = rng.randrange(1, 20000) * 10_000
            if roll < 0.25:
                at = conv.start + timedelta(hours=rng.choice((1, 30, 24 * 6, 24 * 9)))
                self.conversions.append(
                    ConversionRecord(
                        f"u{index}",
                        conv.channel,
                        conv.user,
                        None,
                        at,
                        micros,
                        rng.choice(("purchase", "signup")),
                    )
                )
            elif roll < 0.35:
                at = conv.start + timedelta(days=rng.choice((0, 12)), minutes=30)
                self.conversions.append(
                    ConversionRecord(
                        f"c{index}", conv.channel, None, conv.id, at, micros, "purchase"
                    )
                )
        # A conversion of a user who never chatted, and one naming an unknown conversation.
        self.conversions.append(
            ConversionRecord("ghost", "web", "nobody", None, T0 + 3 * DAY, 5_000_000, "purchase")
        )
        self.conversions.append(
            ConversionRecord("lost", "web", None, "no-such", T0 + 3 * DAY, 7_000_000, "purchase")
        )

    def _spend(self, rng: random.Random) -> None:
        for offset in range(0, 22):
            day = (T0 + offset * DAY).date()
            for channel, campaign in (
                ("web", "spring"),
                ("web", "summer"),
                ("messenger", "spring"),
                ("web", ""),
            ):
                if rng.random() < 0.7:
                    self.spend.append((day, channel, campaign, rng.randrange(100, 5000) * 10_000))

    # Writing

    def write(self, engine: Engine, redact: bool = True) -> Writer:
        writer = Writer(engine)
        install(
            writer,
            BusinessSettings(
                currency="EUR", redact_leads=redact, query_rules=parse_query_rules(RULES)
            ),
        )
        for conv in self.conversations:
            writer.write(
                [
                    ev.Message(
                        channel=conv.channel,
                        occurred_at=moment,
                        key=f"{conv.id}-{n}",
                        role=role,
                        user_id=conv.user,
                        text=text,
                        conversation_id=conv.id,
                        intent=intent,
                    )  # type: ignore[arg-type]
                    for n, (moment, role, intent, text) in enumerate(sorted(conv.messages))
                ]
            )

        updates, touches = [], []
        for conv in self.conversations:
            updates.append(
                ev.ConversationUpdate(
                    channel=conv.channel,
                    occurred_at=conv.ended_at or conv.end,
                    user_id=conv.user,
                    conversation_id=conv.id,
                    ended=True if conv.ended_at else None,
                    resolved=conv.resolved,
                    handed_off=conv.handed_off,
                    step=conv.step,
                )
            )
            for n, touch in enumerate(conv.touches):
                touches.append(
                    ev.Touch(
                        channel=conv.channel,
                        occurred_at=touch["at"],
                        key=f"{conv.id}-t{n}",
                        user_id=conv.user,
                        conversation_id=conv.id,
                        source=touch["source"],
                        medium=touch["medium"],
                        campaign=touch["campaign"],
                        ad_id=touch["ad"],
                    )
                )

        writer.write(updates)
        writer.write(touches)

        writer.write(
            [
                ev.Exposure(
                    channel=channel,
                    occurred_at=at,
                    key=f"x-{user}-{at.timestamp()}",
                    user_id=user,
                    kind="impression",
                )
                for channel, user, at in self.exposures
            ]
        )
        writer.write(
            [
                Conversion(
                    channel=c.channel,
                    occurred_at=c.at,
                    key=c.key,
                    name=c.name,
                    value_micros=c.micros,
                    currency="EUR",
                    user_id=c.user,
                    conversation_id=c.conversation,
                )
                for c in self.conversions
            ]
        )
        writer.write(
            [
                Spend.for_day(day, channel, Decimal(m) / 1_000_000, "EUR", campaign)
                for day, channel, campaign, m in self.spend
            ]
        )

        self._write_surveys(engine)
        return writer

    def _write_surveys(self, engine: Engine) -> None:
        from sqlalchemy import select

        from chatmw.store.models import Conversation

        with engine.begin() as connection:
            ids = dict(connection.execute(select(Conversation.external_id, Conversation.id)).all())
            rows = [
                {
                    "conversation_id": ids[conv.id],
                    "channel": conv.channel,
                    "name": "csat",
                    "kind": "csat",
                    "trigger": "end",
                    "state": "answered",
                    "locale": "en",
                    "created_at_ms": ev.to_ms(conv.end),
                    "comment_window_ms": 0,
                    "score": conv.csat,
                    "reasks": 0,
                    "used_template": False,
                }
                for conv in self.conversations
                if conv.csat is not None
            ]
            if rows:
                connection.execute(insert(Survey), rows)

    # Expected figures, from the records alone

    def in_window(
        self, since: datetime | None, until: datetime | None, channel: str | None = None
    ) -> list[ConversationRecord]:
        return [
            c
            for c in self.conversations
            if (since is None or c.start >= since)
            and (until is None or c.start < until)
            and (channel is None or c.channel == channel)
        ]

    def attributed(self, days: float = 7) -> dict[str, set[str]]:
        """Return conversion key -> conversation ids it is attributed to."""
        by_id = {c.id: c for c in self.conversations}
        result: dict[str, set[str]] = defaultdict(set)
        for conversion in self.conversions:
            if conversion.conversation is not None:
                if conversion.conversation in by_id:
                    result[conversion.key].add(conversion.conversation)
                continue
            # A conversation with no user message has no contact in the store (the writer
            # takes a named conversation's contact from its first user message).
            for conv in self.conversations:
                if (
                    conv.channel == conversion.channel
                    and conv.user == conversion.user
                    and conv.user_messages >= 1
                    and conversion.at - timedelta(days=days) <= conv.start <= conversion.at
                ):
                    result[conversion.key].add(conv.id)
        return result

    def conversion_owner(self, conversion: ConversionRecord) -> tuple[str, str] | None:
        if conversion.user is not None:
            return (conversion.channel, conversion.user)
        for conv in self.conversations:
            if conv.id == conversion.conversation and conv.user_messages >= 1:
                return (conv.channel, conv.user)
        return None

    def contact(self, conv: ConversationRecord) -> tuple[str, str] | None:
        return (conv.channel, conv.user) if conv.user_messages >= 1 else None

    def last_touch(self, conv: ConversationRecord) -> dict | None:
        return max(conv.touches, key=lambda t: t["at"]) if conv.touches else None

    def first_touch(self, conv: ConversationRecord) -> dict | None:
        return min(conv.touches, key=lambda t: t["at"]) if conv.touches else None
