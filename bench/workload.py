"""Synthetic chat traffic: a stream of message events shaped like a live deployment.

Many conversations are open at once and their messages interleave, as on a busy bot:
each conversation alternates user and bot messages a few seconds apart, about a third
have no conversation id (the writer sessionises them by silence), and first messages
carry attributes. User texts are English support-chat sentences with openers and order
numbers, nearly all distinct, so the sentiment enricher scores every one of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from chatmw import events as ev

CHANNELS = ("web", "messenger", "whatsapp")
USER_TEXTS = (
    "hi, I need help with my order please",
    "my package still has not arrived and I am really annoyed",
    "thanks a lot, that was very helpful!",
    "how much does the pro plan cost per month?",
    "I want a refund, the product is broken",
    "can I talk to a human agent please",
    "what are your opening hours on saturday",
    "great service, thank you so much",
    "I forgot my password and cannot log in",
    "this is the worst experience I have ever had",
)
BOT_TEXTS = (
    "Hi! Ask me about opening hours, prices, shipping, refunds or your password.",
    "Orders ship within 2 working days; delivery takes 3 to 5 days.",
    "You can return any order within 30 days for a full refund.",
    "Use 'Forgot password' on the sign-in page and follow the link we email you.",
    "I am passing you to a colleague; they will reply here shortly.",
)
OPENERS = ("hello,", "hey", "ok so", "sorry but", "quick question:", "good morning,", "um")
INTENTS = ("greeting", "shipping", "refund", "password_reset", "human", "pricing")
PLANS = ("free", "basic", "pro")
COUNTRIES = ("fr", "de", "us", "gb", "es", "it")


def message_stream(
    seed: int = 7, open_conversations: int = 2000, prefix: str = "b", start: datetime | None = None
) -> Iterator[ev.Message]:
    """Yield messages forever from ``open_conversations`` interleaved conversations."""
    rng = random.Random(seed)
    clock = start or datetime(2025, 1, 1, tzinfo=UTC)
    serial = 0
    slots: list[dict[str, object]] = [
        _new_conversation(rng, prefix, i) for i in range(open_conversations)
    ]
    while True:
        index = rng.randrange(open_conversations)
        state = slots[index]
        clock += timedelta(milliseconds=rng.randint(1, 40))
        turn = int(state["turn"])  # type: ignore[call-overload]
        role = "user" if turn % 2 == 0 else "bot"
        serial += 1
        attributes = state["attributes"] if turn == 0 else {}
        yield ev.Message(
            channel=str(state["channel"]),
            occurred_at=clock,
            key=f"{prefix}:{serial}",
            role=role,  # type: ignore[arg-type]
            user_id=str(state["user"]),
            text=_user_text(rng) if role == "user" else rng.choice(BOT_TEXTS),
            conversation_id=state["conversation"],  # type: ignore[arg-type]
            intent=rng.choice(INTENTS) if role == "bot" else None,
            latency_ms=float(rng.randint(20, 900)) if role == "bot" else None,
            attributes=attributes,  # type: ignore[arg-type]
        )
        state["turn"] = turn + 1
        if turn + 1 >= int(state["length"]):  # type: ignore[call-overload]
            slots[index] = _new_conversation(rng, prefix, serial)


def _user_text(rng: random.Random) -> str:
    # Users rarely write the same text twice: an opener, a sentence and an order number
    # make nearly every text distinct, so no cache of scored texts helps the writer.
    text = rng.choice(USER_TEXTS)
    if rng.random() < 0.5:
        text = f"{rng.choice(OPENERS)} {text}"
    return f"{text} (order {rng.randrange(10**6)})" if rng.random() < 0.8 else text


def _new_conversation(rng: random.Random, prefix: str, number: int) -> dict[str, object]:
    user = f"{prefix}u{rng.randrange(10**9)}"
    named = rng.random() < 0.66
    return {
        "channel": rng.choice(CHANNELS),
        "user": user,
        "conversation": f"{prefix}c{number}-{rng.randrange(10**9)}" if named else None,
        "turn": 0,
        "length": rng.randint(2, 12),
        "attributes": {"plan": rng.choice(PLANS), "country": rng.choice(COUNTRIES)},
    }
