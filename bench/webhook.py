"""Webhook acknowledgement latency of the Messenger and WhatsApp adapters under load.

The recording proxy (``adapters/proxy.py``, recording only, no bot to forward to) runs in
its own uvicorn process with a SQLite or PostgreSQL store; wrk posts webhooks signed with
the app secret (``X-Hub-Signature-256``) from another process, saturated and paced. Bodies are generated up front,
each with its own message ids, and cycled by bench/lua/webhook.lua.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json

from bench.common import (
    DATA_DIR,
    Section,
    command_line,
    fmt,
    recreate_postgres_database,
    write_section,
)
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


def measure(platform: str, database: str, seconds: float, warmup: float, connections: int,
            delay_ms: int) -> LoadResult:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    build = messenger_body if platform == "messenger" else whatsapp_body
    bodies = [build(index) for index in range(BODIES)]
    table = DATA_DIR / f"webhook_{platform}.lua"
    write_lua_table(table, [(body, sign(body)) for body in bodies])
    if database == "postgresql":
        url = recreate_postgres_database("chatmw_bench_webhook")
    else:
        path = DATA_DIR / f"webhook_{platform}.db"
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    env = {"BENCH_BODIES": str(table)}
    if delay_ms:
        env["BENCH_DELAY_MS"] = str(delay_ms)
    with served("proxy", url) as port:
        run_wrk(port, "webhook.lua", warmup, connections, env)
        return run_wrk(port, "webhook.lua", seconds, connections, env)


def met(result: LoadResult) -> bool:
    return result.p50_ms <= 5 and result.p99_ms <= 50


def render(results: dict[tuple[str, str, str], LoadResult], args: argparse.Namespace) -> str:
    paced_rate = args.connections * 1000 / args.delay_ms
    lines = [
        "## Webhook acknowledgement latency (Messenger and WhatsApp)",
        "",
        f"The recording proxy (`chatmw proxy` without a bot URL, writer process as it comes) "
        f"in its own uvicorn process, loaded by `wrk -t1 -c{args.connections}` on 127.0.0.1 "
        f"with signed webhooks ({BODIES:,} distinct bodies of one text message each, cycled) "
        f"for {args.seconds:g} s after a {args.warmup:g} s warm-up. `saturated`: each "
        f"connection posts again as soon as it is answered, so latency includes the queue "
        f"of {args.connections} requests at full capacity. `paced`: each connection waits "
        f"{args.delay_ms} ms between webhooks (at most {paced_rate:,.0f} webhooks/s). "
        f"Latency is from wrk's send to the proxy's 200 acknowledgement. Targets: "
        f"p50 <= 5 ms, p99 <= 50 ms.",
        "",
        "| database | load | platform | webhooks/s | p50 (ms) | p90 (ms) | p99 (ms) | "
        "max (ms) | errors | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (database, load, platform), result in results.items():
        lines.append(
            f"| {database} | {load} | {platform} | {fmt(result.rps, 0)} | "
            f"{fmt(result.p50_ms, 2)} | {fmt(result.p90_ms, 2)} | {fmt(result.p99_ms, 2)} | "
            f"{fmt(result.max_ms, 1)} | {result.errors} | "
            f"{'met' if met(result) else '**missed**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, str, str], LoadResult]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--delay-ms", type=int, default=16,
                        help="pause of each connection between webhooks in the paced load")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for database in args.databases.split(","):
        for load, delay_ms in (("saturated", 0), ("paced", args.delay_ms)):
            for platform in ("messenger", "whatsapp"):
                result = measure(platform, database, args.seconds, args.warmup,
                                 args.connections, delay_ms)
                results[(database, load, platform)] = result
                print(database, load, platform, result, flush=True)
    if not args.no_docs:
        write_section(Section("webhook", render(results, args)), command_line())
    return results


if __name__ == "__main__":
    main()
