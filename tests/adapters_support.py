"""Real servers for the adapter tests: uvicorn in a thread, a stub Graph API and a small bot."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

FIXTURES = Path(__file__).parent / "fixtures" / "meta"
SHARED_PAYLOADS = Path("/work/shared/data/meta-payloads")
APP_SECRET = "test-app-secret-5f1c"
VERIFY_TOKEN = "test-verify-token"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def signature(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class ServerThread:
    """Runs an ASGI app with uvicorn on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


@dataclass
class GraphStub:
    """A stub Graph API: responds to sends as Meta does and keeps every request it received.

    Recipient ``fail`` gets a 400 OAuth-style error, ``busy`` a 503, ``throttled`` error
    code 613 with HTTP 400.
    """

    calls: list[dict[str, Any]] = field(default_factory=list)
    counter: Any = field(default_factory=lambda: itertools.count(1))

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])

    def reset(self) -> None:
        self.calls.clear()
        self.counter = itertools.count(1)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.calls.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if request.method == "GET":
            return JSONResponse(
                {"id": request.url.path.rsplit("/", 1)[-1], "name": "Test Page"},
                headers={"x-fb-trace-id": "trace-get"},
            )

        document = json.loads(body or b"{}")
        number = next(self.counter)
        if request.query_params.get("gzip") == "1":
            return _gzipped({"recipient_id": "7100000000000001", "message_id": f"m_gz{number}"})
        headers = {"x-fb-trace-id": f"trace-{number}", "x-app-usage": '{"call_count":1}'}
        recipient = document.get("to") or document.get("recipient", {}).get("id")
        if recipient == "fail":
            error = {
                "error": {
                    "message": "(#100) Invalid parameter",
                    "type": "OAuthException",
                    "code": 100,
                    "fbtrace_id": "AbC",
                }
            }
            return JSONResponse(error, status_code=400, headers=headers)
        if recipient == "busy":
            return JSONResponse(
                {"error": {"message": "Service unavailable", "code": 2}},
                status_code=503,
                headers=headers,
            )
        if recipient == "throttled":
            error = {
                "error": {
                    "message": "Calls to this api have exceeded the rate limit.",
                    "type": "OAuthException",
                    "code": 613,
                }
            }
            return JSONResponse(error, status_code=400, headers=headers)

        if document.get("messaging_product") == "whatsapp":
            if "status" in document:
                return JSONResponse({"success": True}, headers=headers)
            answer = {
                "messaging_product": "whatsapp",
                # Meta resolves the number the bot wrote to the digits-only wa_id.
                "contacts": [
                    {"input": recipient, "wa_id": "".join(filter(str.isdigit, recipient))}
                ],
                "messages": [{"id": f"wamid.stub{number}", "message_status": "accepted"}],
            }
            return JSONResponse(answer, headers=headers)
        if "sender_action" in document:
            return JSONResponse({"recipient_id": recipient}, headers=headers)
        return JSONResponse(
            {"recipient_id": recipient, "message_id": f"m_stub{number}"}, headers=headers
        )


@dataclass
class EchoBot:
    """A bot with its own webhook endpoint and its own signature check.

    For each Messenger text or WhatsApp text it receives, it replies through the Graph API
    at ``graph_url`` (the proxy). ``gate``, when set, holds each webhook until it is released.
    """

    secret: str = APP_SECRET
    graph_url: str = ""
    received: list[bytes] = field(default_factory=list)
    rejected: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)
    gate: threading.Event | None = None
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/bot/webhook", self.webhook, methods=["POST"])])

    def reset(self) -> None:
        self.received.clear()
        self.replies.clear()
        self.headers_seen.clear()
        self.rejected = 0
        self.gate = None

    async def webhook(self, request: Request) -> Response:
        body = await request.body()
        header = request.headers.get("x-hub-signature-256", "")
        if not hmac.compare_digest(header, signature(body, self.secret)):
            self.rejected += 1
            return PlainTextResponse("bad signature", status_code=403)
        self.headers_seen.append(dict(request.headers))
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 10)
        self.received.append(body)
        try:
            document = json.loads(body)
        except ValueError:
            return PlainTextResponse("ignored")
        async with httpx.AsyncClient(base_url=self.graph_url) as client:
            for user, text in _texts(document):
                if document["object"] == "page":
                    payload: dict[str, Any] = {
                        "recipient": {"id": user},
                        "messaging_type": "RESPONSE",
                        "message": {"text": f"echo: {text}"},
                    }
                    response = await client.post(
                        "/v21.0/me/messages", json=payload, params={"access_token": "page-token"}
                    )
                else:
                    payload = {
                        "messaging_product": "whatsapp",
                        "to": user,
                        "type": "text",
                        "text": {"body": f"echo: {text}"},
                    }
                    response = await client.post(
                        "/v21.0/230000000000001/messages",
                        json=payload,
                        headers={"Authorization": "Bearer wa-token"},
                    )
                self.replies.append(
                    {
                        "status": response.status_code,
                        "json": response.json(),
                        "headers": dict(response.headers),
                    }
                )
        return PlainTextResponse("ok")


def _gzipped(document: dict[str, Any]) -> Response:
    body = gzip.compress(json.dumps(document).encode())
    return Response(body, media_type="application/json", headers={"content-encoding": "gzip"})


def _texts(document: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for entry in document.get("entry", []):
        for item in entry.get("messaging", []):
            message = item.get("message", {})
            if "text" in message and not message.get("is_echo"):
                found.append((item["sender"]["id"], message["text"]))
        for change in entry.get("changes", []):
            for message in change.get("value", {}).get("messages", []):
                if message.get("type") == "text":
                    found.append((message["from"], message["text"]["body"]))
    return found


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
