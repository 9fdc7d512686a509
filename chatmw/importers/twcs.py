"""The "Customer Support on Twitter" dataset (``twcs.csv``) as conversations.

Columns: ``tweet_id, author_id, inbound, created_at, text, response_tweet_id,
in_response_to_tweet_id``. ``inbound`` is ``True`` for a customer's tweet and ``False``
for a company account's. ``created_at`` looks like ``Wed Oct 11 06:55:44 +0000 2017``.
``response_tweet_id`` is empty, one id or a comma-separated list. The dataset writes
``in_response_to_tweet_id`` as a float (``119236.0``).

A conversation is a thread: every tweet followed up through ``in_response_to_tweet_id``
(or, where that is empty, through another tweet's ``response_tweet_id`` list) to its root,
whose id is the conversation id. A root missing from the file still names the thread.
Rows are not in time order, so the first pass keeps every tweet's parent (ids only, no
text) and resolves the roots once the whole file has been read.

Customer tweets are ``user`` messages from their author; company tweets are ``agent``
messages whose contact is the thread's customer (the author of its earliest customer
tweet). The thread's company (the author of its earliest company tweet) becomes the
conversation attribute ``company``. A thread that no company answered takes its company
from the first ``@handle`` of its root tweet when that handle is a company account seen in
the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from chatmw import events as ev
from chatmw.importers.source import Row, RowError, Skipped, TextFile, check_header, read_csv
from chatmw.importers.transcript import MAX_ID_CHARS

__all__ = ["TWCS_COLUMNS", "TwcsSource", "parse_created_at"]

TWCS_COLUMNS = ("tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id",
                "in_response_to_tweet_id")
MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
HANDLE = re.compile(r"@(\w{1,50})")


def parse_created_at(value: str) -> datetime:
    """Parse Twitter's ``Wed Oct 11 06:55:44 +0000 2017`` into an aware datetime."""
    parts = value.split()
    try:
        if len(parts) != 6:
            raise ValueError(value)
        hour, minute, second = (int(part) for part in parts[3].split(":"))
        offset = parts[4]
        if len(offset) != 5 or offset[0] not in "+-":
            raise ValueError(value)
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        if offset[0] == "-":
            delta = -delta
        zone = timezone(delta) if delta else UTC
        return datetime(int(parts[5]), MONTHS[parts[1]], int(parts[2]), hour, minute, second,
                        tzinfo=zone)
    except (ValueError, KeyError):
        raise RowError(f"invalid created_at {value!r}: expected a time such as "
                       "'Wed Oct 11 06:55:44 +0000 2017'") from None


def _tweet_id(value: str | None, column: str) -> int | None:
    # Ids are integers; pandas exports wrote in_response_to_tweet_id as "119236.0".
    value = (value or "").strip()
    if not value:
        return None
    if value.endswith(".0"):
        value = value[:-2]
    # isdigit() alone accepts digits such as "²" that int() rejects.
    if not (value.isascii() and value.isdigit()):
        raise RowError(f"invalid {column} {value!r}: expected a tweet id")
    return int(value)


def _inbound(value: str) -> bool:
    flag = value.strip().lower()
    if flag in ("true", "1"):
        return True
    if flag in ("false", "0"):
        return False
    raise RowError(f"invalid inbound {value!r}: expected True or False")


def _response_ids(value: str) -> list[int]:
    ids = []
    for part in value.split(","):
        tweet_id = _tweet_id(part, "response_tweet_id")
        if tweet_id is not None:
            ids.append(tweet_id)
    return ids


class TwcsSource:
    """Messages from a ``twcs.csv`` file, read in two passes."""

    def __init__(self, file: TextFile, channel: str = "twitter") -> None:
        self.file = file
        self.channel = channel
        self.root_of: dict[int, int] = {}
        self.customer_of: dict[int, str] = {}
        self.company_of: dict[int, str] = {}

    def _records(self, stream: Any) -> Any:
        header, records = read_csv(stream)
        check_header(header, TWCS_COLUMNS)
        return records

    def scan(self) -> None:
        """Read ids, parents and authors of every tweet, then resolve each thread's root."""
        parent: dict[int, int] = {}
        listed_parent: dict[int, int] = {}
        # tweet id -> (time in seconds, author) of customer and company tweets.
        customers: dict[int, tuple[float, str]] = {}
        companies: dict[int, tuple[float, str]] = {}
        mentions: dict[int, str] = {}
        with self.file.open() as stream:
            for record in self._records(stream):
                if record.values is None:
                    continue
                try:
                    self._scan_record(record.values, parent, listed_parent, customers, companies,
                                      mentions)
                except RowError:
                    continue  # reported with its line number on the second pass

        for child, listed in listed_parent.items():
            parent.setdefault(child, listed)
        tweets = set(customers) | set(companies)
        self.root_of = _resolve_roots(tweets, parent)
        self.customer_of = _earliest_author(customers, self.root_of)
        self.company_of = _earliest_author(companies, self.root_of)
        self._companies_from_mentions(mentions, {author for _, author in companies.values()})

    def _scan_record(self, values: dict[str, str], parent: dict[int, int],
                     listed_parent: dict[int, int], customers: dict[int, tuple[float, str]],
                     companies: dict[int, tuple[float, str]], mentions: dict[int, str]) -> None:
        tweet_id = _tweet_id(values["tweet_id"], "tweet_id")
        if tweet_id is None:
            return
        inbound = _inbound(values["inbound"])
        at = parse_created_at(values["created_at"]).timestamp()
        author = values["author_id"].strip()
        if len(author) > MAX_ID_CHARS:
            raise RowError(f"author_id is longer than {MAX_ID_CHARS} characters")
        replied_to = _tweet_id(values["in_response_to_tweet_id"], "in_response_to_tweet_id")
        if replied_to is not None:
            parent[tweet_id] = replied_to
        for child in _response_ids(values["response_tweet_id"]):
            listed_parent.setdefault(child, tweet_id)
        (customers if inbound else companies)[tweet_id] = (at, author)
        if inbound and replied_to is None:
            handle = HANDLE.search(values["text"])
            if handle:
                mentions[tweet_id] = handle.group(1)

    def _companies_from_mentions(self, mentions: dict[int, str], company_authors: set[str]) -> None:
        by_lower = {author.lower(): author for author in company_authors}
        for tweet_id, handle in mentions.items():
            root = self.root_of.get(tweet_id, tweet_id)
            company = by_lower.get(handle.lower())
            if root not in self.company_of and company is not None:
                self.company_of[root] = company

    def rows(self) -> Iterator[Row | Skipped]:
        """Yield each tweet as a message or as the reason it was skipped."""
        with self.file.open() as stream:
            for record in self._records(stream):
                if record.values is None:
                    yield Skipped(record.line, record.error or "unreadable record")
                    continue
                try:
                    yield Row(record.line, self.to_message(record.values))
                except RowError as error:
                    yield Skipped(record.line, str(error))

    def to_message(self, values: dict[str, str]) -> ev.Message:
        """Turn one tweet into a message; raises RowError with the reason it is invalid."""
        tweet_id = _tweet_id(values["tweet_id"], "tweet_id")
        if tweet_id is None:
            raise RowError("empty tweet_id")
        inbound = _inbound(values["inbound"])
        occurred_at = parse_created_at(values["created_at"])
        replied_to = _tweet_id(values["in_response_to_tweet_id"], "in_response_to_tweet_id")
        _response_ids(values["response_tweet_id"])
        author = values["author_id"].strip()
        if not author:
            raise RowError("empty author_id")
        if len(author) > MAX_ID_CHARS:
            raise RowError(f"author_id is longer than {MAX_ID_CHARS} characters")

        root = self.root_of.get(tweet_id, tweet_id)
        conversation_id = str(root)
        user_id = author if inbound else self.customer_of.get(root, conversation_id)
        company = self.company_of.get(root)
        return ev.Message(
            channel=self.channel,
            occurred_at=occurred_at,
            key=f"import:{self.channel}:tweet:{tweet_id}",
            role="user" if inbound else "agent",
            user_id=user_id,
            text=values["text"],
            conversation_id=conversation_id,
            platform_message_id=str(tweet_id),
            reply_to=None if replied_to is None else str(replied_to),
            attributes={"company": company} if company else {},
        )


def _resolve_roots(tweets: set[int], parent: dict[int, int]) -> dict[int, int]:
    """Map each tweet to the root of its thread, following parents with memoisation.

    A root is a tweet without a parent, or a parent that is not in the file. In a cycle
    (which valid data does not have) the smallest id of the cycle is the root.
    """
    root_of: dict[int, int] = {}
    for tweet in tweets:
        if tweet in root_of:
            continue
        path = [tweet]
        on_path = {tweet}
        current = tweet
        while True:
            if current in root_of:
                root = root_of[current]
                break
            above = parent.get(current)
            if above is None:
                root = current
                break
            if above in on_path:
                cycle = path[path.index(above):]
                root = min(cycle)
                break
            path.append(above)
            on_path.add(above)
            current = above
        for node in path:
            root_of[node] = root
    return root_of


def _earliest_author(tweets: dict[int, tuple[float, str]],
                     root_of: dict[int, int]) -> dict[int, str]:
    earliest: dict[int, tuple[float, int, str]] = {}
    for tweet_id, (at, author) in tweets.items():
        root = root_of[tweet_id]
        candidate = (at, tweet_id, author)
        if root not in earliest or candidate < earliest[root]:
            earliest[root] = candidate
    return {root: author for root, (_, _, author) in earliest.items()}
