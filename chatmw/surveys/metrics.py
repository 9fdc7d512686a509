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
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, case, func, select

from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.outcome_query import survey_sums
from chatmw.metrics.scope import conversation_scope, group_label
from chatmw.store.models_surveys import Survey

__all__ = ["csat", "nps", "csat_rows", "nps_rows", "survey_figures"]


@dataclass(slots=True)
class _Answers:
    """Surveys of one group: the number sent, and the count of each score given."""

    sent: int = 0
    scores: dict[int, int] = field(default_factory=dict)

    def add(self, other: _Answers) -> None:
        self.sent += other.sent
        for score, count in other.scores.items():
            self.scores[score] = self.scores.get(score, 0) + count

    @property
    def answers(self) -> int:
        return sum(self.scores.values())

    def count_at_least(self, low: int) -> int:
        return sum(count for score, count in self.scores.items() if score >= low)

    def count_at_most(self, high: int) -> int:
        return sum(count for score, count in self.scores.items() if score <= high)

    def mean(self) -> float | None:
        answers = self.answers
        if not answers:
            return None
        return round(sum(score * count for score, count in self.scores.items()) / answers, 3)


def _rolled_answers(engine: Engine, flt: MetricFilter, kind: str) -> dict[Any, _Answers] | None:
    """Return group key -> surveys of ``kind`` from rollups, or None where they do not apply."""
    by_channel = survey_sums(engine, flt, kind)
    if by_channel is None:
        return None
    grouped: dict[Any, _Answers] = defaultdict(_Answers)
    for channel, counts in by_channel.items():
        grouped[channel if flt.group_by is not None else None].add(
            _Answers(counts.sent, dict(counts.scores))
        )
    return grouped


def _answers(engine: Engine, flt: MetricFilter, kind: str) -> dict[Any, _Answers]:
    """Return group key -> surveys of ``kind``, from rollups or counted in SQL by sent state."""
    rolled = _rolled_answers(engine, flt, kind)
    if rolled is not None:
        return rolled
    scope = conversation_scope(flt).subquery()
    sent = Survey.sent_at_ms.is_not(None)
    # Only the scores of sent surveys count as answers.
    score = case((sent, Survey.score), else_=None)
    statement = (
        select(
            scope.c.group_key,
            score,
            func.count(),
            func.coalesce(func.sum(case((sent, 1), else_=0)), 0),
        )
        .join(Survey, Survey.conversation_id == scope.c.conversation_id)
        .where(Survey.kind == kind)
        .group_by(scope.c.group_key, score)
    )
    grouped: dict[Any, _Answers] = defaultdict(_Answers)
    with engine.connect() as connection:
        for key, value, count, sent_count in connection.execute(statement):
            answers = grouped[key]
            answers.sent += int(sent_count)
            if value is not None:
                answers.scores[int(value)] = int(count)
    return grouped


def _pct(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole * 100, 2)


def _csat_figures(items: _Answers) -> dict[str, Any]:
    answers = items.answers
    satisfied = items.count_at_least(4)
    return {
        "sent": items.sent,
        "answers": answers,
        "satisfied": satisfied,
        "score": _pct(satisfied, answers),
        "mean": items.mean(),
        "distribution": {str(value): items.scores.get(value, 0) for value in range(1, 6)},
        "response_rate_pct": _pct(answers, items.sent),
    }


def _nps_figures(items: _Answers) -> dict[str, Any]:
    answers = items.answers
    promoters = items.count_at_least(9)
    detractors = items.count_at_most(6)
    passives = answers - promoters - detractors
    nps_value = None
    if answers:
        nps_value = round((promoters - detractors) / answers * 100, 2)
    return {
        "sent": items.sent,
        "answers": answers,
        "promoters": promoters,
        "passives": passives,
        "detractors": detractors,
        "promoters_pct": _pct(promoters, answers),
        "detractors_pct": _pct(detractors, answers),
        "nps": nps_value,
        "distribution": {str(value): items.scores.get(value, 0) for value in range(0, 11)},
        "response_rate_pct": _pct(answers, items.sent),
    }


def survey_figures(
    kind: str, sent: int = 0, scores: Mapping[int, int] | None = None
) -> dict[str, Any]:
    """Return the ``csat`` or ``nps`` figures of ``sent`` surveys and the count of each score.

    These are the figures of one group of :func:`csat` or :func:`nps`. Without arguments
    they are the figures of no survey.
    """
    figures = _csat_figures if kind == "csat" else _nps_figures
    return figures(_Answers(sent, dict(scores or {})))


def _result(engine: Engine, flt: MetricFilter, kind: str, figures: Any) -> dict[str, Any]:
    grouped = _answers(engine, flt, kind)
    everything = _Answers()
    for answers in grouped.values():
        everything.add(answers)
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
