"""CSAT and NPS figures over the conversations a :class:`MetricFilter` selects.

A survey belongs to the window in which its conversation started. Definitions:

- CSAT (scores 1-5): ``score`` is the share of answers that are 4 or 5, in percent;
  ``mean`` the mean score; ``distribution`` the count of each score.
- NPS (scores 0-10): promoters score 9-10, passives 7-8, detractors 0-6; ``nps`` is the
  percentage of promoters minus the percentage of detractors, from -100 to 100.
- Both: ``sent`` counts surveys whose prompt went out; ``answers`` those with a score;
  ``response_rate_pct`` is answers / sent in percent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.store.models_surveys import Survey

__all__ = ["csat", "nps", "csat_rows", "nps_rows"]


def _scores(
    engine: Engine, flt: MetricFilter, kind: str
) -> dict[Any, list[tuple[bool, int | None]]]:
    scope = conversation_scope(flt).subquery()
    statement = (
        select(scope.c.group_key, Survey.sent_at_ms, Survey.score)
        .join(Survey, Survey.conversation_id == scope.c.conversation_id)
        .where(Survey.kind == kind)
    )
    grouped: dict[Any, list[tuple[bool, int | None]]] = defaultdict(list)
    with engine.connect() as connection:
        for key, sent_at, score in connection.execute(statement):
            grouped[key].append((sent_at is not None, score))
    return grouped


def _pct(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole * 100, 2)


def _csat_figures(items: list[tuple[bool, int | None]]) -> dict[str, Any]:
    scores = [score for sent, score in items if sent and score is not None]
    sent = sum(1 for was_sent, _ in items if was_sent)
    satisfied = sum(1 for score in scores if score >= 4)
    return {
        "sent": sent,
        "answers": len(scores),
        "satisfied": satisfied,
        "score": _pct(satisfied, len(scores)),
        "mean": None if not scores else round(sum(scores) / len(scores), 3),
        "distribution": {str(value): scores.count(value) for value in range(1, 6)},
        "response_rate_pct": _pct(len(scores), sent),
    }


def _nps_figures(items: list[tuple[bool, int | None]]) -> dict[str, Any]:
    scores = [score for sent, score in items if sent and score is not None]
    sent = sum(1 for was_sent, _ in items if was_sent)
    promoters = sum(1 for score in scores if score >= 9)
    detractors = sum(1 for score in scores if score <= 6)
    passives = len(scores) - promoters - detractors
    nps_value = None
    if scores:
        nps_value = round((promoters - detractors) / len(scores) * 100, 2)
    return {
        "sent": sent,
        "answers": len(scores),
        "promoters": promoters,
        "passives": passives,
        "detractors": detractors,
        "promoters_pct": _pct(promoters, len(scores)),
        "detractors_pct": _pct(detractors, len(scores)),
        "nps": nps_value,
        "distribution": {str(value): scores.count(value) for value in range(0, 11)},
        "response_rate_pct": _pct(len(scores), sent),
    }


def _result(engine: Engine, flt: MetricFilter, kind: str, figures: Any) -> dict[str, Any]:
    grouped = _scores(engine, flt, kind)
    everything = [item for items in grouped.values() for item in items]
    result: dict[str, Any] = {"metric": kind, "filters": flt.describe(), **figures(everything)}
    if flt.group_by is not None:
        keys = sorted(grouped, key=group_label)
        result["groups"] = [{"group": group_label(key), **figures(grouped[key])} for key in keys]
    return result


def csat(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute CSAT: the share of 4 and 5 among answers, the mean, the distribution, the rate."""
    return _result(engine, flt, "csat", _csat_figures)


def nps(
    engine: Engine, flt: MetricFilter, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compute NPS: % promoters (9-10) minus % detractors (0-6), with the three counts."""
    return _result(engine, flt, "nps", _nps_figures)


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    sections = [("(all)", result)] + [(g["group"], g) for g in result.get("groups", [])]
    rows = []
    for group, section in sections:
        row: dict[str, Any] = {"group": group}
        for name, value in section.items():
            if name in ("metric", "filters", "groups", "group"):
                continue
            if name == "distribution":
                row.update({f"score_{score}": count for score, count in value.items()})
            else:
                row[name] = value
        rows.append(row)
    return rows


def csat_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a :func:`csat` result into table rows, one per group."""
    return _rows(result)


def nps_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an :func:`nps` result into table rows, one per group."""
    return _rows(result)
