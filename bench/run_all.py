"""Run every benchmark and rewrite docs/benchmarks.md: ``python -m bench.run_all``.

Each benchmark writes its own section with the machine description and its command; this
script then writes the summary of measured figures against targets at the top.
``--quick`` shortens every run (a smoke check of the scripts, not figures to publish).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import importer, ingest, overhead, queries, webhook
from bench.common import DOCS_PAGE, Section, fmt, write_section
from bench.loadgen import require_wrk


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--skip", default="", help="comma-separated: overhead,webhook,ingest,queries,import"
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if not {"overhead", "webhook"} <= skip:
        require_wrk()
    started = time.monotonic()
    quick = ["--seconds", "3", "--warmup", "1"] if args.quick else []
    steps = {
        "overhead": lambda: overhead.main(quick + (["--rounds", "1"] if args.quick else [])),
        "webhook": lambda: webhook.main(quick),
        "ingest": lambda: ingest.main(quick),
        "queries": lambda: queries.main(
            ["--messages", "20000", "--repeat", "2"] if args.quick
            else ["--messages", "1000000,10000000"]
        ),
        "import": lambda: importer.main(["--messages", "20000"] if args.quick else []),
    }
    results: dict[str, Any] = {}
    for name, step in steps.items():
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        results[name] = step()
    command = "bash bench/run.sh" if not skip else f"python -m bench.run_all --skip {args.skip}"
    write_section(Section("summary", summary(results, earlier_rows(skip))), command)
    print(f"done in {time.monotonic() - started:.0f} s; see {DOCS_PAGE}")


# The first word of a summary row names its benchmark.
_ROW_PREFIX = {"overhead": "overhead,", "webhook": "webhook ack,", "ingest": "ingest,",
               "queries": "queries,", "import": "import,"}


def earlier_rows(skipped: set[str]) -> list[str]:
    """Return the summary rows of ``skipped`` benchmarks from the page, as they were written.

    A partial run keeps the figures of the benchmarks it skips; their own sections show
    when those were measured.
    """
    if not DOCS_PAGE.exists() or not skipped:
        return []
    text = DOCS_PAGE.read_text(encoding="utf-8")
    start = text.find("<!-- bench:summary -->")
    end = text.find("<!-- /bench:summary -->")
    if start < 0 or end < 0:
        return []
    prefixes = tuple(f"| {_ROW_PREFIX[name]}" for name in skipped if name in _ROW_PREFIX)
    return [line for line in text[start:end].splitlines() if prefixes and line.startswith(prefixes)]


def summary(results: dict[str, Any], carried_rows: list[str] | None = None) -> str:
    """Return the table of measured figures against targets, with ``carried_rows`` appended."""
    rows: list[tuple[str, str, str, bool]] = []
    for database, loads in results.get("overhead", {}).items():
        for load, items in loads.items():
            for kind in ("wrapped", "wrapped-nosentiment", "wrapped-thread", "wrapped+settled"):
                bare = items.get(overhead.baseline(kind))
                if kind not in items or bare is None:
                    continue
                ratio, added, met = overhead.verdict(items[kind], bare, load)
                if load == "paced":
                    rows.append((f"overhead, {database}, paced, {kind}: p99 added",
                                 "<= 1 ms", f"{fmt(added, 1)} ms", met))
                else:
                    rows.append((f"overhead, {database}, saturated, {kind}: RPS kept / p99 added",
                                 ">= 90 % / <= 1 ms", f"{ratio * 100:.0f} % / {fmt(added, 1)} ms",
                                 met))
    for (database, load, platform), result in results.get("webhook", {}).items():
        rows.append(
            (
                f"webhook ack, {database}, {load}, {platform}: p50 / p99",
                "<= 5 / <= 50 ms",
                f"{fmt(result.p50_ms, 1)} / {fmt(result.p99_ms, 1)} ms",
                webhook.met(result),
            )
        )
    for item in results.get("ingest", []):
        if item.mode == "paced":
            target = ingest.TARGETS[item.database]
            rows.append(
                (
                    f"ingest, {item.database}, sentiment {'on' if item.sentiment else 'off'}, "
                    f"writer in {item.placement}",
                    f">= {target:,}/s",
                    f"{fmt(item.rate, 0)}/s",
                    item.rate >= target,
                )
            )
    timings = [t for t in results.get("queries", []) if not t.error]
    for database in ("sqlite", "postgresql"):
        mine = [t for t in timings if t.database == database]
        if mine:
            worst = max(mine, key=lambda t: t.p95)
            sizes = " and ".join(f"{size / 1e6:g}M" for size in sorted({t.messages for t in mine}))
            over = sum(1 for t in mine if t.p95 > queries.TARGET_MS)
            rows.append(
                (
                    f"queries, {database}, {sizes} messages: worst p95 "
                    f"({over} of {len(mine)} measurements over)",
                    "<= 100 ms at 10M",
                    f"{fmt(worst.p95, 0)} ms ({worst.metric})",
                    over == 0,
                )
            )
    for item in results.get("import", []):
        rows.append(
            (
                f"import, {item.database}",
                f">= {importer.TARGET:,}/s",
                f"{fmt(item.rate, 0)}/s",
                item.rate >= importer.TARGET,
            )
        )
    lines = [
        "## Summary: measured figures against targets",
        "",
        "| benchmark | target | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {target} | {measured} | {'met' if met else '**missed**'} |"
        for name, target, measured, met in rows
    ]
    lines += carried_rows or []
    return "\n".join(lines)


if __name__ == "__main__":
    main()
