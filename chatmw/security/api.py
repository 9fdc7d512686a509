"""Admin routes: erase a person, Meta's data-deletion callback and its status page."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from chatmw.security.erasure import REGISTRY, DataRegistry, erase_person
from chatmw.security.keys import KeyAuth, require_key
from chatmw.security.meta import SignedRequestError, parse_signed_request
from chatmw.security.privacy import Privacy
from chatmw.security.secret import Secret
from chatmw.store.models_security import ErasureRecord

__all__ = ["create_admin_router", "META_CHANNELS"]

# Channels on which a Meta data-deletion request erases the person.
META_CHANNELS = ("messenger", "instagram")
# A signed_request is a few hundred bytes; anything much larger is not one.
MAX_CALLBACK_BYTES = 16_384


def create_admin_router(engine: Engine, *, auth: KeyAuth | None = None,
                        privacy: Privacy | Callable[[], Privacy | None] | None = None,
                        prefix: str = "/metrics",
                        registry: DataRegistry = REGISTRY,
                        meta_app_secret: Secret | None = None,
                        meta_channels: Sequence[str] = META_CHANNELS,
                        public_base_url: str | None = None) -> APIRouter:
    """Return the admin router mounted under ``{prefix}/admin``.

    - ``DELETE {prefix}/admin/contacts/{channel}/{user_id}`` (key with scope ``admin``)
      erases the person and returns the rows removed per table. ``user_id`` is the
      platform id; with ``?pseudonymised=true`` it is the stored pseudonym.
    - ``POST {prefix}/admin/meta/data-deletion`` (only with ``meta_app_secret``) is Meta's
      data-deletion callback: it verifies the ``signed_request`` and erases the person on
      ``meta_channels``.
    - ``GET {prefix}/admin/meta/data-deletion/{code}`` shows that erasure's status; it is
      public, because the person opens it, and shows no personal data.

    ``privacy`` (the runtime's :class:`Privacy`) maps platform ids to pseudonyms; pass it
    whenever the runtime pseudonymises. Because the runtime resolves it only in
    ``start()``, a function returning it is accepted too (``lambda: runtime.privacy``).
    ``public_base_url`` is the scheme and host the status URL starts with (default: taken
    from the request).
    """
    router = APIRouter(prefix=f"{prefix}/admin", tags=["admin"])
    admin = Depends(require_key("admin", auth))

    def erase(channel: str, user_id: str, pseudonymised: bool, origin: str,
              code: str | None = None) -> dict[str, Any]:
        current = privacy() if callable(privacy) else privacy
        ids = (current.erasure_ids(user_id, pseudonymised) if current is not None
               else {"user_id": user_id, "raw_user_id": None if pseudonymised else user_id})
        report = erase_person(engine, channel, registry=registry, origin=origin,
                              confirmation_code=code, **ids)
        return report.as_dict()

    @router.delete("/contacts/{channel}/{user_id}", dependencies=[admin])
    def erase_contact(channel: str, user_id: str, pseudonymised: bool = False) -> dict[str, Any]:
        return erase(channel, user_id, pseudonymised, "api")

    if meta_app_secret is not None:
        secret = meta_app_secret

        @router.post("/meta/data-deletion")
        async def meta_data_deletion(request: Request) -> dict[str, str]:
            body = await request.body()
            if len(body) > MAX_CALLBACK_BYTES:
                raise _bad_request("signed_request is too large")
            values = parse_qs(body.decode("utf-8", "replace")).get("signed_request", [])
            if not values:
                raise _bad_request("missing form field signed_request")
            try:
                payload = parse_signed_request(values[0], secret)
            except SignedRequestError as error:
                raise _bad_request(str(error)) from error
            code = secrets.token_hex(12)
            for channel in meta_channels:
                await run_in_threadpool(erase, channel, str(payload["user_id"]), False, "meta",
                                        code)
            base = (public_base_url or str(request.base_url)).rstrip("/")
            return {"url": f"{base}{prefix}/admin/meta/data-deletion/{code}",
                    "confirmation_code": code}

    @router.get("/meta/data-deletion/{code}")
    def deletion_status(code: str) -> dict[str, Any]:
        with Session(engine) as session:
            records = session.scalars(select(ErasureRecord)
                                      .where(ErasureRecord.confirmation_code == code)).all()
        if not records:
            raise HTTPException(404, detail={"error": "not_found",
                                             "message": f"no deletion request with code {code}"})
        done = [r.completed_at_ms for r in records if r.completed_at_ms is not None]
        completed = len(done) == len(records)
        return {
            "confirmation_code": code,
            "status": "completed" if completed else "pending",
            "completed_at": (datetime.fromtimestamp(max(done) / 1000, UTC).isoformat()
                             if completed else None),
            "rows_removed": sum(sum((r.removed or {}).values()) for r in records),
        }

    return router


def _bad_request(message: str) -> HTTPException:
    return HTTPException(400, detail={"error": "invalid_signed_request", "message": message})
