"""The Meta proxy: an ASGI app that sits between Meta and a bot of any language.

Point the Meta app's webhook callback URL at the proxy's ``webhook_path`` and the bot's
Graph API base URL at the proxy itself. The proxy then:

- returns the challenge of Meta's verification ``GET`` when the verify token matches;
- checks each webhook's ``X-Hub-Signature-256`` over the raw body, records its events
  and acknowledges Meta;
- forwards the same bytes with the original headers to the bot's webhook URL, so the
  bot's own signature check passes. A bounded background queue with retries does this,
  so a slow bot never delays the acknowledgement;
- passes every other request through to the Graph API and returns Meta's response
  unchanged, recording each successful message send as a bot message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from chatmw import events as ev
from chatmw.adapters import messenger
from chatmw.adapters._meta import BodyTooLarge, MetaSettings, WebhookStats, read_body
from chatmw.adapters.graph import is_send, record_send, send_channel
from chatmw.adapters.webhook import EventSink, WebhookIntake

__all__ = ["create_proxy_app", "Forwarder", "ProxyState", "STATS_PATH"]

logger = logging.getLogger("chatmw")

STATS_PATH = "/_chatmw/stats"

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the ones the HTTP client sets again itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
_RESPONSE_SKIP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)


def forwardable_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Return ``headers`` without hop-by-hop ones, keeping order and repeated names."""
    return [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]


@dataclass(frozen=True, slots=True)
class _Delivery:
    body: bytes
    headers: list[tuple[bytes, bytes]]


class Forwarder:
    """Forwards verified webhooks to the bot from a bounded queue with retries.

    Retries connection errors, timeouts, HTTP 5xx and 429 up to ``forward_retries`` times
    with doubling backoff. Every webhook given up is logged and counted as
    ``forward_failed``; one that finds the queue full is counted as ``forward_dropped``.
    """

    def __init__(self, settings: MetaSettings, stats: WebhookStats) -> None:
        if settings.bot_webhook_url is None:
            raise ValueError("bot_webhook_url must be set to forward webhooks")
        self.settings = settings
        self.url = settings.bot_webhook_url
        self.stats = stats
        self._queue: asyncio.Queue[_Delivery] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Create the HTTP client and the worker tasks in the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.settings.forward_queue_size)
        self._client = httpx.AsyncClient(timeout=self.settings.forward_timeout_s)
        self._workers = [
            asyncio.create_task(self._work(), name=f"chatmw-forward-{index}")
            for index in range(self.settings.forward_workers)
        ]
        logger.info("webhook forwarder started: %d workers to %s", len(self._workers), self.url)

    def enqueue(self, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Queue a webhook for the bot; ``False`` (counted and logged) when the queue is full."""
        if self._queue is None:
            raise RuntimeError("forwarder is not started")
        try:
            self._queue.put_nowait(_Delivery(body, forwardable_headers(headers)))
        except asyncio.QueueFull:
            self.stats.add("forward_dropped")
            logger.error(
                "webhook not forwarded to the bot: forward queue full (%d waiting)",
                self._queue.qsize(),
            )
            return False
        return True

    async def join(self, timeout: float) -> bool:
        """Wait until every queued webhook was delivered or given up; ``False`` on timeout."""
        if self._queue is None:
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop the workers."""
        if self._queue is not None and not await self.join(timeout):
            logger.warning(
                "webhook forwarder stopped with %d webhooks not forwarded", self._queue.qsize()
            )
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        logger.info("webhook forwarder stopped")

    async def _work(self) -> None:
        queue = self._queue
        if queue is None:
            raise RuntimeError("forwarder worker started before its queue")
        while True:
            delivery = await queue.get()
            try:
                await self._deliver(delivery)
            except Exception:  # noqa: BLE001 - a worker must survive any single delivery
                self.stats.add("forward_failed")
                logger.exception("forwarding a webhook to the bot failed")
            finally:
                queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        client = self._client
        if client is None:
            raise RuntimeError("forwarder is not started")
        delay = self.settings.forward_backoff_s
        problem = ""
        for attempt in range(self.settings.forward_retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                response = await client.post(
                    self.url, content=delivery.body, headers=delivery.headers
                )
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
                logger.warning("forward to the bot failed (attempt %d): %s", attempt + 1, problem)
                continue
            if response.status_code >= 500 or response.status_code == 429:
                problem = f"HTTP {response.status_code}"
                logger.warning("forward to the bot failed (attempt %d): %s", attempt + 1, problem)
                continue
            if response.status_code >= 400:
                self.stats.add("forward_failed")
                logger.error("bot rejected a forwarded webhook with HTTP %d", response.status_code)
                return
            self.stats.add("forwarded")
            return
        self.stats.add("forward_failed")
        logger.error(
            "webhook not forwarded to the bot after %d attempts: %s",
            self.settings.forward_retries + 1,
            problem,
        )


class ProxyState:
    """The proxy's per-process parts: the intake, the forwarder and the Graph API client.

    Started by the app's lifespan, or on the first request when the app is mounted inside
    another app (Starlette does not run the lifespan of mounted apps).
    """

    def __init__(self, settings: MetaSettings, sink: EventSink | None, stats: WebhookStats) -> None:
        self.settings = settings
        self.stats = stats
        self.intake = WebhookIntake(settings, sink, stats)
        self.forwarder = Forwarder(settings, stats) if settings.bot_webhook_url else None
        self.submit = sink.submit if sink is not None else None
        self.graph: httpx.AsyncClient | None = None
        self._lock: asyncio.Lock | None = None

    async def ensure_started(self) -> None:
        """Start the forwarder and the Graph API client once."""
        if self.graph is not None:
            return
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.graph is not None:
                return
            if self.forwarder is not None:
                await self.forwarder.start()
            self.graph = httpx.AsyncClient(timeout=self.settings.graph_timeout_s)

    async def stop(self) -> None:
        """Forward what is queued (bounded by the forward timeout) and close the clients."""
        if self.forwarder is not None and self.graph is not None:
            await self.forwarder.stop(self.settings.forward_timeout_s)
        if self.graph is not None:
            await self.graph.aclose()
            self.graph = None


def create_proxy_app(
    settings: MetaSettings,
    runtime: Any = None,
    *,
    sink: EventSink | None = None,
    stats: WebhookStats | None = None,
) -> Starlette:
    """Build the proxy ASGI app.

    Give a started :class:`chatmw.runtime.Runtime` as ``runtime`` (its recorder takes the
    events and its writer learns the Messenger watermark events) or any ``sink`` with a
    non-blocking ``submit``. The app's ``state.proxy`` is its :class:`ProxyState`.
    """
    if runtime is not None:
        sink = runtime.recorder
    if sink is None:
        raise ValueError("create_proxy_app needs a runtime or a sink to record events")
    messenger.register_sink_handlers(sink)
    state = ProxyState(settings, sink, stats or WebhookStats())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await state.ensure_started()
        yield
        await state.stop()

    async def verify(request: Request) -> Response:
        outcome = state.intake.challenge(dict(request.query_params))
        return PlainTextResponse(outcome.body.decode(), status_code=outcome.status)

    async def webhook(request: Request) -> Response:
        await state.ensure_started()
        return await _webhook(state, request)

    async def graph(request: Request) -> Response:
        await state.ensure_started()
        return await _graph_passthrough(state, request)

    async def show_stats(_request: Request) -> Response:
        return JSONResponse(state.stats.snapshot())

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        Route(settings.webhook_path, verify, methods=["GET"]),
        Route(settings.webhook_path, webhook, methods=["POST"]),
        Route(STATS_PATH, show_stats, methods=["GET"]),
        Route("/{path:path}", graph, methods=methods),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = state
    return app


async def _webhook(state: ProxyState, request: Request) -> Response:
    try:
        body, _ = await read_body(request.receive, state.settings.max_body_bytes)
    except BodyTooLarge:
        state.stats.add("too_large")
        logger.warning("webhook rejected: body larger than %d bytes", state.settings.max_body_bytes)
        return PlainTextResponse("body too large", status_code=413)
    except ConnectionError:
        return PlainTextResponse("client disconnected", status_code=400)
    signature_header = request.headers.get("x-hub-signature-256")
    if state.settings.durable_acknowledgement:
        # A durable submit waits for an fsync of the spool: keep it off the event loop.
        outcome = await run_in_threadpool(state.intake.receive, body, signature_header)
    else:
        outcome = state.intake.receive(body, signature_header)
    if outcome.forward and state.forwarder is not None:
        state.forwarder.enqueue(body, request.scope["headers"])
    return PlainTextResponse(outcome.body.decode(), status_code=outcome.status)


async def _graph_passthrough(state: ProxyState, request: Request) -> Response:
    graph = state.graph
    if graph is None:
        raise RuntimeError("proxy used before ensure_started()")
    path = _route_path(request.scope)
    # NOTE: Every request body is read into memory before it is passed on, media uploads
    # included, although only send calls need the body.
    body = await request.body()
    sent_at = ev.now_utc()
    url = state.settings.graph_base_url + path
    query = request.scope.get("query_string", b"")
    upstream_request = graph.build_request(
        request.method,
        url + ("?" + query.decode("latin-1") if query else ""),
        headers=forwardable_headers(request.scope["headers"]),
        content=body,
    )
    try:
        upstream = await graph.send(upstream_request, stream=True)
        try:
            raw = b"".join([chunk async for chunk in upstream.aiter_raw()])
        finally:
            await upstream.aclose()
    except httpx.HTTPError as error:
        logger.error(
            "Graph API pass-through failed for %s %s: %s",
            request.method,
            path,
            type(error).__name__,
        )
        document = {
            "error": {
                "message": f"chatmw proxy could not reach the Graph API: {type(error).__name__}",
                "type": "ChatmwProxyError",
                "is_transient": True,
            }
        }
        return JSONResponse(document, status_code=502)

    if is_send(request.method, path):
        decoded = httpx.Response(
            upstream.status_code, headers=upstream.headers, content=raw
        ).content
        record_send(
            body,
            request.headers.get("content-type"),
            upstream.status_code,
            decoded,
            sent_at,
            state.submit,
            state.stats,
            send_channel(path, state.settings.instagram_account_ids),
        )
    headers = [
        (name, value)
        for name, value in upstream.headers.multi_items()
        if name.lower() not in _RESPONSE_SKIP
    ]
    response = Response(content=raw, status_code=upstream.status_code)
    for name, value in headers:
        response.headers.append(name, value)
    return response


def _route_path(scope: MutableMapping[str, Any]) -> str:
    # Under a mount, scope["path"] keeps the mount prefix, which root_path names.
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
