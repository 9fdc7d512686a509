"""Generated stores for the query benchmark, cached under bench/.data/.

Rows are written straight into the tables (COPY on PostgreSQL, executemany on SQLite),
not through the writer, with the derived columns the writer would set (conversation
counts and first response, message response times, first and last touch). The mix:
three channels, 90 days of traffic with a daily and weekly rhythm, conversations of 2
to 12 messages, plan, country and company attributes, UTM touches of eight campaigns on
60 % of conversations, CSAT and NPS survey answers on 20 %, conversions and leads on a
few percent, and daily spend per campaign.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg

from bench.common import (
    DATA_DIR,
    postgres_database_exists,
    postgres_url,
    recreate_postgres_database,
)
from bench.workload import BOT_TEXTS, CHANNELS, COUNTRIES, INTENTS, PLANS, USER_TEXTS
from chatmw.store import models_business, models_surveys  # noqa: F401 - registers the tables
from chatmw.store.engine import make_engine, upgrade

START = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 90
START_MS = int(START.timestamp() * 1000)
CAMPAIGNS = (
    "spring_sale",
    "brand",
    "retargeting",
    "newsletter",
    "launch",
    "partner",
    "search",
    "social",
)
SOURCES = ("google", "facebook", "newsletter", "instagram", "bing")
COMPANIES = tuple(f"company-{i}" for i in range(200))
VERSION = 1

MESSAGE_COLUMNS = (
    "id",
    "key",
    "conversation_id",
    "contact_id",
    "channel",
    "role",
    "kind",
    "text",
    "occurred_at_ms",
    "latency_ms",
    "response_ms",
    "is_first_response",
    "intent",
    "sentiment",
)
CONVERSATION_COLUMNS = (
    "id",
    "channel",
    "external_id",
    "contact_id",
    "started_at_ms",
    "last_message_at_ms",
    "ended_at_ms",
    "ended_reason",
    "message_count",
    "user_message_count",
    "first_response_ms",
    "first_response_role",
    "resolved",
    "handed_off",
    "intent",
    "last_step",
    "first_touch_id",
    "last_touch_id",
)
CONTACT_COLUMNS = (
    "id",
    "channel",
    "external_id",
    "first_seen_ms",
    "last_seen_ms",
    "last_user_message_ms",
    "first_touch_id",
    "last_touch_id",
)
TOUCH_COLUMNS = (
    "id",
    "key",
    "contact_id",
    "conversation_id",
    "channel",
    "kind",
    "occurred_at_ms",
    "source",
    "medium",
    "campaign",
)
ATTRIBUTE_COLUMNS = ("conversation_id", "name", "value")
SURVEY_COLUMNS = (
    "id",
    "conversation_id",
    "contact_id",
    "channel",
    "name",
    "kind",
    "trigger",
    "state",
    "locale",
    "created_at_ms",
    "sent_at_ms",
    "answered_at_ms",
    "score",
    "comment_window_ms",
    "reasks",
    "used_template",
)
CONVERSION_COLUMNS = (
    "id",
    "key",
    "name",
    "value_micros",
    "currency",
    "channel",
    "user_id",
    "conversation_external_id",
    "occurred_at_ms",
)
LEAD_COLUMNS = (
    "id",
    "key",
    "channel",
    "user_id",
    "conversation_id",
    "conversation_external_id",
    "kind",
    "value_hash",
    "origin",
    "score",
    "occurred_at_ms",
)
SPEND_COLUMNS = ("id", "day", "channel", "campaign", "amount_micros", "currency", "updated_at_ms")


class Tables:
    """Rows of every table, produced conversation by conversation."""

    def __init__(self) -> None:
        self.messages: list[tuple[object, ...]] = []
        self.conversations: list[tuple[object, ...]] = []
        self.contacts: dict[int, list[object]] = {}
        self.touches: list[tuple[object, ...]] = []
        self.attributes: list[tuple[object, ...]] = []
        self.surveys: list[tuple[object, ...]] = []
        self.conversions: list[tuple[object, ...]] = []
        self.leads: list[tuple[object, ...]] = []


def _conversation_start(rng: random.Random) -> int:
    # Busier on weekdays and in working hours (UTC), quieter at night.
    while True:
        offset_s = rng.random() * DAYS * 86400
        moment = START + timedelta(seconds=offset_s)
        weight = (0.6 if moment.weekday() >= 5 else 1.0) * (1.0 if 8 <= moment.hour < 20 else 0.35)
        if rng.random() < weight:
            return START_MS + int(offset_s * 1000)


def generate(messages: int, chunk: int = 200_000) -> Iterator[Tables]:
    """Yield rows in chunks of about ``chunk`` messages, ids consistent across chunks."""
    rng = random.Random(2024)
    contacts_total = max(10, messages // 20)
    message_id = conversation_id = touch_id = survey_id = conversion_id = lead_id = 0
    tables = Tables()
    produced = 0
    contact_state: dict[int, list[object]] = {}
    while produced < messages:
        conversation_id += 1
        contact_id = rng.randrange(1, contacts_total + 1)
        channel = CHANNELS[contact_id % 3]
        started = _conversation_start(rng)
        length = min(rng.randint(2, 12), messages - produced)
        at = started
        run_started: int | None = None
        first_response: tuple[float, str] | None = None
        user_count = 0
        last_intent = None
        for turn in range(length):
            if turn:
                at += rng.randint(1_000, 120_000)
            role = "user" if turn % 2 == 0 else ("agent" if rng.random() < 0.1 else "bot")
            message_id += 1
            response_ms = None
            is_first = False
            if role == "user":
                user_count += 1
                run_started = run_started if run_started is not None else at
                text = rng.choice(USER_TEXTS)
                sentiment: float | None = (
                    round(rng.uniform(-1, 1), 4) if rng.random() < 0.9 else None
                )
                intent = None
            else:
                if run_started is not None:
                    response_ms = float(at - run_started)
                    if first_response is None:
                        first_response = (response_ms, role)
                        is_first = True
                    run_started = None
                text = rng.choice(BOT_TEXTS)
                sentiment = None
                intent = rng.choice(INTENTS)
                last_intent = last_intent or intent
            tables.messages.append(
                (
                    message_id,
                    f"g:{message_id}",
                    conversation_id,
                    contact_id,
                    channel,
                    role,
                    "message",
                    text,
                    at,
                    float(rng.randint(20, 900)) if role != "user" else None,
                    response_ms,
                    is_first,
                    intent,
                    sentiment,
                )
            )
        produced += length
        ended = at + 60_000 if rng.random() < 0.7 else None
        resolved = rng.random() < 0.6 if ended else None
        first_touch = last_touch = None
        if rng.random() < 0.6:
            for _ in range(rng.choice((1, 1, 2))):
                touch_id += 1
                campaign = rng.choice(CAMPAIGNS)
                tables.touches.append(
                    (
                        touch_id,
                        f"t:{touch_id}",
                        contact_id,
                        conversation_id,
                        channel,
                        "link",
                        started - rng.randint(1_000, 600_000),
                        rng.choice(SOURCES),
                        rng.choice(("cpc", "email", "social")),
                        campaign,
                    )
                )
                first_touch = first_touch or touch_id
                last_touch = touch_id
        tables.conversations.append(
            (
                conversation_id,
                channel,
                f"gc{conversation_id}",
                contact_id,
                started,
                at,
                ended,
                "bot" if ended else None,
                length,
                user_count,
                first_response[0] if first_response else None,
                first_response[1] if first_response else None,
                resolved,
                rng.random() < 0.08,
                last_intent,
                rng.choice(("start", "menu", "details", "checkout")),
                first_touch,
                last_touch,
            )
        )
        tables.attributes += [
            (conversation_id, "plan", rng.choice(PLANS)),
            (conversation_id, "country", rng.choice(COUNTRIES)),
        ]
        if rng.random() < 0.5:
            tables.attributes.append((conversation_id, "company", rng.choice(COMPANIES)))
        if ended and rng.random() < 0.2:
            survey_id += 1
            kind = rng.choice(("csat", "nps"))
            answered = rng.random() < 0.6
            score = (
                (rng.randint(1, 5) if kind == "csat" else rng.randint(0, 10)) if answered else None
            )
            tables.surveys.append(
                (
                    survey_id,
                    conversation_id,
                    contact_id,
                    channel,
                    "default",
                    kind,
                    "ended",
                    "answered" if answered else "unanswered",
                    "en",
                    ended,
                    ended + 5_000,
                    ended + 60_000 if answered else None,
                    score,
                    0,
                    0,
                    False,
                )
            )
        if rng.random() < 0.03:
            conversion_id += 1
            tables.conversions.append(
                (
                    conversion_id,
                    f"cv:{conversion_id}",
                    "purchase",
                    rng.randint(5, 500) * 1_000_000,
                    "EUR",
                    channel,
                    f"user{contact_id}",
                    f"gc{conversation_id}",
                    at + 3_600_000,
                )
            )
        if rng.random() < 0.03:
            lead_id += 1
            tables.leads.append(
                (
                    lead_id,
                    f"ld:{lead_id}",
                    channel,
                    f"user{contact_id}",
                    conversation_id,
                    f"gc{conversation_id}",
                    "email",
                    f"{lead_id:064x}",
                    "message",
                    round(rng.random(), 3),
                    at,
                )
            )
        state = contact_state.get(contact_id)
        if state is None:
            contact_state[contact_id] = [
                contact_id,
                channel,
                f"user{contact_id}",
                started,
                at,
                at,
                first_touch,
                last_touch,
            ]
        else:
            state[3] = min(state[3], started)  # type: ignore[type-var]
            state[4] = max(state[4], at)  # type: ignore[type-var]
            state[5] = max(state[5], at)  # type: ignore[type-var]
            state[6] = state[6] or first_touch
            state[7] = last_touch or state[7]
        if len(tables.messages) >= chunk:
            yield tables
            tables = Tables()
    tables.contacts = contact_state
    yield tables


def spend_rows() -> list[tuple[object, ...]]:
    rows = []
    rng = random.Random(5)
    for day in range(DAYS):
        for channel in CHANNELS:
            for campaign in CAMPAIGNS:
                rows.append(
                    (
                        len(rows) + 1,
                        date(2025, 1, 1) + timedelta(days=day),
                        channel,
                        campaign,
                        rng.randint(10, 300) * 1_000_000,
                        "EUR",
                        START_MS,
                    )
                )
    return rows


def _batches(tables: Tables) -> list[tuple[str, tuple[str, ...], list[tuple[object, ...]]]]:
    return [
        ("conversations", CONVERSATION_COLUMNS, tables.conversations),
        ("messages", MESSAGE_COLUMNS, tables.messages),
        ("touches", TOUCH_COLUMNS, tables.touches),
        ("conversation_attributes", ATTRIBUTE_COLUMNS, tables.attributes),
        ("surveys", SURVEY_COLUMNS, tables.surveys),
        ("conversions", CONVERSION_COLUMNS, tables.conversions),
        ("leads", LEAD_COLUMNS, tables.leads),
    ]


def _fill_sqlite(path: Path, messages: int) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA foreign_keys=OFF")
    connection.execute("PRAGMA synchronous=OFF")
    contacts: dict[int, list[object]] = {}
    for tables in generate(messages):
        for table, columns, rows in _batches(tables):
            if rows:
                marks = ", ".join("?" for _ in columns)
                connection.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
                )
        contacts.update(tables.contacts)
        connection.commit()
    connection.executemany(
        f"INSERT INTO contacts ({', '.join(CONTACT_COLUMNS)}) VALUES "
        f"({', '.join('?' for _ in CONTACT_COLUMNS)})",
        [tuple(v) for v in contacts.values()],
    )
    connection.executemany(
        f"INSERT INTO spend ({', '.join(SPEND_COLUMNS)}) VALUES "
        f"({', '.join('?' for _ in SPEND_COLUMNS)})",
        [(*row[:1], row[1].isoformat(), *row[2:]) for row in spend_rows()],
    )  # type: ignore[union-attr]
    connection.commit()
    connection.execute("ANALYZE")
    connection.close()


def _fill_postgres(url: str, messages: int) -> None:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as connection:
        connection.execute("SET session_replication_role = replica")  # skip FK triggers
        contacts: dict[int, list[object]] = {}
        for tables in generate(messages):
            for table, columns, rows in _batches(tables):
                if not rows:
                    continue
                with connection.cursor().copy(
                    f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            contacts.update(tables.contacts)
            connection.commit()
        for table, columns, rows in (
            ("contacts", CONTACT_COLUMNS, [tuple(v) for v in contacts.values()]),
            ("spend", SPEND_COLUMNS, spend_rows()),
        ):
            with connection.cursor().copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
        for table in (
            "contacts",
            "conversations",
            "messages",
            "touches",
            "surveys",
            "conversions",
            "leads",
            "spend",
        ):
            connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT coalesce(max(id), 1) FROM {table}))"
            )
        connection.commit()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


def prepared_url(database: str, messages: int) -> str:
    """Return the URL of a store of ``messages`` messages, generating it the first time."""
    label = f"{messages // 1_000_000}m" if messages >= 1_000_000 else f"{messages // 1000}k"
    if database == "sqlite":
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        path = DATA_DIR / f"queries_{label}_v{VERSION}.db"
        if not path.exists():
            started = time.perf_counter()
            partial = path.with_suffix(".part")
            partial.unlink(missing_ok=True)
            engine = make_engine(f"sqlite:///{partial}")
            upgrade(engine)
            engine.dispose()
            _fill_sqlite(partial, messages)
            partial.rename(path)
            print(f"generated {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
        return f"sqlite:///{path}"
    name = f"chatmw_bench_q{label}_v{VERSION}"
    marker = DATA_DIR / f"{name}.ready"
    if postgres_database_exists(name) and marker.exists():
        return postgres_url(name)
    started = time.perf_counter()
    url = recreate_postgres_database(name)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    _fill_postgres(url, messages)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"messages": messages}))
    print(f"generated {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return url
