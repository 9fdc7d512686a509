"""Webhook acknowledgement latency of the Messenger and WhatsApp adapters under load.

The recording proxy (``adapters/proxy.py``, recording only, no bot to forward to) runs in
its own uvicorn process with a SQLite store; wrk posts webhooks signed with the app
secret (``X-Hub-Signature-256``) from another process. Bodies are generated up front,
each with its own message ids, and cycled by bench/lua/webhook.lua.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json

from bench.common import DATA_DIR, Section, command_line, fmt, write_section
from bench.loadgen import LoadResult, run_wrk, served, write_lua_table
from bench.serve import APP_SECRET

BODIES = 4000


def messenger_body(index: int) -> bytes:
    base_ms = 1767225600000 + index * 1000
    document = {
        "object": "page",
        "entry": [
            {
                "id": "104857600000001",
                "time": base_ms + 500,
                "messaging": [
                    {
                        "sender": {"id": f"71{index % 3000:014d}"},
                        "recipient": {"id": "104857600000001"},
                        "timestamp": base_ms,
                        "message": {
                            "mid": f"m_bench_{index}",
                            "text": "where is my order? it is late",
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(document).encode()


def whatsapp_body(index: int) -> bytes:
    wa_id = f"49151{index % 3000:08d}"
    document = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "440000000000001",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "4930000000",
                                "phone_number_id": "230000000000001",
                            },
                            "contacts": [{"profile": {"name": "Kim"}, "wa_id": wa_id}],
                            "messages": [
                                {
                                    "from": wa_id,
                                    "id": f"wamid.bench{index}",
                                    "timestamp": str(1767225600 + index),
                                    "type": "text",
                                    "text": {"body": "Hello, can I change my delivery address?"},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(document).encode()


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()


def measure(platform: str, seconds: float, warmup: float, connections: int) -> LoadResult:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    build = messenger_body if platform == "messenger" else whatsapp_body
    bodies = [build(index) for index in range(BODIES)]
    table = DATA_DIR / f"webhook_{platform}.lua"
    write_lua_table(table, [(body, sign(body)) for body in bodies])
    path = DATA_DIR / f"webhook_{platform}.db"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    env = {"BENCH_BODIES": str(table)}
    with served("proxy", f"sqlite:///{path}") as port:
        run_wrk(port, "webhook.lua", warmup, connections, env)
        return run_wrk(port, "webhook.lua", seconds, connections, env)


def render(results: dict[str, LoadResult], args: argparse.Namespace) -> str:
    lines = [
        "## Webhook acknowledgement latency (Messenger and WhatsApp)",
        "",
        f"The recording proxy (`chatmw proxy` without a bot URL) in its own uvicorn process "
        f"with a SQLite store, loaded by `wrk -t1 -c{args.connections}` on 127.0.0.1 with "
        f"signed webhooks ({BODIES:,} distinct bodies of one text message each, cycled) for "
        f"{args.seconds:g} s after a {args.warmup:g} s warm-up. Latency is from wrk's send to "
        f"the proxy's 200 acknowledgement. Targets: p50 <= 5 ms, p99 <= 50 ms.",
        "",
        "| platform | webhooks/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | errors | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for platform, result in results.items():
        met = result.p50_ms <= 5 and result.p99_ms <= 50
        lines.append(
            f"| {platform} | {fmt(result.rps, 0)} | {fmt(result.p50_ms, 2)} | "
            f"{fmt(result.p90_ms, 2)} | {fmt(result.p99_ms, 2)} | {fmt(result.max_ms, 1)} | "
            f"{result.errors} | {'met' if met else '**missed**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, LoadResult]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for platform in ("messenger", "whatsapp"):
        results[platform] = measure(platform, args.seconds, args.warmup, args.connections)
        print(platform, results[platform], flush=True)
    if not args.no_docs:
        write_section(Section("webhook", render(results, args)), command_line())
    return results


if __name__ == "__main__":
    main()
