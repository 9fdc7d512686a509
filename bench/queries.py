"""Queries: every metric of ``chatmw.metrics.REGISTRY`` (and CSAT and NPS) on large stores.

Each metric's compute function runs on a generated store (bench/gendata.py) of the given
size, on SQLite and PostgreSQL, with a 30-day window at the end of the data and default
options, ``--repeat`` times after one warm-up call; p50 and p95 are over those calls.
Calls stop early once one metric has used ``--budget`` seconds, so a slow metric cannot
stall the run. Before timing, the store is migrated and its rollups refreshed, so the
metrics that read rollups (see docs/rollups.md) are timed on that path; ``--raw`` times
every metric from raw rows only. Then ``chatmw.collector.settle_collector`` sets the garbage
collector as ``chatmw serve`` does once it has started, so the timed calls meet the same
collections as the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

import chatmw.metrics as metrics
from bench.common import Section, command_line, fmt, percentile, write_section
from bench.gendata import DAYS, START, prepared_url
from chatmw.collector import settle_collector
from chatmw.metrics.filters import MetricFilter
from chatmw.metrics.registry import parse_options
from chatmw.metrics.rollup_query import raw_only
from chatmw.metrics.rollup_refresh import refresh
from chatmw.store.engine import make_engine, upgrade

TARGET_MS = 100.0


@dataclass
class Timing:
    database: str
    messages: int
    metric: str
    samples_ms: list[float]
    error: str | None = None

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 0.5)

    @property
    def p95(self) -> float:
        return percentile(self.samples_ms, 0.95)


def computations() -> dict[str, Callable[[Engine, MetricFilter], Any]]:
    result: dict[str, Callable[[Engine, MetricFilter], Any]] = {}
    for name, spec in sorted(metrics.REGISTRY.items()):
        options = parse_options(spec, {})
        result[name] = lambda engine, flt, spec=spec, options=options: spec.compute(
            engine, flt, options
        )
    try:
        from chatmw.surveys.metrics import csat, nps
    except ImportError:
        return result
    result["csat"] = lambda engine, flt: csat(engine, flt, {})
    result["nps"] = lambda engine, flt: nps(engine, flt, {})
    return result


def time_metric(
    engine: Engine,
    compute: Callable[[Engine, MetricFilter], Any],
    flt: MetricFilter,
    repeat: int,
    budget_s: float,
) -> tuple[list[float], str | None]:
    samples: list[float] = []
    spent = 0.0
    try:
        for index in range(repeat + 1):
            started = time.perf_counter()
            compute(engine, flt)
            elapsed = time.perf_counter() - started
            spent += elapsed
            if index:
                samples.append(elapsed * 1000)
            elif elapsed > budget_s:
                samples.append(elapsed * 1000)  # too slow to repeat: the first call is the figure
                break
            if spent > budget_s and samples:
                break
    except Exception as error:  # noqa: BLE001 - reported in the table
        return samples, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return samples, None


def run(
    database: str, messages: int, repeat: int, budget_s: float, only: set[str] | None, raw: bool
) -> list[Timing]:
    url = prepared_url(database, messages)
    engine = make_engine(url)
    # Stores generated before the rollup tables existed get them here.
    upgrade(engine)
    report = refresh(engine)
    action = "rebuilt" if report.rebuilt else f"refreshed {report.slots} slots"
    print(f"{database} {messages:,} rollups {action} in {report.seconds:.1f} s", flush=True)
    computed = computations()
    # The collector policy of `chatmw serve`, applied once its start-up has finished.
    settle_collector()
    end = START + timedelta(days=DAYS)
    flt = MetricFilter(since=end - timedelta(days=30), until=end)
    timings = []
    for name, compute in computed.items():
        if only and name not in only:
            continue
        with raw_only() if raw else contextlib.nullcontext():
            samples, error = time_metric(engine, compute, flt, repeat, budget_s)
        timing = Timing(database, messages, name, samples, error)
        print(
            f"{database} {messages:,} {name}: p50 {timing.p50:.0f} ms p95 {timing.p95:.0f} ms "
            f"n={len(samples)} {error or ''}",
            flush=True,
        )
        timings.append(timing)
    engine.dispose()
    return timings


def render(timings: list[Timing], args: argparse.Namespace) -> str:
    sizes = sorted({t.messages for t in timings})
    databases = [d for d in ("sqlite", "postgresql") if any(t.database == d for t in timings)]
    columns = [(d, s) for s in sizes for d in databases]
    header = " | ".join(f"{d} {s / 1e6:g}M p50 / p95 (ms)" for d, s in columns)
    path = (
        "from raw rows only (`--raw`)"
        if args.raw
        else "after a rollup refresh, so the metrics listed in docs/rollups.md read rollups"
    )
    lines = [
        "## Queries: every metric on generated stores",
        "",
        f"Stores generated by `bench/gendata.py` (90 days, three channels, conversations of 2 to "
        f"12 messages, plan/country/company attributes, UTM touches of eight campaigns on 60 % "
        f"of conversations, CSAT and NPS answers on 20 % of ended ones, conversions, leads and "
        f"daily spend), written with COPY (PostgreSQL) or executemany (SQLite) and cached "
        f"under bench/.data/. Each metric's compute function (what `GET /metrics/NAME` runs) "
        f"is called in process with a 30-day window and default options, {path}: "
        f"one warm-up call, then up to {args.repeat} timed calls (fewer once a metric has used "
        f"{args.budget:g} s; a single call when the warm-up alone took longer). Before the "
        f"timed calls the garbage collector is set as `chatmw serve` sets it after start-up "
        f"(`chatmw.collector.settle_collector`: start-up objects frozen, young threshold "
        f"10,000). Target: p95 <= {TARGET_MS:g} ms at 10 million messages.",
        "",
        f"| metric | {header} |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    by_key = {(t.metric, t.database, t.messages): t for t in timings}
    for metric in sorted({t.metric for t in timings}):
        cells = []
        for database, size in columns:
            timing = by_key.get((metric, database, size))
            if timing is None:
                cells.append("not measured")
            elif timing.error:
                cells.append(f"error: {timing.error}")
            else:
                mark = "" if timing.p95 <= TARGET_MS else " (over)"
                cells.append(
                    f"{fmt(timing.p50, 0)} / {fmt(timing.p95, 0)}{mark} "
                    f"(n={len(timing.samples_ms)})"
                )
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    over = [t for t in timings if not t.error and t.p95 > TARGET_MS]
    lines += ["", f"{len(over)} of {len(timings)} measurements are over {TARGET_MS:g} ms at p95."]
    if not any(t.messages >= 10_000_000 for t in timings):
        lines.append("The 10-million-message store was not measured in this run.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Timing]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", default="1000000", help="comma-separated store sizes")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--budget", type=float, default=12.0, help="seconds per metric")
    parser.add_argument("--only", default="", help="comma-separated metric names")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--raw", action="store_true", help="compute every metric from raw rows, not rollups"
    )
    args = parser.parse_args(argv)
    only = {name for name in args.only.split(",") if name} or None
    timings = []
    for size in (int(value) for value in args.messages.split(",")):
        for database in args.databases.split(","):
            timings += run(database, size, args.repeat, args.budget, only, args.raw)
    if not args.no_docs:
        write_section(Section("queries", render(timings, args)), command_line())
    return timings


if __name__ == "__main__":
    main()
