"""API keys for the metrics and admin APIs: creation, listing, revocation, checks.

A key reads ``cmw_<key id>_<secret>``: the key id (8 random bytes in hex) is public and
finds the row; the secret is 32 random bytes (256 bits), URL-safe base64. The database
keeps only the SHA-256 of the whole key. A fast hash is enough because the key is random
and long: nobody can guess it, so nothing is gained from a slow password hash such as
bcrypt, which exists to protect short, human-chosen passwords. Hashes are compared with
:func:`hmac.compare_digest`, in constant time.

Scopes: ``read`` reads metrics; ``admin`` also manages data (erasure) and includes read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import HTTPException, Request
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from chatmw.security.ratelimit import RateLimiter
from chatmw.store.models_security import ApiKey

__all__ = [
    "SCOPES",
    "Scope",
    "KEY_PREFIX",
    "ApiKeyInfo",
    "CreatedKey",
    "KeyCheck",
    "create_key",
    "list_keys",
    "revoke_key",
    "check_key",
    "hash_key",
    "KeyAuth",
    "require_key",
]

Scope = Literal["read", "admin"]
SCOPES: tuple[str, ...] = ("read", "admin")
KEY_PREFIX = "cmw_"
# The scopes each scope grants.
GRANTS = {"read": {"read"}, "admin": {"read", "admin"}}
# last_used_at_ms is written at most this often per key, so that reads stay reads.
LAST_USED_INTERVAL_S = 60.0
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """An API key as listed: everything but its secret."""

    key_id: str
    scope: str
    name: str
    created_at_ms: int
    revoked_at_ms: int | None
    last_used_at_ms: int | None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: ``key`` is shown once and never stored."""

    info: ApiKeyInfo
    key: str

    def __repr__(self) -> str:
        return f"CreatedKey(info={self.info!r}, key='[secure]')"


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The result of checking a presented key: ``info`` is set when the key is valid."""

    info: ApiKeyInfo | None
    error: str | None = None


def hash_key(key: str) -> str:
    """Return the SHA-256 hex digest of ``key``, as stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(key_id=row.key_id, scope=row.scope, name=row.name,
                      created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms,
                      last_used_at_ms=row.last_used_at_ms)


def create_key(engine: Engine, scope: str, name: str = "") -> CreatedKey:
    """Create a key with ``scope`` (``read`` or ``admin``) and return it, shown only now."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    key_id = secrets.token_hex(8)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(key_id=key_id, key_hash=hash_key(key), scope=scope, name=name[:255],
                 created_at_ms=_now_ms())
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add(row)
    return CreatedKey(info=_info(row), key=key)


def list_keys(engine: Engine) -> list[ApiKeyInfo]:
    """Return every key, revoked ones included, oldest first."""
    with Session(engine) as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at_ms, ApiKey.id))
        return [_info(row) for row in rows]


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke the key ``key_id``; ``False`` when there is no such key or it was revoked."""
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at_ms.is_(None))
            .values(revoked_at_ms=_now_ms()))
        return bool(result.rowcount)


def _parse(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, separator, secret = key[len(KEY_PREFIX):].partition("_")
    if not separator or not secret or len(key_id) != 16:
        return None
    return key_id


def check_key(engine: Engine, key: str) -> KeyCheck:
    """Check a presented key; the error is ``invalid_api_key`` or ``revoked_api_key``."""
    key_id = _parse(key)
    row = None
    if key_id is not None:
        with Session(engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    # Compare even when no row matched, so that the time taken does not tell which ids exist.
    matches = hmac.compare_digest(hash_key(key), row.key_hash if row else _DUMMY_HASH)
    if row is None or not matches:
        return KeyCheck(None, "invalid_api_key")
    if row.revoked_at_ms is not None:
        return KeyCheck(None, "revoked_api_key")
    return KeyCheck(_info(row))


class KeyAuth:
    """Checks keys for one database and limits each key's request rate.

    ``rate_per_second`` and ``burst`` set a token bucket per key: a key may send ``burst``
    requests at once and ``rate_per_second`` on average. The limits are kept in this
    process's memory, so each process of a deployment counts on its own.
    """

    def __init__(self, engine: Engine, rate_per_second: float = 10.0, burst: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.limiter = RateLimiter(rate_per_second, burst, clock)
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def __repr__(self) -> str:
        return (f"KeyAuth(rate_per_second={self.limiter.rate_per_second}, "
                f"burst={self.limiter.burst})")

    def check(self, key: str) -> KeyCheck:
        """Check ``key`` and note its use."""
        result = check_key(self.engine, key)
        if result.info is not None:
            self._note_use(result.info.key_id)
        return result

    def _note_use(self, key_id: str) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last_used.get(key_id, -LAST_USED_INTERVAL_S) < LAST_USED_INTERVAL_S:
                return
            self._last_used[key_id] = now
        with Session(self.engine) as session, session.begin():
            session.execute(update(ApiKey).where(ApiKey.key_id == key_id)
                            .values(last_used_at_ms=_now_ms()))


def require_key(scope: str, auth: KeyAuth | None = None) -> Callable[..., ApiKeyInfo]:
    """Return a FastAPI dependency that admits requests carrying a key with ``scope``.

    The key is read from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. With no
    ``auth``, the dependency uses ``request.app.state.chatmw_key_auth``. Errors are JSON
    (``{"detail": {"error": ..., "message": ...}}``): 401 for a missing, invalid or revoked
    key, 403 for a key without ``scope``, 429 with ``Retry-After`` (seconds) when the key
    has used up its rate, 500 when no :class:`KeyAuth` is configured.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None
              ) -> HTTPException:
        return HTTPException(status, detail={"error": code, "message": message}, headers=headers)

    def dependency(request: Request) -> ApiKeyInfo:
        checker = auth or getattr(request.app.state, "chatmw_key_auth", None)
        if checker is None:
            raise error(500, "auth_not_configured", "API keys are not configured on this server")
        key = _presented_key(request.headers.get("authorization"),
                             request.headers.get("x-api-key"))
        challenge = {"WWW-Authenticate": "Bearer"}
        if key is None:
            raise error(401, "missing_api_key", "send an API key as 'Authorization: Bearer "
                        "<key>' or 'X-API-Key: <key>'; create one with `chatmw keys create`",
                        challenge)
        result = checker.check(key)
        if result.info is None:
            message = ("the API key was revoked" if result.error == "revoked_api_key"
                       else "the API key is not valid")
            raise error(401, result.error or "invalid_api_key", message, challenge)
        if scope not in GRANTS.get(result.info.scope, set()):
            raise error(403, "insufficient_scope",
                        f"this request needs a key with scope {scope!r}; "
                        f"key {result.info.key_id} has scope {result.info.scope!r}")
        wait = checker.limiter.acquire(result.info.key_id)
        if wait > 0:
            retry_after = str(max(1, int(-(-wait // 1))))
            raise error(429, "rate_limited",
                        f"too many requests with key {result.info.key_id}; retry in "
                        f"{retry_after} s", {"Retry-After": retry_after})
        return result.info

    return dependency


def _presented_key(authorization: str | None, api_key_header: str | None) -> str | None:
    if authorization:
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key_header and api_key_header.strip():
        return api_key_header.strip()
    return None
