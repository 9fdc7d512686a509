"""Import: messages per second of ``chatmw import FILE`` on a large transcript CSV.

The file (generated once and cached under bench/.data/) has one row per message in the
documented CSV format: conversations of 2 to 12 alternating user and bot messages,
written one conversation after another, with plan and country attribute columns. The
command runs as a subprocess on a fresh database; the rate is messages stored per
second of the command's wall-clock time, start-up and migration included. The start-up
alone is the median wall-clock time of ``chatmw import --help``.
"""

from __future__ import annotations

import argparse
import csv
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from bench.common import (
    DATA_DIR,
    ROOT,
    Section,
    command_line,
    fmt,
    postgres_url,
    recreate_postgres_database,
    write_section,
)
from bench.workload import BOT_TEXTS, CHANNELS, COUNTRIES, PLANS, USER_TEXTS

TARGET = 20_000
# Runs of ``chatmw import --help`` whose median is reported as the start-up time.
STARTUP_RUNS = 5


@dataclass
class ImportResult:
    database: str
    messages: int
    seconds: float
    output: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def transcript_file(messages: int) -> Path:
    path = DATA_DIR / f"transcript_{messages}.csv"
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    clock = datetime(2024, 1, 1, tzinfo=UTC)
    written = 0
    conversation = 0
    partial = path.with_suffix(".part")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(
            [
                "conversation_id",
                "message_id",
                "timestamp",
                "role",
                "user_id",
                "channel",
                "plan",
                "country",
                "text",
            ]
        )
        while written < messages:
            conversation += 1
            user = f"user{rng.randrange(messages // 4 + 1)}"
            channel, plan, country = rng.choice(CHANNELS), rng.choice(PLANS), rng.choice(COUNTRIES)
            at = clock + timedelta(seconds=conversation * 7)
            for turn in range(min(rng.randint(2, 12), messages - written)):
                role = "user" if turn % 2 == 0 else "bot"
                at += timedelta(seconds=rng.randint(1, 90))
                text = rng.choice(USER_TEXTS if role == "user" else BOT_TEXTS)
                out.writerow(
                    [
                        f"c{conversation}",
                        f"c{conversation}-{turn}",
                        at.isoformat().replace("+00:00", "Z"),
                        role,
                        user if role == "user" else "",
                        channel,
                        plan,
                        country,
                        text,
                    ]
                )
                written += 1
    partial.rename(path)
    return path


def count_messages(url: str) -> int:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as connection:
            return int(connection.execute("SELECT count(*) FROM messages").fetchone()[0])
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT count(*) FROM messages").fetchone()
        return int(row[0]) if row else 0


def chatmw_command() -> str:
    return str(Path(sys.executable).with_name("chatmw"))


def startup_seconds(runs: int) -> float:
    """Return the median wall-clock seconds of ``chatmw import --help``: start-up alone."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([chatmw_command(), "import", "--help"], cwd=ROOT, capture_output=True,
                       check=True, timeout=120)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_one(database: str, path: Path) -> ImportResult:
    if database == "sqlite":
        db_path = DATA_DIR / "import.db"
        for suffix in ("", "-wal", "-shm"):
            db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{db_path}"
    else:
        recreate_postgres_database("chatmw_bench_import")
        url = postgres_url("chatmw_bench_import")
    command = [chatmw_command(), "import", str(path), "--db", url, "--no-progress"]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"import failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return ImportResult(database, count_messages(url), seconds, completed.stdout.strip())


def render(results: list[ImportResult], path: Path, messages: int, startup: float) -> str:
    lines = [
        "## Import: `chatmw import FILE`",
        "",
        f"A generated transcript CSV of {messages:,} messages ({path.stat().st_size / 2**20:.1f} "
        f"MiB; conversations of 2 to 12 messages, one after another, plan and country "
        f"attribute columns), imported by `chatmw import FILE --db URL` (default batch of 5,000) "
        f"as a subprocess into a fresh database. The rate is messages stored per second of "
        f"the command's wall-clock time, start-up and migrations included. Target: >= "
        f"{TARGET:,} messages/s. Start-up alone (`chatmw import --help`, median of "
        f"{STARTUP_RUNS} runs): {fmt(startup, 2)} s.",
        "",
        "| database | messages stored | seconds | messages/s | verdict | command output |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        verdict = "met" if r.rate >= TARGET else "**missed**"
        lines.append(
            f"| {r.database} | {r.messages:,} | {fmt(r.seconds)} | {fmt(r.rate, 0)} | "
            f"{verdict} | {r.output.replace('|', '/')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[ImportResult]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    path = transcript_file(args.messages)
    results = []
    for database in args.databases.split(","):
        result = run_one(database, path)
        print(result, flush=True)
        results.append(result)
    startup = startup_seconds(STARTUP_RUNS)
    print(f"start-up (chatmw import --help, median of {STARTUP_RUNS}): {startup:.3f} s", flush=True)
    if not args.no_docs:
        section = render(results, path, args.messages, startup)
        write_section(Section("import", section), command_line())
    return results


if __name__ == "__main__":
    main()
