"""Run an app in its own uvicorn process and load it with wrk from another process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import DATA_DIR, ROOT, free_port, wait_for_port

LUA_DIR = ROOT / "bench" / "lua"


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (bench/run.sh does it)")
    return path


@contextmanager
def served(kind: str, database_url: str | None = None) -> Iterator[int]:
    """Start ``bench.serve KIND`` on a free port; yield the port; stop it with SIGINT."""
    port = free_port()
    command = [sys.executable, "-m", "bench.serve", kind, str(port)]
    if database_url:
        command.append(database_url)
    # The server's log goes to a file: an unread pipe fills up and then blocks the server
    # (and its writer process) in the middle of a run.
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log = (DATA_DIR / f"serve-{kind}.log").open("ab")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    try:
        wait_for_port(port, timeout_s=60)
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_wrk(
    port: int,
    script: str,
    seconds: float,
    connections: int,
    env: dict[str, str] | None = None,
    path: str = "/",
) -> LoadResult:
    """Run wrk (one thread) against 127.0.0.1:``port`` and parse the script's report line."""
    command = [
        require_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_DIR / script),
        f"http://127.0.0.1:{port}{path}",
    ]
    environment = {**os.environ, "BENCH_LUA_DIR": str(LUA_DIR), **(env or {})}
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=environment, timeout=seconds + 60
    ).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
    )


def settle(seconds: float = 1.0) -> None:
    time.sleep(seconds)


def lua_string(value: bytes | str) -> str:
    """Return ``value`` as a quoted Lua string literal (3-digit decimal escapes)."""
    data = value.encode() if isinstance(value, str) else value
    return (
        '"'
        + "".join(
            f"\\{byte:03d}" if byte < 32 or byte > 126 or byte in (34, 92) else chr(byte)
            for byte in data
        )
        + '"'
    )


def write_lua_table(path: Path, rows: list[tuple[bytes, str]]) -> None:
    with path.open("w", encoding="ascii") as handle:
        handle.write("return {\n")
        for body, signature in rows:
            handle.write(f"  {{{lua_string(body)}, {lua_string(signature)}}},\n")
        handle.write("}\n")
