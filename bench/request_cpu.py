"""Instructions per chat request in the bot's process, counted by callgrind.

The FAQ bot of the overhead benchmark is called in process through ASGI (no server, no
socket), bare and wrapped by ``ChatMetricsMiddleware`` with three recorders:

- ``noop``: a recorder whose ``submit`` does nothing, so only the middleware counts;
- ``recorder``: a started ``Recorder`` whose writer drops every batch undecoded;
- ``process``: a started ``Recorder`` with the writer process on SQLite, as a runtime
  builds it. Callgrind follows only the bot's process, so the count includes the
  recorder's thread sending batches down the pipe, not the child that writes them.

Each variant runs in its own interpreter under ``valgrind --tool=callgrind`` with
``PYTHONHASHSEED=0``. Instrumentation starts after the warm-up requests and counts only
the measured ones, in every thread of the process. Counts of instructions do not depend
on the load of the machine, so a change to the request path shows here even when
requests per second spread by more than its effect::

    python -m bench.request_cpu
    python -m bench.request_cpu --baseline ../chatmw-old   # a second checkout, same venv

``--baseline`` runs the same variants with the package of another checkout first on the
import path, for a side-by-side count before and after a change. Needs valgrind and a C
compiler (for the client requests of ``bench.writer_cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, Section, command_line, write_section
from bench.serve import _NullWriter

VARIANTS = ("bare", "noop", "recorder", "process")
TEXTS = ("hello there", "what are your opening hours?", "how much is the pro plan",
         "I want a refund please", "bye")


class _NoopRecorder:
    def submit(self, event: object) -> bool:
        return True


def _build(variant: str, database: Path) -> tuple[Any, Any]:
    """Return the ASGI app of ``variant`` and its recorder (``None`` when there is none)."""
    from chatmw._demo.faq_bot import CHAT_PATH, FAQ_CODEC, create_bot
    from chatmw.middleware import ChatMetricsMiddleware
    from chatmw.recorder import Recorder, RecorderSettings

    bot = create_bot((0.0, 0.0))
    if variant == "bare":
        return bot, None
    if variant == "noop":
        return ChatMetricsMiddleware(bot, _NoopRecorder(), FAQ_CODEC, paths=[CHAT_PATH]), None
    if variant == "recorder":
        recorder = Recorder(_NullWriter(), RecorderSettings())
    else:
        from chatmw.config import Settings
        from chatmw.runtime import build_writer
        from chatmw.store.engine import make_engine, upgrade
        from chatmw.writer_process import start_process_writer

        url = f"sqlite:///{database}"
        engine = make_engine(url)
        upgrade(engine)
        writer = start_process_writer(build_writer(Settings(database_url=url), engine), url)
        writer.write([])  # waits until the child has started
        recorder = Recorder(writer, RecorderSettings())
    recorder.start()
    return ChatMetricsMiddleware(bot, recorder, FAQ_CODEC, paths=[CHAT_PATH]), recorder


async def _request(app: Any, index: int) -> None:
    from chatmw._demo.faq_bot import CHAT_PATH

    text = TEXTS[index % len(TEXTS)]
    body = f'{{"user_id": "user-{index % 5000}", "message": "{text}"}}'.encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": CHAT_PATH,
             "raw_path": CHAT_PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"the bot responded with status {sent[0]['status']}, expected 200")


def _measure(variant: str, requests: int, warmup: int) -> None:
    """Warm up, then count ``requests`` requests (this runs inside callgrind)."""
    from bench.writer_cpu import _client_requests

    client = _client_requests()
    with tempfile.TemporaryDirectory() as directory:
        app, recorder = _build(variant, Path(directory) / "request_cpu.db")

        async def run() -> None:
            for index in range(warmup):
                await _request(app, index)
            gc.collect()
            client.chatmw_start_instrumentation()
            client.chatmw_toggle_collect()
            for index in range(requests):
                await _request(app, warmup + index)
            client.chatmw_toggle_collect()

        asyncio.run(run())
        if recorder is not None:
            if not recorder.flush(120):
                raise RuntimeError("the recorder did not write every exchange in time")
            recorder.stop(60)
            close = getattr(recorder.writer, "close", None)
            if close is not None:
                close()


def count(variant: str, requests: int, warmup: int, source: Path) -> float:
    """Return the instructions per request of ``variant`` with the package under ``source``."""
    with tempfile.TemporaryDirectory() as directory:
        # Only the package comes from ``source``, and the benchmark's modules from this checkout.
        (Path(directory) / "chatmw").symlink_to(source / "chatmw")
        environment = {**os.environ, "PYTHONHASHSEED": "0",
                       "PYTHONPATH": os.pathsep.join([directory, str(ROOT)])}
        # The working directory too, because ``python -m`` puts it first on the path.
        return _count_with(variant, requests, warmup, environment, directory)


def _count_with(variant: str, requests: int, warmup: int, environment: dict[str, str],
                directory: str) -> float:
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.request_cpu",
               "--one", variant, "--requests", str(requests), "--warmup", str(warmup)]
    finished = subprocess.run(command, cwd=directory, env=environment, capture_output=True,
                              text=True, timeout=3600)
    found = re.search(r"Collected : (\d+)", finished.stderr)
    if finished.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {variant} failed:\n{finished.stderr[-2000:]}")
    return int(found.group(1)) / requests


def _label(checkout: Path) -> str:
    """Name a checkout by its commit, marked when files differ from it."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *arguments], capture_output=True,
                              text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or checkout.name
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "chatmw")
    return f"{commit} with changes" if changed else commit


def render(rows: dict[str, dict[str, float]], requests: int, warmup: int,
           labels: list[str]) -> str:
    lines = [
        "## Request path: instructions per chat request in the bot's process",
        "",
        f"The FAQ bot called in process through ASGI, {requests:,} requests counted after "
        f"{warmup:,} warm-up requests, each variant in its own interpreter under callgrind "
        f"(`PYTHONHASHSEED=0`; counts do not depend on the machine's load). `noop`: the "
        f"middleware with a recorder whose `submit` does nothing. `recorder`: a started "
        f"`Recorder` whose writer drops every batch undecoded. `process`: the writer process "
        f"on SQLite (the bot's process only: its recorder thread pickles and sends the "
        f"batches). "
        f"`added` is the share over `bare`.",
        "",
        "| variant | " + " | ".join(f"{label} (instructions) | {label} added" for label in labels)
        + " |",
        "| --- |" + " ---: | ---: |" * len(labels),
    ]
    for variant in VARIANTS:
        cells = []
        for label in labels:
            value = rows[label][variant]
            bare = rows[label]["bare"]
            share = (value / bare - 1) * 100
            added = "" if variant == "bare" else f"{value - bare:,.0f} ({share:.1f} %)"
            cells.append(f"{value:,.0f} | {added}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of chatmw to count first, for a side-by-side table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs page")
    args = parser.parse_args(argv)
    if args.one:
        _measure(args.one, args.requests, args.warmup)
        return {}
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "bare" not in variants:
        parser.error(f"--variants takes bare (required) and any of {', '.join(VARIANTS[1:])}; "
                     f"got {args.variants!r}")
    sources = {_label(ROOT): ROOT}
    if args.baseline is not None:
        if not (args.baseline / "chatmw" / "middleware.py").is_file():
            parser.error(f"--baseline {args.baseline} holds no chatmw package")
        sources = {_label(args.baseline.resolve()): args.baseline.resolve(), **sources}
    rows: dict[str, dict[str, float]] = {}
    for label, source in sources.items():
        rows[label] = {}
        for variant in variants:
            rows[label][variant] = count(variant, args.requests, args.warmup, source)
            print(f"{label}: {variant} {rows[label][variant]:,.0f} instructions/request",
                  flush=True)
    if not args.no_docs and variants == list(VARIANTS):
        write_section(Section("request_cpu", render(rows, args.requests, args.warmup,
                                                    list(rows))), command_line())
    return rows


if __name__ == "__main__":
    main()
