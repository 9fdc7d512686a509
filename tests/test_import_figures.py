"""First-response figures of an imported transcript, checked against the raw CSV.

The expected figures are computed here from the file with the csv module alone, so a
mistake in the importer, the writer's timing or the metric shows up as a difference.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from typer.testing import CliRunner

from chatmw.cli import app

FIGURES_CSV = Path(__file__).parent / "fixtures" / "import" / "figures.csv"


def percentile_cont(values: list[float], fraction: float) -> float:
    """Percentile with linear interpolation between ranks, as PostgreSQL's percentile_cont."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def first_responses_by_company(path: Path) -> dict[str, list[float]]:
    """Return each company's first-response times in ms, read straight from the CSV.

    A conversation's first response is its first bot or agent message after a user message,
    timed from the first user message. A bot greeting before any user message does not
    count, and a conversation without a bot or agent reply has no first response.
    """
    messages: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    companies: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for index, row in enumerate(csv.DictReader(stream)):
            at_ms = datetime.fromisoformat(row["timestamp"]).timestamp() * 1000
            messages[row["conversation_id"]].append((at_ms, index, row["role"]))
            companies[row["conversation_id"]] = row["company"]

    result: dict[str, list[float]] = defaultdict(list)
    for conversation, rows in messages.items():
        first_user: float | None = None
        for at_ms, _, role in sorted(rows):
            if role == "user" and first_user is None:
                first_user = at_ms
            elif role in ("bot", "agent") and first_user is not None:
                result[companies[conversation]].append(at_ms - first_user)
                break
    return result


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_first_response_p50_per_company(database_url: str) -> None:
    expected = first_responses_by_company(FIGURES_CSV)
    invoke("import", str(FIGURES_CSV), "--batch-size", "16", "--db", database_url)

    output = invoke("metrics", "response-time", "--group-by", "attr:company", "--json",
                    "--db", database_url)

    groups = {group["group"]: group["first_response"]["all"]
              for group in json.loads(output)["groups"]}
    assert sorted(groups) == ["Acme", "Globex", "Initech", "Umbrella"]
    for company, durations in expected.items():
        assert groups[company]["count"] == len(durations), company
        p50_seconds = percentile_cont(durations, 0.5) / 1000
        assert math.isclose(groups[company]["p50"], p50_seconds, abs_tol=0.0006), company
        p90_seconds = percentile_cont(durations, 0.9) / 1000
        assert math.isclose(groups[company]["p90"], p90_seconds, abs_tol=0.0006), company


def test_fixture_covers_hard_cases() -> None:
    with open(FIGURES_CSV, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    by_conversation: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=lambda row: datetime.fromisoformat(row["timestamp"])):
        by_conversation[row["conversation_id"]].append(row["role"])

    unanswered = [c for c, roles in by_conversation.items() if set(roles) == {"user"}]
    greeted = [c for c, roles in by_conversation.items() if roles[0] == "bot"]
    user_runs = [c for c, roles in by_conversation.items() if roles[:2] == ["user", "user"]]
    assert unanswered
    assert greeted
    assert user_runs
    assert {row["company"] for row in rows} == {"Acme", "Globex", "Initech", "Umbrella"}
    assert any(len(durations) % 2 == 0 for durations in
               first_responses_by_company(FIGURES_CSV).values())
