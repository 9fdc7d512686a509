"""Overhead: the FAQ bot bare vs wrapped by chatmw, served by uvicorn, loaded by wrk.

Each round starts the bare bot, the wrapped bot (sentiment on) and the wrapped bot with
sentiment off, each in its own uvicorn process, and loads it from wrk (one thread, a
fixed number of connections, POST bodies from bench/lua/chat.lua) on 127.0.0.1. The
bot's think time is 0, so the figures are the framework's and chatmw's own cost. The
ratios compare medians over rounds taken in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from bench.common import DATA_DIR, Section, command_line, fmt, write_section
from bench.loadgen import LoadResult, run_wrk, served

KINDS = ("bare", "wrapped", "wrapped-nosentiment", "wrapped-thread", "wrapped-nowrite")


@dataclass
class Summary:
    kind: str
    rps: float
    p50: float
    p99: float
    errors: int
    rounds: list[LoadResult]


def database_url(kind: str, database: str) -> str | None:
    if kind == "bare":
        return None
    if database == "postgresql":
        from bench.common import recreate_postgres_database

        return recreate_postgres_database("chatmw_bench_overhead")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / "overhead.db"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def measure(
    kind: str, database: str, seconds: float, warmup: float, connections: int
) -> LoadResult:
    with served(kind, database_url(kind, database)) as port:
        run_wrk(port, "chat.lua", warmup, connections)
        return run_wrk(port, "chat.lua", seconds, connections)


def summarise(kind: str, rounds: list[LoadResult]) -> Summary:
    return Summary(
        kind,
        statistics.median(r.rps for r in rounds),
        statistics.median(r.p50_ms for r in rounds),
        statistics.median(r.p99_ms for r in rounds),
        sum(r.errors for r in rounds),
        rounds,
    )


def render(summaries: dict[str, Summary], args: argparse.Namespace) -> str:
    bare = summaries["bare"]
    lines = [
        "## Overhead: the FAQ bot bare and wrapped by chatmw",
        "",
        f"`chatmw/_demo/faq_bot.py` with think time 0, in its own uvicorn process (h11, "
        f"one worker), loaded by `wrk -t1 -c{args.connections}` from another process on "
        f"127.0.0.1 with `bench/lua/chat.lua` (POST /chat, 5,000 users, 10 texts). Each of "
        f"{args.rounds} rounds measures every variant for {args.seconds:g} s after a "
        f"{args.warmup:g} s warm-up, in a fresh server process; the wrapped bot writes to a "
        f"fresh {args.database} database. Figures are medians over the rounds. Targets: "
        f"wrapped keeps >= 90 % of bare RPS and adds <= 1 ms at p99.",
        "",
        "| variant | requests/s | of bare | p50 (ms) | p99 (ms) | p99 added (ms) | errors | "
        "verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind in summaries:
        item = summaries[kind]
        ratio = item.rps / bare.rps
        added = item.p99 - bare.p99
        verdict = ""
        if kind != "bare":
            met = ratio >= 0.9 and added <= 1.0
            verdict = "met" if met else "**missed**"
        lines.append(
            f"| {kind} | {fmt(item.rps, 0)} | {ratio * 100:.1f} % | {fmt(item.p50, 2)} | "
            f"{fmt(item.p99, 2)} | {'' if kind == 'bare' else fmt(added, 2)} | "
            f"{item.errors} | {verdict} |"
        )
    lines += [
        "",
        "Per round (requests/s, p99 ms): "
        + "; ".join(
            f"{kind}: "
            + ", ".join(f"{fmt(r.rps, 0)} / {fmt(r.p99_ms, 2)}" for r in summaries[kind].rounds)
            for kind in summaries
        )
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Summary]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    results: dict[str, list[LoadResult]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            result = measure(kind, args.database, args.seconds, args.warmup, args.connections)
            print(kind, result, flush=True)
            results[kind].append(result)
    summaries = {kind: summarise(kind, rounds) for kind, rounds in results.items()}
    if not args.no_docs:
        write_section(Section("overhead", render(summaries, args)), command_line())
    return summaries


if __name__ == "__main__":
    main()
