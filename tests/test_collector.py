"""The garbage-collector policy, applied by the servers once they have started."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from adapters_support import APP_SECRET, VERIFY_TOKEN, signature, wait_until
from sqlalchemy import create_engine, text

from chatmw.collector import SERVER_THRESHOLDS

CHATMW = str(Path(sys.executable).parent / "chatmw")
PROXY_ENV = {"CHATMW_META_APP_SECRET": APP_SECRET, "CHATMW_META_VERIFY_TOKEN": VERIFY_TOKEN,
             "CHATMW_GRAPH_BASE_URL": "http://127.0.0.1:9"}
SETTLED = re.compile(r"garbage collector settled: (\d+) start-up objects frozen, "
                     r"thresholds \((\d+), (\d+), (\d+)\)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_settle_collector_freezes_and_sets_thresholds() -> None:
    # In a child interpreter: freezing the test process would keep its garbage forever.
    script = (
        "import gc, json\n"
        "before = gc.get_freeze_count()\n"
        "from chatmw.collector import settle_collector\n"
        "frozen = settle_collector()\n"
        "print(json.dumps([before, frozen, gc.get_freeze_count(), gc.get_threshold(),"
        " gc.collect()]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)

    before, frozen, counted, thresholds, collected = json.loads(result.stdout)
    assert before == 0
    assert frozen == counted > 1000
    assert tuple(thresholds) == SERVER_THRESHOLDS == (10_000, 10, 10)
    assert collected == 0


def run_until_answered(command: list[str], env: dict[str, str], url: str,
                       params: dict[str, str] | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def answers() -> bool:
        try:
            return httpx.get(url, params=params, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(answers, timeout=60):
        process.terminate()
        pytest.fail(f"{command[2]} did not start: {process.communicate(timeout=30)[0]}")
    return process


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    return output


def settled_after_startup(output: str) -> int:
    found = SETTLED.findall(output)
    assert len(found) == 1, output
    frozen, *thresholds = (int(value) for value in found[0])
    assert tuple(thresholds) == SERVER_THRESHOLDS
    # After the lifespan start-up (the runtime started), before uvicorn reports it complete.
    settled_at = output.index("garbage collector settled")
    assert output.index("recorder started") < settled_at
    assert settled_at < output.index("Application startup complete")
    return frozen


def test_serve_settles_collector_after_startup(database_url: str) -> None:
    port = free_port()
    env = {**os.environ, "CHATMW_DATABASE_URL": database_url}
    env.pop("CHATMW_CONFIG", None)
    command = [CHATMW, "-v", "serve", "--no-auth", "--port", str(port)]

    process = run_until_answered(command, env, f"http://127.0.0.1:{port}/metrics/summary")
    output = stop(process)

    assert settled_after_startup(output) > 10_000


def test_proxy_settles_collector_and_records_with_writer_process(database_url: str) -> None:
    port = free_port()
    # Bodies go to the writer process undecoded, with a copy of the webhook decoder.
    env = {**os.environ, **PROXY_ENV, "CHATMW_DATABASE_URL": database_url,
           "CHATMW_PSEUDONYMISE": "0", "CHATMW_WRITER": "process"}
    env.pop("CHATMW_SPOOL_DIR", None)
    url = f"http://127.0.0.1:{port}/webhook"
    challenge = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "7"}
    at_ms = int(time.time() * 1000) - 1000
    body = json.dumps({"object": "page", "entry": [{"id": "1", "time": at_ms, "messaging": [
        {"sender": {"id": "42"}, "recipient": {"id": "1"}, "timestamp": at_ms,
         "message": {"mid": "m_gc_1", "text": "hello"}}]}]}).encode()

    process = run_until_answered([CHATMW, "-v", "proxy", "--port", str(port)], env, url,
                                 challenge)
    try:
        response = httpx.post(url, content=body, headers={"x-hub-signature-256": signature(body)})
    finally:
        output = stop(process)

    assert response.status_code == 200
    assert settled_after_startup(output) > 10_000
    with create_engine(database_url).connect() as connection:
        query = text("SELECT platform_message_id, role, text FROM messages")
        rows = connection.execute(query).all()
    assert [tuple(row) for row in rows] == [("m_gc_1", "user", "hello")]
