"""Recording of a Python bot's Graph API sends made with its own httpx client.

Wrap the client's transport (a bot built on pywa, or any bot that calls the Graph API
with httpx)::

    transport = AsyncRecordingTransport(runtime.recorder.submit)
    client = httpx.AsyncClient(transport=transport)

Each successful ``POST .../messages`` to ``graph_base_url`` is recorded as a bot message
with Meta's message id. The request goes out and the response comes back byte for byte
unchanged: the wrapper reads the response once and hands the caller an equal response.
"""

from __future__ import annotations

from datetime import datetime

import httpx

from chatmw import events as ev
from chatmw.adapters._meta import DEFAULT_GRAPH_BASE_URL, Submit, WebhookStats
from chatmw.adapters.graph import is_send, record_send, send_channel

__all__ = ["RecordingTransport", "AsyncRecordingTransport"]


class _Matcher:
    def __init__(self, graph_base_url: str) -> None:
        base = httpx.URL(graph_base_url)
        self.scheme = base.scheme
        self.host = base.host
        self.port = base.port
        self.prefix = base.path.rstrip("/")

    def path_of(self, request: httpx.Request) -> str | None:
        # The Graph API path of a send to our base URL, or None for any other request.
        url = request.url
        if (url.scheme, url.host, url.port) != (self.scheme, self.host, self.port):
            return None
        if not url.path.startswith(self.prefix):
            return None
        path = url.path[len(self.prefix) :]
        return path if is_send(request.method, path) else None


def _rebuilt(response: httpx.Response, raw: bytes, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        status_code=response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
        request=request,
    )


def _record(
    request: httpx.Request,
    response: httpx.Response,
    raw: bytes,
    sent_at: datetime,
    submit: Submit,
    stats: WebhookStats | None,
    channel: str,
) -> None:
    decoded = httpx.Response(response.status_code, headers=response.headers, content=raw).content
    record_send(
        request.content,
        request.headers.get("content-type"),
        response.status_code,
        decoded,
        sent_at,
        submit,
        stats,
        channel,
    )


class AsyncRecordingTransport(httpx.AsyncBaseTransport):
    """An async transport that records Graph API sends and passes everything through.

    ``transport`` is the transport to wrap (a new ``httpx.AsyncHTTPTransport`` when
    omitted); ``graph_base_url`` selects which requests are Graph API calls. Sends to the
    ``/{id}/messages`` path of an id in ``instagram_account_ids`` are Instagram messages.
    """

    def __init__(
        self,
        submit: Submit,
        transport: httpx.AsyncBaseTransport | None = None,
        graph_base_url: str = DEFAULT_GRAPH_BASE_URL,
        stats: WebhookStats | None = None,
        instagram_account_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.submit = submit
        self.instagram_account_ids = instagram_account_ids
        self.transport = transport or httpx.AsyncHTTPTransport()
        self.stats = stats or WebhookStats()
        self._matcher = _Matcher(graph_base_url)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = self._matcher.path_of(request)
        if path is None:
            return await self.transport.handle_async_request(request)
        await request.aread()
        sent_at = ev.now_utc()
        response = await self.transport.handle_async_request(request)
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        channel = send_channel(path, self.instagram_account_ids)
        _record(request, response, raw, sent_at, self.submit, self.stats, channel)
        return _rebuilt(response, raw, request)

    async def aclose(self) -> None:
        await self.transport.aclose()


class RecordingTransport(httpx.BaseTransport):
    """The synchronous counterpart of :class:`AsyncRecordingTransport`, for ``httpx.Client``."""

    def __init__(
        self,
        submit: Submit,
        transport: httpx.BaseTransport | None = None,
        graph_base_url: str = DEFAULT_GRAPH_BASE_URL,
        stats: WebhookStats | None = None,
        instagram_account_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.submit = submit
        self.instagram_account_ids = instagram_account_ids
        self.transport = transport or httpx.HTTPTransport()
        self.stats = stats or WebhookStats()
        self._matcher = _Matcher(graph_base_url)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = self._matcher.path_of(request)
        if path is None:
            return self.transport.handle_request(request)
        request.read()
        sent_at = ev.now_utc()
        response = self.transport.handle_request(request)
        try:
            raw = b"".join(response.iter_raw())
        finally:
            response.close()
        channel = send_channel(path, self.instagram_account_ids)
        _record(request, response, raw, sent_at, self.submit, self.stats, channel)
        return _rebuilt(response, raw, request)

    def close(self) -> None:
        self.transport.close()
