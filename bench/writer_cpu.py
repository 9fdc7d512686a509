"""CPU of the store writer per message: ``Writer.write`` on pre-generated batches.

The writer is the one every runtime builds (``chatmw.runtime.build_writer``, sentiment on),
with the garbage collector tuned as in a writer process. Batches of ``bench/workload.py``
are generated first, and the warm-up batches fill the writer's caches. The script then
reports, per message of the measured batches, the writer's CPU time (``time.process_time``)
and on PostgreSQL the CPU of the server backends of the benchmark database (from ``/proc``).

Under ``valgrind --tool=callgrind --instr-atstart=no`` with ``--callgrind``, the script
turns instrumentation on after the warm-up and collects only inside the measured
``Writer.write`` calls, so the counted instructions are the writer's own::

    valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no \\
        python -m bench.writer_cpu --database sqlite --callgrind

The client requests come from a small library compiled from ``valgrind/callgrind.h`` on
first use (a C compiler and valgrind's headers are needed for ``--callgrind`` only).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import DATA_DIR, fresh_sqlite_url, recreate_postgres_database
from bench.workload import message_stream
from chatmw.config import Settings
from chatmw.runtime import build_writer
from chatmw.store.engine import make_engine, upgrade
from chatmw.writer_process import settle_collector

_CLIENT_REQUESTS = r"""
#include <valgrind/callgrind.h>
void chatmw_start_instrumentation(void) { CALLGRIND_START_INSTRUMENTATION; }
void chatmw_toggle_collect(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def _client_requests() -> Any:
    # Outside valgrind the requests do nothing, so the library is safe to call anywhere.
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    source = DATA_DIR / "callgrind_requests.c"
    library = DATA_DIR / "callgrind_requests.so"
    if not library.exists() or source.read_text() != _CLIENT_REQUESTS:
        source.write_text(_CLIENT_REQUESTS)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
                       check=True)
    return ctypes.CDLL(str(library))


def _fresh_url(database: str) -> str:
    if database == "sqlite":
        return fresh_sqlite_url("writer_cpu.db")
    return recreate_postgres_database("chatmw_bench_writer_cpu")


def _backend_ticks(url: str) -> int:
    # CPU ticks (user and system) of the server backends connected to this database, read
    # on a connection of its own (the writer's pool may hold an idle one).
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        pids = [row[0] for row in connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--callgrind", action="store_true",
                        help="collect callgrind instructions inside the measured writes only")
    args = parser.parse_args()

    url = _fresh_url(args.database)
    engine = make_engine(url)
    upgrade(engine)
    writer = build_writer(Settings(database_url=url, sentiment=True), engine)
    stream = message_stream(prefix=f"w{args.database[0]}")
    batches = [list(itertools.islice(stream, args.batch_size))
               for _ in range(args.warmup + args.batches)]
    requests = _client_requests() if args.callgrind else None
    settle_collector()
    for batch in batches[:args.warmup]:
        writer.write(batch)
    if requests is not None:
        requests.chatmw_start_instrumentation()
    server_before = _backend_ticks(url) if args.database == "postgresql" else 0
    cpu = 0.0
    wall_started = time.perf_counter()
    for batch in batches[args.warmup:]:
        started = time.process_time()
        if requests is not None:
            requests.chatmw_toggle_collect()
        writer.write(batch)
        if requests is not None:
            requests.chatmw_toggle_collect()
        cpu += time.process_time() - started
    wall = time.perf_counter() - wall_started
    messages = args.batches * args.batch_size
    line = (f"{args.database}: writer {cpu / messages * 1e6:.1f} us/message "
            f"({wall / messages * 1e6:.1f} us/message of wall-clock time)")
    if args.database == "postgresql":
        ticks = _backend_ticks(url) - server_before
        server = ticks / os.sysconf("SC_CLK_TCK") / messages * 1e6
        line += f", server {server:.1f} us/message"
    print(line, flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
