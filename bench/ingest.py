"""Ingest: messages per second through the Recorder and the Writer, and resident memory.

For SQLite and PostgreSQL, with the sentiment enricher on and off, a producer thread
submits synthetic messages (bench/workload.py) to a started Recorder for a fixed time:

- ``paced``: the producer waits while the recorder's queue is full, so the figure is the
  sustained write rate with no event dropped;
- ``flood``: the producer never waits, so the queue stays full and the excess is dropped;
  the resident memory sampled meanwhile shows that memory is bounded by the queue size,
  not by the offered load.

The rate counts events written between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (
    DATA_DIR,
    ROOT,
    Section,
    command_line,
    fmt,
    recreate_postgres_database,
    rss_mib,
    write_section,
)
from bench.workload import message_stream
from chatmw.config import PROCESSES_ENV, Settings
from chatmw.recorder import Recorder, RecorderSettings
from chatmw.runtime import build_writer
from chatmw.store.engine import make_engine, upgrade
from chatmw.writer_process import ProcessWriter, start_process_writer

TARGETS = {"sqlite": 25_000, "postgresql": 20_000}


@dataclass
class IngestResult:
    database: str
    mode: str
    sentiment: bool
    placement: str
    seconds: float
    written: int
    dropped: int
    rate: float
    rss_start: float
    rss_max: float
    rss_end: float
    batch_size: int
    queue_size: int
    child_rss_max: float | None = None


def fresh_url(database: str) -> str:
    if database == "sqlite":
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        path = DATA_DIR / "ingest.db"
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return f"sqlite:///{path}"
    return recreate_postgres_database("chatmw_bench_ingest")


def run_one(
    database: str,
    mode: str,
    sentiment: bool,
    placement: str,
    seconds: float,
    warmup: float,
    settings: RecorderSettings,
) -> IngestResult:
    url = fresh_url(database)
    engine = make_engine(url)
    upgrade(engine)
    # The writer every runtime builds (lead detection, query types, survey answers), with
    # the sentiment enricher on or off.
    writer: Any = build_writer(Settings(database_url=url, sentiment=sentiment), engine)
    if placement == "process-1":
        # One writer process, without the partners a PostgreSQL store gets by default.
        os.environ[PROCESSES_ENV] = "1"
    if placement in ("process", "process-1"):
        writer = start_process_writer(writer, url)
        writer.write([])  # waits until the child has started and imported the writer
    recorder = Recorder(writer, settings)
    recorder.start()
    stop = threading.Event()
    samples: list[float] = []

    def produce() -> None:
        stream = message_stream(prefix=f"{database[0]}{int(sentiment)}{mode[0]}")
        count = 0
        for message in stream:
            if stop.is_set():
                return
            if mode == "paced":
                count += 1
                if count % 200 == 0:
                    while (
                        recorder.stats().queue_depth > settings.queue_size - 400
                        and not stop.is_set()
                    ):
                        time.sleep(0.002)
            recorder.submit(message)

    child_samples: list[float] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mib())
            child = getattr(getattr(writer, "_process", None), "pid", None)
            if child is not None:
                with contextlib.suppress(OSError):
                    child_samples.append(rss_mib(child))
            time.sleep(0.2)

    rss_start = rss_mib()
    threads = [
        threading.Thread(target=produce, daemon=True),
        threading.Thread(target=sample, daemon=True),
    ]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    written_before = recorder.stats().written
    started = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    stats = recorder.stats()
    stop.set()
    for thread in threads:
        thread.join()
    recorder.stop(timeout=60)
    if isinstance(writer, ProcessWriter):
        writer.close()
    engine.dispose()
    written = stats.written - written_before
    return IngestResult(
        database,
        mode,
        sentiment,
        placement,
        elapsed,
        written,
        sum(stats.dropped.values()),
        written / elapsed,
        rss_start,
        max(samples, default=rss_start),
        samples[-1] if samples else rss_start,
        settings.batch_size,
        settings.queue_size,
        max(child_samples) if child_samples else None,
    )


def render(results: list[IngestResult], seconds: float, warmup: float) -> str:
    lines = [
        "## Ingest: messages per second through the Recorder and the Writer",
        "",
        f"A producer thread submits synthetic chat messages (`bench/workload.py`: 2,000 "
        f"interleaved conversations, a third without conversation id, attributes on first "
        f"messages) to a started `Recorder` in the same process for {seconds:g} s after a "
        f"{warmup:g} s warm-up. `paced` waits while the queue is full (nothing dropped), so "
        f"the rate is the sustained write rate; `flood` never waits, so the queue stays full "
        f"and the excess is dropped, and the resident memory (RSS, sampled every 0.2 s) shows "
        f"what the backlog costs, at two queue sizes. Each row runs in a fresh interpreter. "
        f"`writer` is where the store writer runs (the writer every runtime builds: sentiment "
        f"on or off, lead detection, query types, survey answers): the recorder's thread, or "
        f"a child process (`chatmw.writer_process`, the default of a runtime), whose own "
        f"largest RSS is in the last column. On PostgreSQL `process` has a partner process "
        f"(two writer processes, the default) and `process-1` is the child alone "
        f"(`CHATMW_WRITER_PROCESSES=1`). Fresh database for each row; targets apply to "
        f"sentiment on.",
        "",
        "| database | mode | sentiment | writer | batch / queue | written/s | target | dropped | "
        "RSS start / max / end (MiB) | writer process RSS max (MiB) |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        target = TARGETS[r.database]
        verdict = (
            ""
            if r.mode != "paced" or not r.sentiment
            else (" (met)" if r.rate >= target else " (**missed**)")
        )
        lines.append(
            f"| {r.database} | {r.mode} | {'on' if r.sentiment else 'off'} | {r.placement} | "
            f"{r.batch_size:,} / {r.queue_size:,} | {fmt(r.rate, 0)} | "
            f">= {target:,}{verdict} | {r.dropped:,} | "
            f"{fmt(r.rss_start)} / {fmt(r.rss_max)} / {fmt(r.rss_end)} | "
            f"{'' if r.child_rss_max is None else fmt(r.child_rss_max)} |"
        )
    return "\n".join(lines)


def run_isolated(database: str, mode: str, sentiment: bool, placement: str, seconds: float,
                 warmup: float, settings: RecorderSettings) -> IngestResult:
    """Run one configuration in a fresh interpreter, so its RSS owes nothing to earlier rows."""
    command = [sys.executable, "-m", "bench.ingest", "--one",
               f"{database},{mode},{int(sentiment)},{placement}", "--seconds", str(seconds),
               "--warmup", str(warmup), "--batch-size", str(settings.batch_size),
               "--queue-size", str(settings.queue_size)]
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True,
                            timeout=seconds + warmup + 300).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return IngestResult(**json.loads(line[len("RESULT "):]))


def main(argv: list[str] | None = None) -> list[IngestResult]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--modes", default="paced,flood")
    parser.add_argument("--sentiment", default="on,off")
    parser.add_argument("--writers", default="thread,process", help="where the writer runs")
    parser.add_argument("--batch-size", type=int, default=RecorderSettings().batch_size)
    parser.add_argument("--queue-size", type=int, default=RecorderSettings().queue_size)
    parser.add_argument("--flood-queue-sizes", default="10000,100000",
                        help="queue sizes of the flood rows, which show the memory bound")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs page")
    args = parser.parse_args(argv)
    settings = RecorderSettings(batch_size=args.batch_size, queue_size=args.queue_size)
    if args.one:
        database, mode, flag, placement = args.one.split(",")
        result = run_one(database, mode, flag == "1", placement, args.seconds, args.warmup,
                         settings)
        print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)
        return [result]
    results = []
    for database in args.databases.split(","):
        for flag in args.sentiment.split(","):
            placements = args.writers.split(",")
            if database == "postgresql" and flag == "on" and "process" in placements:
                # One writer process beside the default two, sentiment on.
                placements.append("process-1")
            for placement in placements:
                if "paced" in args.modes.split(","):
                    results.append(run_isolated(database, "paced", flag == "on", placement,
                                                args.seconds, args.warmup, settings))
                    print(results[-1], flush=True)
        if "flood" not in args.modes.split(","):
            continue
        # The flood rows show memory: sentiment on, writer process, two queue sizes.
        for size in (int(value) for value in args.flood_queue_sizes.split(",")):
            flood = RecorderSettings(batch_size=args.batch_size, queue_size=size)
            results.append(run_isolated(database, "flood", True, "process", args.seconds,
                                        args.warmup, flood))
            print(results[-1], flush=True)
    if not args.no_docs:
        write_section(Section("ingest", render(results, args.seconds, args.warmup)), command_line())
    return results


if __name__ == "__main__":
    main()
