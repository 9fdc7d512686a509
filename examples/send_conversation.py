"""Send the FAQ bot a short conversation over HTTP, print the replies and the metrics summary.

    chatmw demo &                                # or: python examples/faq_bot.py
    python examples/send_conversation.py --url http://127.0.0.1:8000

Only httpx is needed, so the script also runs against a bot on another machine of yours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import httpx

CONVERSATION = (
    "Hello!",
    "What are your opening hours?",
    "How much does the Pro plan cost?",
    "Can I get a refund?",
    "Thanks, that solved it.",
)


def send_conversation(client: httpx.Client, user_id: str,
                      messages: tuple[str, ...] = CONVERSATION,
                      conversation_id: str | None = None) -> list[dict[str, Any]]:
    """Post each message to ``/chat`` in turn, print the exchange and return the replies."""
    replies: list[dict[str, Any]] = []
    for message in messages:
        body: dict[str, str] = {"user_id": user_id, "message": message}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        started = time.perf_counter()
        response = client.post("/chat", json=body)
        elapsed_ms = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        print(f"user> {message}")
        for reply in response.json()["replies"]:
            replies.append(reply)
            print(f"bot > {reply['text']}  [{reply['intent']}, {elapsed_ms:.0f} ms]")
    return replies


def fetch_summary(client: httpx.Client, expected_messages: int,
                  timeout_s: float = 5.0) -> dict[str, Any]:
    """Return ``/metrics/summary`` once it counts ``expected_messages`` (the writer is async)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/metrics/summary")
        response.raise_for_status()
        summary: dict[str, Any] = response.json()
        if summary["totals"]["messages"] >= expected_messages or time.monotonic() > deadline:
            return summary
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Run the conversation against ``--url`` and print the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the bot")
    parser.add_argument("--user", default=f"visitor-{uuid.uuid4().hex[:8]}",
                        help="user id to send as (default: a new random visitor)")
    parser.add_argument("--conversation-id", default=None,
                        help="conversation id to send (default: none, so chatmw sessionises)")
    args = parser.parse_args(argv)

    with httpx.Client(base_url=args.url, timeout=10.0) as client:
        try:
            before = client.get("/metrics/summary").json()["totals"]["messages"]
            replies = send_conversation(client, args.user, conversation_id=args.conversation_id)
            summary = fetch_summary(client, before + len(CONVERSATION) + len(replies))
        except httpx.HTTPError as error:
            print(f"request to {args.url} failed: {error}; is the bot running?", file=sys.stderr)
            return 1
    print("\nGET /metrics/summary")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
