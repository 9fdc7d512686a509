"""Helpers shared by the benchmarks: machine description, statistics, RSS, databases, docs."""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "bench" / ".data"
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
PG_ADMIN_URL = os.environ.get("CHATMW_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def machine_description() -> dict[str, str]:
    """Return nproc, CPU model, memory, load, Python, SQLite and PostgreSQL versions."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "load average (1, 5, 15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "reference loop at start (best of 3)": f"{reference_loop_seconds():.2f} s",
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_version(),
    }


def reference_loop_seconds(rounds: int = 3) -> float:
    """Return the best time of a fixed pure-Python loop (10 million additions).

    The speed of a shared virtual machine's cores drifts, by a factor of two within minutes
    on the machines these figures come from. This figure, taken when a section starts,
    shows how fast the cores were then, so sections from different runs can be compared.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for number in range(10_000_000):
            total += number
        best = min(best, time.perf_counter() - started)
    return best


def postgres_version() -> str:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as connection:
            row = connection.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "unknown"
    except psycopg.Error as error:
        return f"unreachable ({type(error).__name__})"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the percentile, interpolating between ranks like PostgreSQL's percentile_cont."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def rss_mib(pid: int | None = None) -> float:
    """Return the resident set size of ``pid`` (this process by default) in MiB, from /proc."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def _named(database: str) -> str:
    """Return ``database`` with the ``CHATMW_BENCH_DB_SUFFIX`` suffix, so runs can keep apart."""
    name = database + os.environ.get("CHATMW_BENCH_DB_SUFFIX", "")
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"invalid database name {name!r}")
    return name


def postgres_url(database: str) -> str:
    """Return the URL of ``database`` on the benchmark server."""
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{_named(database)}"


def recreate_postgres_database(database: str) -> str:
    """Drop and create ``database``; return its URL."""
    name = _named(database)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {name}")
    return postgres_url(database)


def fresh_sqlite_url(filename: str) -> str:
    """Delete the SQLite file ``filename`` under DATA_DIR with its WAL files; return its URL."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / filename
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def postgres_database_exists(database: str) -> bool:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (_named(database),)
        ).fetchone()
    return row is not None


def command_line() -> str:
    """Return the command that runs this benchmark, as typed from the repository root."""
    module = sys.argv[0]
    if module.endswith(".py") and "bench" in Path(module).parts:
        name = Path(module).stem
        return shlex.join([".venv/bin/python", "-m", f"bench.{name}", *sys.argv[1:]])
    return shlex.join([".venv/bin/python", *sys.argv])


@dataclass
class Section:
    """One benchmark's part of docs/benchmarks.md."""

    name: str
    markdown: str


def write_section(section: Section, command: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md.

    Each section carries the machine it ran on and the command that produced it, because
    benchmarks may be rerun one at a time.
    """
    machine = machine_description()
    lines = [
        f"<!-- bench:{section.name} -->",
        section.markdown.rstrip(),
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", f"<!-- /bench:{section.name} -->"]
    block = "\n".join(lines)
    DOCS_PAGE.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS_PAGE.read_text(encoding="utf-8") if DOCS_PAGE.exists() else _page_header()
    pattern = re.compile(
        rf"<!-- bench:{re.escape(section.name)} -->.*?<!-- /bench:"
        rf"{re.escape(section.name)} -->",
        re.S,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS_PAGE.write_text(text, encoding="utf-8")


def _page_header() -> str:
    return (
        "# Benchmarks\n\n"
        "Figures measured by the scripts in `bench/`. `bash bench/run.sh` (or "
        "`.venv/bin/python -m bench.run_all`) regenerates every section of this page; "
        "`.venv/bin/python -m bench.NAME` regenerates one. Each section names the machine "
        "and the command that produced it.\n"
    )


def run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"
