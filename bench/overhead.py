"""Overhead: the FAQ bot bare vs wrapped by chatmw, served by uvicorn, loaded by wrk.

For each database, each round starts the bare bot and each wrapped variant in its own
uvicorn process and loads it from wrk (one thread, a fixed number of connections, POST
bodies from bench/lua/chat.lua) on 127.0.0.1: once saturated (capacity) and once paced
below capacity (latency). The bot's think time is 0, so the figures are the framework's
and chatmw's own cost. The ratios compare medians over rounds taken in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

from bench.common import DATA_DIR, Section, command_line, fmt, write_section
from bench.loadgen import LoadResult, run_wrk, served
from bench.serve import SETTLED

KINDS = ("bare", "wrapped", "wrapped-nosentiment", "wrapped-thread", "wrapped-nowrite",
         "bare+settled", "wrapped+settled", "wrapped-nowrite+settled")
PACED_KINDS = ("bare", "wrapped", "bare+settled", "wrapped+settled")


def baseline(kind: str) -> str:
    """Return the bare variant ``kind`` is compared with: the one with the same collector."""
    return "bare" + SETTLED if kind.endswith(SETTLED) else "bare"


@dataclass
class Summary:
    kind: str
    rps: float
    p50: float
    p99: float
    errors: int
    rounds: list[LoadResult]
    # Per round of a variant that stores: (requests completed in warm-up and measurement,
    # user messages in the database once the server stopped).
    stored: list[tuple[int, int]] = field(default_factory=list)


def stores(kind: str) -> bool:
    """Return whether the variant ``kind`` stores what it records."""
    return kind.startswith("wrapped") and not kind.startswith("wrapped-nowrite")


def stored_user_messages(url: str) -> int:
    """Count the user messages in the database at ``url`` (each chat request makes one)."""
    from sqlalchemy import func, select

    from chatmw.store.engine import make_engine
    from chatmw.store.models import Message

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                select(func.count()).select_from(Message).where(Message.role == "user")
            ).scalar_one()
    finally:
        engine.dispose()


def database_url(kind: str, database: str) -> str | None:
    if baseline(kind) == kind:
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
    kind: str, database: str, seconds: float, warmup: float, connections: int, delay_ms: int
) -> tuple[LoadResult, tuple[int, int] | None]:
    """Load one server; return the measured load and, for a variant that stores, the
    requests completed and the user messages stored once the server stopped."""
    env = {"BENCH_DELAY_MS": str(delay_ms)} if delay_ms else None
    url = database_url(kind, database)
    with served(kind, url) as port:
        warm = run_wrk(port, "chat.lua", warmup, connections, env)
        result = run_wrk(port, "chat.lua", seconds, connections, env)
    # The server stopped with SIGINT, and the runtime flushed its queue on the way out.
    if url is None or not stores(kind):
        return result, None
    return result, (warm.requests + result.requests, stored_user_messages(url))


def summarise(kind: str, rounds: list[LoadResult],
              stored: list[tuple[int, int]] | None = None) -> Summary:
    return Summary(
        kind,
        statistics.median(r.rps for r in rounds),
        statistics.median(r.p50_ms for r in rounds),
        statistics.median(r.p99_ms for r in rounds),
        sum(r.errors for r in rounds),
        rounds,
        stored or [],
    )


def verdict(item: Summary, bare: Summary, load: str) -> tuple[float, float, bool]:
    """Return the RPS kept, the p99 added and whether the targets are met for ``load``.

    Saturated runs check both targets; paced runs offer the same rate to both variants,
    so only the added p99 is compared there.
    """
    ratio = item.rps / bare.rps
    added = item.p99 - bare.p99
    met = added <= 1.0 if load == "paced" else ratio >= 0.9 and added <= 1.0
    return ratio, added, met


def render(results: dict[str, dict[str, dict[str, Summary]]], args: argparse.Namespace) -> str:
    paced_rate = args.connections * 1000 / args.delay_ms
    lines = [
        "## Overhead: the FAQ bot bare and wrapped by chatmw",
        "",
        f"`chatmw/_demo/faq_bot.py` with think time 0, in its own uvicorn process (h11, "
        f"one worker), loaded by `wrk -t1 -c{args.connections}` from another process on "
        f"127.0.0.1 with `bench/lua/chat.lua` (POST /chat, 5,000 users, 10 texts). "
        f"`saturated`: every connection sends its next request as soon as the last is "
        f"answered, so requests/s is the server's capacity. `paced`: each connection waits "
        f"{args.delay_ms} ms between requests (at most {paced_rate:,.0f} requests/s), a steady "
        f"load below capacity, where p99 shows the latency a user sees rather than queueing. "
        f"Each of {args.rounds} rounds measures every variant for {args.seconds:g} s after a "
        f"{args.warmup:g} s warm-up, in a fresh server process with a fresh database. "
        f"Variants (bench/serve.py): `wrapped` is chatmw as it comes (sentiment on, writer "
        f"process); `wrapped-thread` keeps the writer in the recorder's thread; "
        f"`wrapped-nowrite` drops the exchanges undecoded, leaving the middleware's own cost. "
        f"A `+settled` variant calls `chatmw.collector.settle_after_startup` on its app, as "
        f"the README advises for a bot that owns its process, and is compared with "
        f"`bare+settled`; the others run CPython's default collector and are compared with "
        f"`bare`. "
        f"Figures are medians over the rounds. Targets: wrapped keeps >= 90 % of bare RPS "
        f"and adds <= 1 ms at p99.",
    ]
    for database, loads in results.items():
        for load, summaries in loads.items():
            lines += [
                "",
                f"{database}, {load}:",
                "",
                "| variant | requests/s | of bare | p50 (ms) | p99 (ms) | p99 added (ms) | "
                "errors | verdict |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            for kind, item in summaries.items():
                bare = summaries.get(baseline(kind))
                if bare is None or bare is item:
                    lines.append(f"| {kind} | {fmt(item.rps, 0)} | | {fmt(item.p50, 2)} | "
                                 f"{fmt(item.p99, 2)} | | {item.errors} | |")
                    continue
                ratio, added, met = verdict(item, bare, load)
                lines.append(
                    f"| {kind} | {fmt(item.rps, 0)} | {ratio * 100:.1f} % | {fmt(item.p50, 2)} | "
                    f"{fmt(item.p99, 2)} | {fmt(added, 2)} | {item.errors} | "
                    f"{'met' if met else '**missed**'} |"
                )
            checked = [(kind, item.stored) for kind, item in summaries.items() if item.stored]
            if checked:
                lines += [
                    "",
                    "Stored once the server stopped, as user messages against requests "
                    "completed with the warm-up. wrk does not count the requests in flight "
                    "when it stops, so up to the connections per load may be stored beyond "
                    "the count. "
                    + "; ".join(
                        f"{kind}: "
                        + ", ".join(f"{stored:,} of {completed:,}" for completed, stored in pairs)
                        for kind, pairs in checked
                    )
                    + ".",
                ]
            lines += [
                "",
                "Per round (requests/s, p99 ms): "
                + "; ".join(
                    f"{kind}: "
                    + ", ".join(f"{fmt(r.rps, 0)} / {fmt(r.p99_ms, 2)}" for r in item.rounds)
                    for kind, item in summaries.items()
                )
                + ".",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, Summary]]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--delay-ms", type=int, default=32,
                        help="pause of each connection between requests in the paced load")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--kinds", default=",".join(KINDS), help="variants of the saturated load")
    parser.add_argument("--paced-kinds", default=",".join(PACED_KINDS))
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    # An empty list ("") skips that load.
    plans = {"saturated": (_kind_list(args.kinds), 0),
             "paced": (_kind_list(args.paced_kinds), args.delay_ms)}
    results: dict[str, dict[str, dict[str, Summary]]] = {}
    for database in args.databases.split(","):
        results[database] = {}
        for load, (kinds, delay_ms) in plans.items():
            if not kinds:
                continue
            rounds: dict[str, list[LoadResult]] = {kind: [] for kind in kinds}
            stored: dict[str, list[tuple[int, int]]] = {kind: [] for kind in kinds}
            for _ in range(args.rounds):
                for kind in kinds:
                    result, check = measure(kind, database, args.seconds, args.warmup,
                                            args.connections, delay_ms)
                    print(database, load, kind, result,
                          "" if check is None else f"completed={check[0]} stored={check[1]}",
                          flush=True)
                    rounds[kind].append(result)
                    if check is not None:
                        stored[kind].append(check)
            results[database][load] = {kind: summarise(kind, items, stored[kind])
                                       for kind, items in rounds.items()}
    if not args.no_docs:
        write_section(Section("overhead", render(results, args)), command_line())
    return results


def _kind_list(text: str) -> list[str]:
    return [kind for kind in text.split(",") if kind]


if __name__ == "__main__":
    main()
