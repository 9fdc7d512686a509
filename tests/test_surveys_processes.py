"""Two dispatcher processes on one database send every survey exactly once.

Each process is a real ``chatmw surveys run`` whose Messenger sender posts to a stub HTTP
server on 127.0.0.1, which counts what it receives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from chatmw import events as ev
from chatmw.store.models import Message
from chatmw.store.models_surveys import SurveySend
from chatmw.store.writer import Writer

CONVERSATIONS = 40

STUB_SENDER = """
import json, os, time
from pathlib import Path

import httpx

from chatmw.outbound import SendResult


class StubSender:
    channel = "messenger"

    async def send(self, message):
        body = {"survey_id": message.meta["survey_id"], "purpose": message.meta["purpose"],
                "user_id": message.user_id, "pid": os.getpid()}
        async with httpx.AsyncClient() as client:
            response = await client.post(os.environ["STUB_URL"], json=body, timeout=10)
        return SendResult(ok=True, platform_message_id=response.text)


def make_sender():
    # Both processes start sending together: wait until every process has built its sender.
    folder = Path(os.environ["BARRIER_DIR"])
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 30
    while len(list(folder.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return StubSender()
"""


class _Stub(BaseHTTPRequestHandler):
    received: list[dict[str, object]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the http.server handler name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.received.append(body)
            number = len(self.received)
        threading.Event().wait(0.01)
        reply = f"mid-{number}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        return


def _populate(engine: Engine) -> None:
    ended = ev.now_utc() - timedelta(minutes=10)
    batch: list[ev.Event] = []
    for index in range(CONVERSATIONS):
        conversation, user = f"conv-{index}", f"psid-{index}"
        batch += [
            ev.Message(
                channel="messenger",
                occurred_at=ended - timedelta(seconds=30),
                key=f"in-{index}",
                role="user",
                user_id=user,
                text="hi",
                conversation_id=conversation,
            ),
            ev.ConversationUpdate(
                channel="messenger",
                occurred_at=ended,
                user_id=user,
                conversation_id=conversation,
                ended=True,
            ),
        ]
    Writer(engine).write(batch)


def _config(path: Path) -> None:
    path.write_text(
        textwrap.dedent("""
        [dispatcher]
        batch_size = 2
        [dispatcher.outbound]
        messenger = "stub_sender:make_sender"
        [surveys.csat]
        kind = "csat"
        channels = ["messenger"]
        cooldown_days = 0
        [surveys.csat.texts.en]
        prompt = "How did we do?"
        reask = "1 to 5, please."
    """)
    )


def test_two_processes_send_each_survey_once(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    _populate(engine)
    (tmp_path / "stub_sender.py").write_text(STUB_SENDER)
    _config(tmp_path / "surveys.toml")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    _Stub.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "STUB_URL": f"http://127.0.0.1:{server.server_address[1]}/send",
        "BARRIER_DIR": str(tmp_path),
    }
    command = [
        str(Path(sys.executable).parent / "chatmw"),
        "surveys",
        "run",
        "--config",
        str(tmp_path / "surveys.toml"),
        "--db",
        database_url,
        "--until-idle",
    ]
    try:
        workers = [
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        server.shutdown()
        server.server_close()

    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
    per_survey = Counter(item["survey_id"] for item in _Stub.received)
    per_process = Counter(item["pid"] for item in _Stub.received)
    assert len(_Stub.received) == CONVERSATIONS
    assert len(per_survey) == CONVERSATIONS
    assert max(per_survey.values()) == 1
    assert sorted(per_process) == sorted(worker.pid for worker in workers)
    with Session(engine) as session:
        states = Counter(session.scalars(select(SurveySend.state)))
        attempts = set(session.scalars(select(SurveySend.attempts)))
        prompts = session.scalar(
            select(func.count()).select_from(Message).where(Message.kind == "survey_prompt")
        )
    assert states == {"sent": CONVERSATIONS}
    assert attempts == {1}
    assert prompts == CONVERSATIONS
