"""Channel performance: one row per channel with volume, engagement, outcomes and quality."""

from __future__ import annotations

import dataclasses
import importlib
from collections import defaultdict
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, case, func, inspect, select

from chatmw.metrics.engagement_rollups import conversation_counts
from chatmw.metrics.filters import GroupBy, MetricFilter
from chatmw.metrics.outcome_query import surveys_in
from chatmw.metrics.registry import MetricSpec, register
from chatmw.metrics.response_time import (
    EXACT,
    collect_durations,
    describe_responses,
    exact_requested,
)
from chatmw.metrics.rollup_distinct import distinct_starters
from chatmw.metrics.rollup_query import Buckets, Coverage, cover
from chatmw.metrics.scope import conversation_scope
from chatmw.metrics.sentiment import mean_polarity
from chatmw.metrics.sentiment_rollups import sentiment_in
from chatmw.metrics.started_query import add_messages, add_responses, new_responses
from chatmw.metrics.stats import describe_seconds, rate
from chatmw.store.derive import UNTIMED_KINDS
from chatmw.store.models import Base, Conversation, Message

try:
    # Conversion figures come from the conversion metric, so both give the same numbers.
    from chatmw.metrics import conversion as _conversion
except ModuleNotFoundError as error:
    if error.name != "chatmw.metrics.conversion":
        raise
    _conversion = None  # type: ignore[assignment]

__all__ = [
    "channel_performance",
    "CHANNELS",
    "ENGAGED_MIN_USER_MESSAGES",
]

# A conversation is engaged when the user sent at least this many messages. rollup_engaged
# counts the same threshold (chatmw.metrics.reach_rollups), so both must change together.
ENGAGED_MIN_USER_MESSAGES = 2


def _has_table(engine: Engine, module: str, name: str) -> bool:
    # The business and survey tables are optional features: present only when their model
    # module imports and their migration has run on this database.
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return name in Base.metadata.tables and inspect(engine).has_table(name)


def _empty_volume() -> dict[str, Any]:
    return {"conversations": 0, "users": 0, "messages": 0, "user_messages": 0, "engaged": 0}


def _volume(engine: Engine, flt: MetricFilter) -> dict[str, dict[str, Any]]:
    """Count conversations, contacts, engaged conversations and messages per channel, raw."""
    scope = conversation_scope(flt).subquery()
    conversations = (
        select(
            Conversation.channel,
            func.count(),
            func.count(func.distinct(Conversation.contact_id)),
            func.sum(
                case((Conversation.user_message_count >= ENGAGED_MIN_USER_MESSAGES, 1), else_=0)
            ),
        )
        .join(scope, Conversation.id == scope.c.conversation_id)
        .group_by(Conversation.channel)
    )
    messages = (
        select(
            Conversation.channel, func.count(), func.sum(case((Message.role == "user", 1), else_=0))
        )
        .join(scope, Conversation.id == scope.c.conversation_id)
        .join(Message, Message.conversation_id == Conversation.id)
        .where(Message.kind.not_in(UNTIMED_KINDS))
        .group_by(Conversation.channel)
    )
    rows: dict[str, dict[str, Any]] = defaultdict(_empty_volume)
    with engine.connect() as connection:
        for channel, count, users, engaged in connection.execute(conversations):
            rows[channel].update(conversations=count, users=users, engaged=int(engaged or 0))
        for channel, count, user_count in connection.execute(messages):
            rows[channel].update(messages=count, user_messages=int(user_count or 0))
    return rows


def _rolled_volume(
    connection: Connection, flt: MetricFilter, coverage: Coverage
) -> dict[str, dict[str, Any]]:
    """Return the figures of :func:`_volume` from rollups, for a filter grouped by channel."""
    counts = conversation_counts(connection, flt, coverage)
    messages: dict[Any, dict[str, int]] = {}
    add_messages(connection, flt, coverage, messages)
    window = Buckets.window(coverage.since_ms, coverage.until_ms)
    users, _ = distinct_starters(connection, flt, coverage, window)
    rows: dict[str, dict[str, Any]] = defaultdict(_empty_volume)
    for channel, count in counts.conversations.items():
        rows[channel].update(
            conversations=count, engaged=counts.engaged_conversations.get(channel, 0)
        )
    for (channel, _), count in users.items():
        rows[channel]["users"] = count
    for channel, totals in messages.items():
        rows[channel].update(messages=totals["messages"], user_messages=totals["user_messages"])
    return rows


def _conversions(
    engine: Engine,
    flt: MetricFilter,
    options: Mapping[str, Any],
    rolled: tuple[Connection, Coverage] | None,
    conversations: Mapping[str, int],
) -> dict[str, dict[str, Any]] | None:
    """Return the ``conversion`` metric's figures per channel, or None without its table.

    ``rolled`` is the connection and coverage when rollups cover the query.
    ``conversations`` maps each channel to the conversations that started in the window.
    """
    if _conversion is None or not _has_table(engine, "chatmw.store.models_business", "conversions"):
        return None
    # Imported here: the business rollups exist only with the conversion module.
    from chatmw.metrics.business_query import conversions_in, serves_days

    days = _conversion.attribution_days(options)
    if rolled is not None and serves_days(days):
        connection, coverage = rolled
        sums = conversions_in(connection, flt, coverage, counts=False)
        # The conversion metric lists every channel with a conversation, converted or not.
        sums.conversations = dict(conversations)
        result = {**_conversion.rolled_figures(sums, flt), **_conversion.currency_of(engine)}
    else:
        result = _conversion.conversion_rate(engine, flt, {"attribution_days": days})
    return {
        group["group"]: {
            "converted": group["converted_conversations"],
            "conversions": group["conversions"],
            "revenue": group["revenue"],
            "currency": result.get("currency"),
        }
        for group in result["groups"]
    }


SURVEY_KINDS = ("csat", "nps")


def _surveys(
    engine: Engine, flt: MetricFilter, rolled: tuple[Connection, Coverage] | None
) -> dict[str, dict[str, Any]] | None:
    """Return the ``csat`` and ``nps`` figures per channel, or None without the survey tables.

    The figures of ``""`` are those of a channel without surveys.
    """
    if not _has_table(engine, "chatmw.store.models_surveys", "surveys"):
        return None
    try:
        # Imported here, not at module level: chatmw.surveys imports this package's modules.
        from chatmw.surveys.metrics import csat, nps, survey_figures
    except ModuleNotFoundError as error:
        if error.name not in ("chatmw.surveys", "chatmw.surveys.metrics"):
            raise
        return None
    figures: dict[str, dict[str, Any]] = defaultdict(dict)
    for kind in SURVEY_KINDS:
        figures[""][kind] = survey_figures(kind)
        if rolled is not None:
            connection, coverage = rolled
            for channel, counts in surveys_in(connection, flt, coverage, kind).items():
                figures[channel][kind] = survey_figures(kind, counts.sent, counts.scores)
            continue
        compute = csat if kind == "csat" else nps
        for group in compute(engine, flt)["groups"]:
            figures[group["group"]][kind] = {k: v for k, v in group.items() if k != "group"}
    return figures


FIGURES = ("first_response", "reply_time")


def _durations(
    engine: Engine, flt: MetricFilter, rolled: tuple[Connection, Coverage] | None
) -> dict[str, dict[str, Any]]:
    """Describe first response and reply time per channel, from rollups where they apply."""
    if rolled is not None:
        connection, coverage = rolled
        responses = new_responses()
        add_responses(connection, flt, coverage, responses)
        return {
            str(channel): {
                figure: describe_responses([by_figure], figure, "all") for figure in FIGURES
            }
            for channel, by_figure in responses.items()
        }
    # The group key is the channel, which every conversation has.
    return {
        str(key): {figure: describe_seconds(value[figure]["all"]) for figure in FIGURES}
        for key, value in collect_durations(engine, flt).items()
    }


def _sentiment_means(
    engine: Engine, flt: MetricFilter, rolled: tuple[Connection, Coverage] | None
) -> dict[str, float | None]:
    """Return the mean polarity of scored user messages per channel."""
    if rolled is None:
        return {str(key): value for key, value in mean_polarity(engine, flt).items()}
    connection, coverage = rolled
    sums = sentiment_in(connection, flt, coverage, conversations=False)
    return {
        channel: round(part.score_sum / part.scored, 4)
        for channel, part in sums.items()
        if part.scored
    }


def channel_performance(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute one row per channel over the conversations of ``flt``.

    Where ``cover`` accepts the query, every figure comes from rollups over one coverage of
    the window; otherwise from raw rows. Response times with ``exact=true`` and conversions
    with another ``attribution_days`` read raw rows in either case.
    """
    options = options or {}
    by_channel = dataclasses.replace(flt, group_by=GroupBy("channel"))
    with engine.connect() as connection:
        # Start slots are counted in UTC: the time zone does not change which conversations
        # started in the window.
        coverage = cover(connection, dataclasses.replace(flt, tz=ZoneInfo("UTC"), group_by=None))
        served = None if coverage is None else (connection, coverage)
        if coverage is None:
            volume = _volume(engine, flt)
        else:
            volume = _rolled_volume(connection, by_channel, coverage)
        durations = _durations(engine, by_channel, None if exact_requested(options) else served)
        sentiment = _sentiment_means(engine, by_channel, served)
        conversations = {channel: row["conversations"] for channel, row in volume.items()}
        conversions = _conversions(engine, by_channel, options, served, conversations)
        surveys = _surveys(engine, by_channel, served)
    return _result(flt, volume, durations, sentiment, conversions, surveys)


def _result(
    flt: MetricFilter,
    volume: dict[str, dict[str, Any]],
    durations: dict[str, dict[str, Any]],
    sentiment: dict[str, float | None],
    conversions: dict[str, dict[str, Any]] | None,
    surveys: dict[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    notes = []
    if conversions is None:
        notes.append("conversion is null: the store has no conversions table")
    if surveys is None:
        notes.append("csat and nps are null: the store has no surveys table")
    channels = []
    for channel in sorted(set(volume) | set(durations)):
        figures = volume[channel]
        row: dict[str, Any] = {
            "channel": channel,
            **{k: v for k, v in figures.items() if k != "engaged"},
        }
        row["engagement"] = {
            "engaged": figures["engaged"],
            "rate": rate(figures["engaged"], figures["conversations"]),
        }
        if conversions is None:
            row["conversion"] = None
        else:
            converted = conversions.get(
                channel, {"converted": 0, "conversions": 0, "revenue": None, "currency": None}
            )
            row["conversion"] = {
                **converted,
                "rate": rate(converted["converted"], figures["conversations"]),
            }
        times = durations.get(channel)
        for figure in FIGURES:
            row[figure] = times[figure] if times else describe_seconds([])
        if surveys is None:
            row["csat"] = row["nps"] = None
        else:
            own = surveys.get(channel, {})
            row["csat"] = own.get("csat", surveys[""]["csat"])
            row["nps"] = own.get("nps", surveys[""]["nps"])
        row["sentiment_mean"] = sentiment.get(channel)
        channels.append(row)
    return {"metric": "channels", "filters": flt.describe(), "channels": channels, "notes": notes}


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for channel in result["channels"]:
        row: dict[str, Any] = {}
        for name, value in channel.items():
            if isinstance(value, dict):
                row.update({f"{name}_{key}": item for key, item in value.items()})
            else:
                row[name] = value
        rows.append(row)
    return rows


CHANNELS = register(
    MetricSpec(
        name="channels",
        summary=(
            "Channel performance: volume, engagement, conversion, response times, CSAT, NPS "
            "and sentiment"
        ),
        description=(
            "One row per channel over the conversations that started in the window (`group_by` "
            "is ignored: the channel is the grouping).\n\n"
            "- `conversations`, `users` (distinct contacts), `messages` and `user_messages` "
            "(survey prompts and answers and reactions are not counted).\n"
            f"- `engagement.rate`: conversations with at least {ENGAGED_MIN_USER_MESSAGES} user "
            "messages divided by conversations.\n"
            "- `conversion`: the `conversion` metric per channel, with the same attribution "
            "(a conversion that names a conversation counts there; one that names only a user "
            "counts for each of that user's conversations that started at most "
            "`attribution_days` before it). `rate` is conversations with at least one "
            "conversion divided by conversations; `conversions` counts distinct conversions; "
            "`revenue` is a decimal string in `currency`. `conversion` is `null` when the store "
            "has no conversions table (a note says so).\n"
            "- `first_response` and `reply_time`: as in `response-time` (bot and agent answers "
            "together), in seconds; where rollups cover the window, percentiles are estimated "
            "as there, and `exact=true` computes them from every raw duration.\n"
            "- `csat` and `nps`: the `GET {prefix}/csat` and `GET {prefix}/nps` figures per "
            "channel (surveys of these conversations whose prompt was sent). CSAT scores run "
            "1-5: `score` is the share of 4 and 5 among `answers`, in percent, and `satisfied` "
            "their count. NPS scores run 0-10: `nps` = % promoters (9-10) - % detractors "
            "(0-6), from -100 to 100. Both are `null` when the store has no surveys table.\n"
            "- `sentiment_mean`: mean polarity of scored user messages (see `sentiment`).\n\n"
            "Rates are fractions from 0 to 1 and are `null` when their denominator is 0.\n\n"
            "On a store whose rollups are built, the queries that `docs/rollups.md` lists read "
            "them. Events recorded since the last refresh are counted from raw rows, so "
            "answers include them at once."
        ),
        compute=channel_performance,
        params=(EXACT,) if _conversion is None else (_conversion.ATTRIBUTION_PARAM, EXACT),
        rows=_rows,
    )
)
