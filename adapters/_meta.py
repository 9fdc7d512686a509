"""Shared helpers of the Messenger and WhatsApp adapters: settings, signatures, bodies, times.

Both platforms deliver webhooks the same way (Meta's Webhooks product): a ``GET`` with
``hub.mode``, ``hub.verify_token`` and ``hub.challenge`` to verify the callback URL, then
``POST`` requests signed with ``X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body,
keyed with the app secret>``. Both send through the Graph API with a bearer token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from chatmw.events import Event, Touch, now_utc
from chatmw.outbound import OutboundMessage, SendResult

__all__ = [
    "MetaSettings",
    "SIGNATURE_HEADER",
    "DEFAULT_GRAPH_BASE_URL",
    "DEFAULT_GRAPH_API_VERSION",
    "DEFAULT_MAX_BODY_BYTES",
    "BodyTooLarge",
    "WebhookStats",
    "sign",
    "verify_signature",
    "verification_challenge",
    "read_body",
    "time_from_epoch",
    "stable_key",
    "as_str",
    "as_dict",
    "as_list",
    "describe_graph_error",
    "post_graph",
    "submit_all",
    "fit_touch",
    "Submit",
]

logger = logging.getLogger("chatmw")

# The recorder's ``submit``: queue an event, return whether it was accepted.
Submit = Callable[[Event], bool]

SIGNATURE_HEADER = "X-Hub-Signature-256"
DEFAULT_GRAPH_BASE_URL = "https://graph.facebook.com"
# The Graph API version the senders use: v27.0 is the version in Meta's WhatsApp examples of
# October 2026. The pass-through keeps whatever version the bot calls.
DEFAULT_GRAPH_API_VERSION = "v27.0"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024

# Environment variables read by :meth:`MetaSettings.from_env` (only when it is called).
ENV_APP_SECRET = "CHATMW_META_APP_SECRET"
ENV_VERIFY_TOKEN = "CHATMW_META_VERIFY_TOKEN"
ENV_BOT_WEBHOOK_URL = "CHATMW_BOT_WEBHOOK_URL"
ENV_GRAPH_BASE_URL = "CHATMW_GRAPH_BASE_URL"
ENV_GRAPH_API_VERSION = "CHATMW_GRAPH_API_VERSION"
ENV_PAGE_ACCESS_TOKEN = "CHATMW_MESSENGER_PAGE_ACCESS_TOKEN"
ENV_WHATSAPP_ACCESS_TOKEN = "CHATMW_WHATSAPP_ACCESS_TOKEN"
ENV_WHATSAPP_PHONE_NUMBER_ID = "CHATMW_WHATSAPP_PHONE_NUMBER_ID"
ENV_MAX_BODY_BYTES = "CHATMW_META_MAX_BODY_BYTES"
# Comma-separated app ids whose echoes are agent messages.
ENV_AGENT_APP_IDS = "CHATMW_MESSENGER_AGENT_APP_IDS"
# Comma-separated Instagram account ids whose sends are Instagram messages.
ENV_INSTAGRAM_ACCOUNT_IDS = "CHATMW_INSTAGRAM_ACCOUNT_IDS"

_SECRET_FIELDS = frozenset(
    {"app_secret", "verify_token", "page_access_token", "whatsapp_access_token"}
)


@dataclass(slots=True, repr=False)
class MetaSettings:
    """Settings of the Messenger and WhatsApp adapters, validated at construction.

    - ``app_secret``: the Meta app secret; webhooks are checked against it.
    - ``verify_token``: the token you typed in the app's webhook settings (``GET`` check).
    - ``bot_webhook_url``: where the proxy forwards each verified webhook (the bot's own
      webhook URL); ``None`` records without forwarding.
    - ``graph_base_url``: where Graph API calls go: the pass-through forwards there and the
      senders send there. Tests point it at a local stub server.
    - ``graph_api_version``: the version the senders put in their URLs.
    - ``page_access_token``: the Messenger page token the Messenger sender uses.
    - ``whatsapp_access_token`` and ``whatsapp_phone_number_id``: what the WhatsApp sender uses.
    - ``max_body_bytes``: larger webhook bodies are rejected with 413.
    - ``webhook_path``: the path where the proxy receives webhooks.
    - ``forward_timeout_s``, ``forward_retries``, ``forward_backoff_s``: each forward to the
      bot gets this timeout and this many retries after the first attempt, waiting
      ``forward_backoff_s`` and doubling before each retry.
    - ``forward_queue_size``: webhooks waiting to be forwarded; more are dropped and logged.
    - ``forward_workers``: concurrent forwards to the bot.
    - ``graph_timeout_s``: timeout of each Graph API call made or passed through.
    - ``agent_app_ids``: ids of apps through which people reply (a help
      desk, the page inbox). Echoes of other apps are bot messages, and echoes without an
      app id are agent messages.
    - ``instagram_account_ids``: Instagram account ids whose ``/{id}/messages`` sends
      through the pass-through are recorded on the ``instagram`` channel.
    - ``durable_acknowledgement``: acknowledge a webhook only once its events are in the
      recorder's spool on disk (``Recorder.submit_durable``); needs a replayable spool.
      Otherwise the acknowledgement follows the in-memory ``Recorder.submit``.
    """

    app_secret: str
    verify_token: str
    bot_webhook_url: str | None = None
    graph_base_url: str = DEFAULT_GRAPH_BASE_URL
    graph_api_version: str = DEFAULT_GRAPH_API_VERSION
    page_access_token: str | None = None
    whatsapp_access_token: str | None = None
    whatsapp_phone_number_id: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    webhook_path: str = "/webhook"
    forward_timeout_s: float = 10.0
    forward_retries: int = 3
    forward_backoff_s: float = 0.5
    forward_queue_size: int = 1000
    forward_workers: int = 4
    graph_timeout_s: float = 30.0
    durable_acknowledgement: bool = False
    agent_app_ids: frozenset[str] = frozenset()
    instagram_account_ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._check_secrets()
        self._check_urls()
        self._check_limits()
        self._check_id_sets()

    def _check_secrets(self) -> None:
        if not self.app_secret:
            raise ValueError("app_secret must not be empty: use the secret of your Meta app")
        if not self.verify_token:
            raise ValueError(
                "verify_token must not be empty: use the token set in the webhook settings"
            )

    def _check_urls(self) -> None:
        if self.bot_webhook_url is not None:
            _check_http_url("bot_webhook_url", self.bot_webhook_url)
        _check_http_url("graph_base_url", self.graph_base_url)
        self.graph_base_url = self.graph_base_url.rstrip("/")
        if not self.graph_api_version.startswith("v"):
            raise ValueError(
                f"graph_api_version must look like 'v27.0', got {self.graph_api_version!r}"
            )
        if not self.webhook_path.startswith("/"):
            raise ValueError(f"webhook_path must start with '/', got {self.webhook_path!r}")

    def _check_id_sets(self) -> None:
        for name in ("agent_app_ids", "instagram_account_ids"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a collection of ids, not one string")
            setattr(self, name, frozenset(str(item) for item in value))

    def _check_limits(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        for name in ("forward_timeout_s", "graph_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.forward_backoff_s < 0:
            raise ValueError(
                f"forward_backoff_s must not be negative, got {self.forward_backoff_s}"
            )
        if self.forward_retries < 0:
            raise ValueError(f"forward_retries must not be negative, got {self.forward_retries}")
        for name in ("forward_queue_size", "forward_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def __repr__(self) -> str:
        parts = []
        for item in fields(self):
            value = getattr(self, item.name)
            rendered = "'[secure]'" if item.name in _SECRET_FIELDS and value else repr(value)
            parts.append(f"{item.name}={rendered}")
        return f"MetaSettings({', '.join(parts)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MetaSettings:
        """Build settings from the ``CHATMW_*`` variables listed at the top of this module.

        Keyword ``overrides`` that are not ``None`` win over the environment.
        """
        environ = os.environ if environ is None else environ
        names = {
            "app_secret": ENV_APP_SECRET,
            "verify_token": ENV_VERIFY_TOKEN,
            "bot_webhook_url": ENV_BOT_WEBHOOK_URL,
            "graph_base_url": ENV_GRAPH_BASE_URL,
            "graph_api_version": ENV_GRAPH_API_VERSION,
            "page_access_token": ENV_PAGE_ACCESS_TOKEN,
            "whatsapp_access_token": ENV_WHATSAPP_ACCESS_TOKEN,
            "whatsapp_phone_number_id": ENV_WHATSAPP_PHONE_NUMBER_ID,
        }
        values: dict[str, Any] = {
            name: environ[var] for name, var in names.items() if environ.get(var)
        }
        for name, variable in (
            ("agent_app_ids", ENV_AGENT_APP_IDS),
            ("instagram_account_ids", ENV_INSTAGRAM_ACCOUNT_IDS),
        ):
            if environ.get(variable):
                ids = environ[variable].split(",")
                values[name] = frozenset(item.strip() for item in ids if item.strip())
        if environ.get(ENV_MAX_BODY_BYTES):
            try:
                values["max_body_bytes"] = int(environ[ENV_MAX_BODY_BYTES])
            except ValueError as error:
                raise ValueError(
                    f"{ENV_MAX_BODY_BYTES} must be an integer number of bytes, "
                    f"got {environ[ENV_MAX_BODY_BYTES]!r}"
                ) from error
        values.update({name: value for name, value in overrides.items() if value is not None})
        values.setdefault("app_secret", "")
        values.setdefault("verify_token", "")
        return cls(**values)

    def graph_url(self, path: str) -> str:
        """Return the Graph API URL of ``path`` (``{id}/messages``) at the configured version."""
        return f"{self.graph_base_url}/{self.graph_api_version}/{path.lstrip('/')}"


def _check_http_url(name: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an http:// or https:// URL, got {value!r}")


class WebhookStats:
    """Counters of webhook handling and forwarding, safe to update from several threads.

    Names: ``received``, ``verified``, ``rejected_signature``, ``too_large``, ``unparseable``,
    ``unknown_events``, ``events``, ``not_accepted``, ``forwarded``, ``forward_failed``,
    ``forward_dropped``, ``sends_recorded``, ``sends_failed``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._counts[name] += count

    def snapshot(self) -> dict[str, int]:
        """Return a copy of the counters."""
        with self._lock:
            return dict(self._counts)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]


def sign(body: bytes, app_secret: str) -> str:
    """Return the ``X-Hub-Signature-256`` value Meta sends for ``body``."""
    # hmac.digest is one call into OpenSSL, where hmac.new and hexdigest take several
    # Python calls: this runs for every webhook before its acknowledgement.
    return "sha256=" + hmac.digest(app_secret.encode(), body, "sha256").hex()


def verify_signature(body: bytes, header: bytes | str | None, app_secret: str) -> bool:
    """Check ``header`` (``sha256=<hex>``) against the raw ``body`` in constant time.

    The HMAC is computed over the bytes as received: parsing and re-serialising the JSON
    changes escapes and spacing (emoji, accents), so the signature would no longer match.
    """
    if not header:
        return False
    received = header if isinstance(header, bytes) else header.encode("utf-8", "replace")
    expected = sign(body, app_secret).encode()
    return hmac.compare_digest(expected, received.strip().lower())


def verification_challenge(query: Mapping[str, str], verify_token: str) -> str | None:
    """Return ``hub.challenge`` when the verification request carries our token, else ``None``."""
    if query.get("hub.mode") != "subscribe":
        return None
    token = query.get("hub.verify_token", "")
    if not hmac.compare_digest(token.encode(), verify_token.encode()):
        return None
    return query.get("hub.challenge")


class BodyTooLarge(Exception):
    """A request body exceeded the size limit; ``received`` has the messages read so far."""

    def __init__(self, limit: int, received: list[MutableMapping[str, Any]]) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit
        self.received = received


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def read_body(receive: Receive, limit: int) -> tuple[bytes, list[MutableMapping[str, Any]]]:
    """Read an ASGI request body of at most ``limit`` bytes.

    Returns the body and the ``http.request`` messages read, so a caller can replay them to
    the next application. Raises :class:`BodyTooLarge` as soon as the limit is passed,
    without reading the rest; ``ConnectionError`` when the client disconnects.
    """
    chunks: list[bytes] = []
    messages: list[MutableMapping[str, Any]] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected before the body was complete")
        messages.append(message)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit, messages)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def time_from_epoch(value: Any, fallback: datetime) -> datetime:
    """Convert a Meta timestamp to an aware datetime.

    Messenger sends integer milliseconds, WhatsApp strings of seconds, and one documented
    Messenger postback a string of seconds, so the size decides the unit: values below
    10**11 are seconds (10**11 ms is in 1973, 10**11 s in the year 5138). Missing or
    invalid values give ``fallback``.
    """
    if isinstance(value, bool) or value is None:
        return fallback
    try:
        number = float(value)
    except (TypeError, ValueError):
        return fallback
    if number != number or number <= 0:
        return fallback
    seconds = number if number < 1e11 else number / 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return fallback


def stable_key(prefix: str, *parts: Any) -> str:
    """Return an idempotency key: ``prefix`` plus a hash of ``parts`` (fits a 255-char column)."""
    digest = hashlib.sha256("\x1f".join("" if p is None else str(p) for p in parts).encode())
    return f"{prefix}:{digest.hexdigest()[:40]}"


def as_str(value: Any) -> str | None:
    """Return ``value`` as a string for ids that Meta sends as numbers or strings."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = str(value)
    return text or None


def as_dict(value: Any) -> dict[str, Any]:
    """Return ``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """Return ``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


# Graph API throttling codes: application (4), user (17), page (32) and call-rate (613)
# limits, WhatsApp throughput (130429) and pair rate (131056) limits.
THROTTLING_CODES = frozenset({4, 17, 32, 613, 130429, 131056})


def describe_graph_error(status_code: int, document: Any) -> tuple[str, bool]:
    """Return a one-line description of a failed Graph API call and whether to retry it.

    Retryable: HTTP 5xx and 429, throttling codes, and errors Meta marks ``is_transient``.
    """
    error = as_dict(as_dict(document).get("error"))
    code = error.get("code")
    retryable = status_code >= 500 or status_code == 429 or bool(error.get("is_transient"))
    if isinstance(code, int) and code in THROTTLING_CODES:
        retryable = True
    kind = error.get("type") or "GraphError"
    message = error.get("message") or f"HTTP {status_code}"
    return f"{kind} {code if code is not None else ''}: {message}".replace("  ", " "), retryable


async def post_graph(
    client: httpx.AsyncClient | None,
    settings: MetaSettings,
    url: str,
    token: str,
    body: Mapping[str, Any],
) -> tuple[SendResult, dict[str, Any]]:
    """POST ``body`` to a Graph API ``url``; return the result and the response's JSON object.

    Never raises for network or platform errors: they come back as a failed result.
    """
    headers = {"Authorization": f"Bearer {token}"}
    owned = client is None
    http = client or httpx.AsyncClient(timeout=settings.graph_timeout_s)
    try:
        response = await http.post(
            url, json=body, headers=headers, timeout=settings.graph_timeout_s
        )
    except httpx.HTTPError as error:
        return SendResult(
            ok=False,
            error=f"Graph API request failed: {type(error).__name__}: {error}",
            retryable=True,
        ), {}
    finally:
        if owned:
            await http.aclose()
    try:
        document = as_dict(response.json())
    except ValueError:
        document = {}
    if response.status_code >= 400 or "error" in document:
        description, retryable = describe_graph_error(response.status_code, document)
        return SendResult(ok=False, error=description, retryable=retryable), document
    return SendResult(ok=True), document


async def send_and_record(
    client: httpx.AsyncClient | None,
    settings: MetaSettings,
    url: str,
    token: str,
    body: Mapping[str, Any],
    parse: Callable[..., list[Event]],
    message: OutboundMessage,
    submit: Submit | None,
    platform: str,
) -> tuple[SendResult, list[Event], dict[str, Any]]:
    """POST a send to the Graph API and submit the events ``parse`` reads from it.

    ``parse(body, document, sent_at, kind=..., meta=...)`` is the platform's
    ``events_from_send``. A failed send is logged and returns no events.
    """
    sent_at = now_utc()
    started = time.perf_counter()
    result, document = await post_graph(client, settings, url, token, body)
    if not result.ok:
        logger.warning("%s send failed: %s", platform, result.error)
        return result, [], document
    graph_ms = round((time.perf_counter() - started) * 1000)
    found = parse(body, document, sent_at, kind=message.kind,
                  meta={**message.meta, "graph_ms": graph_ms})
    submit_all(submit, found)
    return result, found, document


def submit_all(submit: Submit | None, found: Iterable[Event]) -> bool:
    """Submit each event; returns ``False`` (and logs) when the recorder dropped one."""
    if submit is None:
        return True
    accepted = True
    for event in found:
        if not submit(event):
            accepted = False
    if not accepted:
        logger.warning("recorder did not accept every event (queue full or stopped)")
    return accepted


# Widths of the touch columns in chatmw.store.models.Touch.
_TOUCH_WIDTHS = {
    "source": 255,
    "medium": 255,
    "campaign": 255,
    "ad_id": 255,
    "ref": 255,
    "click_id": 512,
}


def fit_touch(touch: Touch) -> Touch:
    """Return ``touch`` with values cut to their column widths; cut values stay whole in meta.

    A value longer than its column would make the database reject the whole touch.
    """
    changes: dict[str, Any] = {}
    full: dict[str, str] = {}
    for name, width in _TOUCH_WIDTHS.items():
        value = getattr(touch, name)
        if isinstance(value, str) and len(value) > width:
            changes[name] = value[:width]
            full[f"{name}_full"] = value
    if not changes:
        return touch
    return dataclasses.replace(touch, **changes, meta={**touch.meta, **full})
