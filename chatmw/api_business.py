"""HTTP endpoints that record conversions, leads and advertising spend.

Mount with ``app.include_router(create_business_router(runtime))``. Invalid input gets a
422 in FastAPI's shape, ``{"detail": [{"loc": ["body", FIELD], "msg": ..., "type": ...}]}``,
so ``detail[0].loc`` names the field (or, for CSV, the line and column).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from chatmw import events as ev
from chatmw.business import (
    BusinessSettings,
    SpendRowError,
    deployment_currency,
    install,
    lead_key,
    parse_spend_csv,
)
from chatmw.business_detect import find_emails, hash_value, normalise_email
from chatmw.events_business import Conversion, Lead, LeadKind, Spend, parse_amount, to_micros
from chatmw.runtime import Runtime

__all__ = ["create_business_router", "MAX_CSV_BYTES"]

logger = logging.getLogger("chatmw")
_T = TypeVar("_T")

# The largest spend CSV accepted in one upload: an estimated 50,000 rows of 100 bytes.
MAX_CSV_BYTES = 5 * 1024 * 1024
_PHONE = re.compile(r"^\+?\d{8,15}$")
_PHONE_SEPARATORS = re.compile(r"[\s().\-/]")


def _amount(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError('expected a decimal number or a string such as "12.50"')
    return parse_amount(value)


class ConversionBody(BaseModel):
    """A conversion. Give ``user_id`` or ``conversation_id`` (or both) on ``channel``."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=255, description="Idempotency key.")
    name: str = Field(min_length=1, max_length=128, description="Conversion name, e.g. purchase.")
    value: Any = Field(description='Decimal amount, e.g. "49.90"; at most 6 decimal places.')
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR.")
    channel: str = Field(min_length=1, max_length=32)
    user_id: str | None = Field(default=None, min_length=1, max_length=255)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=255)
    occurred_at: AwareDatetime | None = Field(default=None, description="Default: now.")
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("value", mode="before")
    @classmethod
    def check_value(cls, value: Any) -> Any:
        return _amount(value)


class LeadBody(BaseModel):
    """A lead: an e-mail address, a phone number, or both, given by ``user_id`` on ``channel``."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field(min_length=1, max_length=32)
    user_id: str = Field(min_length=1, max_length=255)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=32)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=255)
    occurred_at: AwareDatetime | None = None
    score: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    key: str | None = Field(
        default=None,
        min_length=1,
        max_length=240,
        description="Idempotency key; default: one lead per user and value.",
    )
    meta: dict[str, Any] = Field(default_factory=dict)


class SpendBody(BaseModel):
    """The spend of one day, channel and campaign; it replaces an earlier record of the same."""

    model_config = ConfigDict(extra="forbid")

    day: date
    channel: str = Field(min_length=1, max_length=32)
    campaign: str = Field(default="", max_length=255)
    amount: Any = Field(description='Non-negative decimal amount, e.g. "120.00".')
    currency: str | None = Field(
        default=None,
        pattern=r"^[A-Z]{3}$",
        description="ISO 4217 code; default: the deployment's currency.",
    )

    @field_validator("amount", mode="before")
    @classmethod
    def check_amount(cls, value: Any) -> Any:
        amount = _amount(value)
        if amount < 0:
            raise ValueError("amount must not be negative")
        return amount


def _invalid(loc: Sequence[str | int], message: str, status: int = 422) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"detail": [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]},
    )


class _StoreUnavailable(Exception):
    """The database failed; the endpoint answers 503 so the client retries."""


def _store_errors_as_503(
    endpoint: Callable[..., Awaitable[JSONResponse]],
) -> Callable[..., Awaitable[JSONResponse]]:
    @functools.wraps(endpoint)
    async def guarded(*args: Any, **kwargs: Any) -> JSONResponse:
        try:
            return await endpoint(*args, **kwargs)
        except _StoreUnavailable:
            return JSONResponse(
                status_code=503,
                content={"detail": "the database is unavailable; retry later"},
            )

    return guarded


def _unavailable() -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"detail": "the recorder queue is full; retry later with the same key"},
    )


class _Endpoints:
    def __init__(self, runtime: Runtime, settings: BusinessSettings) -> None:
        self.runtime = runtime
        self.settings = settings

    async def _in_store(self, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return await run_in_threadpool(function, *args)
        except DBAPIError as error:
            logger.error(
                "business API: database call %s failed: %s",
                function.__name__,
                type(error.orig or error).__name__,
            )
            raise _StoreUnavailable from error

    async def _currency_error(self, currency: str) -> JSONResponse | None:
        expected = await self._in_store(deployment_currency, self.runtime.engine, self.settings)
        if expected is None or currency == expected:
            return None
        return _invalid(
            ["currency"],
            f"currency {currency} differs from this deployment's "
            f"currency {expected}; record amounts in {expected}",
        )

    async def conversion(self, body: ConversionBody) -> JSONResponse:
        if body.user_id is None and body.conversation_id is None:
            return _invalid(["user_id"], "user_id or conversation_id is required")
        error = await self._currency_error(body.currency)
        if error is not None:
            return error
        event = Conversion(
            channel=body.channel,
            occurred_at=body.occurred_at or ev.now_utc(),
            key=body.key,
            name=body.name,
            value_micros=to_micros(body.value),
            currency=body.currency,
            user_id=body.user_id,
            conversation_id=body.conversation_id,
            meta=body.meta,
        )
        if not self.runtime.recorder.submit(event):
            return _unavailable()
        return JSONResponse(status_code=202, content={"status": "accepted", "key": body.key})

    async def lead(self, body: LeadBody) -> JSONResponse:
        values: list[tuple[LeadKind, str]] = []
        if body.email is not None:
            email = normalise_email(body.email)
            if find_emails(email) != [email]:
                return _invalid(["email"], f"invalid e-mail address {body.email!r}")
            values.append(("email", email))
        if body.phone is not None:
            phone = _PHONE_SEPARATORS.sub("", body.phone)
            if not _PHONE.match(phone):
                return _invalid(
                    ["phone"],
                    f"invalid phone number {body.phone!r}; expected 8 to 15 "
                    "digits with an optional leading +",
                )
            values.append(("phone", phone))
        if not values:
            return _invalid(["email"], "email or phone is required")
        keys = []
        for kind, value in values:
            key = lead_key(body.channel, body.user_id, kind, hash_value(kind, value))
            if body.key is not None:
                key = body.key if len(values) == 1 else f"{body.key}:{kind}"
            keys.append(key)
            event = Lead(
                channel=body.channel,
                occurred_at=body.occurred_at or ev.now_utc(),
                key=key,
                user_id=body.user_id,
                kind=kind,
                value=value,
                conversation_id=body.conversation_id,
                origin="api",
                score=body.score,
                meta=body.meta,
            )
            if not self.runtime.recorder.submit(event):
                return _unavailable()
        return JSONResponse(status_code=202, content={"status": "accepted", "keys": keys})

    async def spend(self, body: SpendBody) -> JSONResponse:
        expected = await self._in_store(deployment_currency, self.runtime.engine, self.settings)
        currency = body.currency or expected
        if currency is None:
            return _invalid(["currency"], "currency is required until the deployment has one")
        if expected is not None and currency != expected:
            return _invalid(
                ["currency"],
                f"currency {currency} differs from this deployment's "
                f"currency {expected}; record amounts in {expected}",
            )
        event = Spend.for_day(body.day, body.channel, body.amount, currency, body.campaign)
        await self._in_store(self.runtime.writer.write, [event])
        return JSONResponse(status_code=200, content={"stored": 1, "currency": currency})

    async def spend_csv(self, request: Request) -> JSONResponse:
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > MAX_CSV_BYTES:
                return _invalid([], f"CSV larger than {MAX_CSV_BYTES} bytes; split the file", 413)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return _invalid([], f"CSV is not valid UTF-8 (byte {error.start})")
        expected = await self._in_store(deployment_currency, self.runtime.engine, self.settings)
        try:
            events = parse_spend_csv(text, expected)
        except SpendRowError as error:
            return _invalid([error.line, error.column], str(error))
        if not events:
            return _invalid([], "CSV has no rows")
        if expected is not None and events[0].currency != expected:
            return _invalid(
                [2, "currency"],
                f"line 2, column currency: currency {events[0].currency} "
                f"differs from this deployment's currency {expected}",
            )
        await self._in_store(self.runtime.writer.write, events)
        days = sorted(event.day for event in events)
        return JSONResponse(
            status_code=200,
            content={
                "stored": len(events),
                "currency": events[0].currency,
                "first_day": days[0].isoformat(),
                "last_day": days[-1].isoformat(),
            },
        )


def create_business_router(
    runtime: Runtime,
    settings: BusinessSettings | None = None,
    prefix: str = "/business",
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """Build the router that records conversions, leads and spend under ``prefix``.

    It installs the business handlers on ``runtime.writer`` (see
    :func:`chatmw.business.install`), with lead redaction following the runtime's privacy
    text mode unless ``settings.redact_leads`` is set. Conversions and leads go through the
    recorder and return 202 once queued. Spend is written at once and returns 200. A repeated
    conversion or lead key is stored once; a repeated spend day, channel and campaign
    replaces the amount. ``dependencies`` run before each endpoint (an API key check, say).
    """
    settings = settings or BusinessSettings()
    privacy = getattr(runtime, "privacy_settings", None)
    install(runtime.writer, settings, text_mode=getattr(privacy, "text_mode", None))
    endpoints = _Endpoints(runtime, settings)
    router = APIRouter(
        prefix=prefix,
        tags=["business"],
        dependencies=[Depends(dep) if callable(dep) else dep for dep in dependencies],
    )
    invalid: dict[int | str, dict[str, Any]] = {
        422: {"description": "Invalid input; `detail[0].loc` names the field."}
    }
    router.add_api_route(
        "/conversions",
        _store_errors_as_503(endpoints.conversion),
        methods=["POST"],
        status_code=202,
        summary="Record a conversion",
        responses={**invalid, 503: {"description": "Queue full."}},
        description="Accepted for writing (202). The same `key` posted again is stored once; "
        "a currency other than the deployment's is rejected.",
    )
    router.add_api_route(
        "/leads",
        _store_errors_as_503(endpoints.lead),
        methods=["POST"],
        status_code=202,
        summary="Record a lead",
        responses={**invalid, 503: {"description": "Queue full."}},
        description="Accepted for writing (202). Without `key`, the same user and value posted "
        "again is one lead. With both `email` and `phone`, two leads are recorded "
        "(their keys end in `:email` and `:phone` when `key` is given).",
    )
    router.add_api_route(
        "/spend",
        _store_errors_as_503(endpoints.spend),
        methods=["POST"],
        summary="Record one day's spend",
        responses=invalid,
        description="Written at once. A later record of the same day, channel and campaign "
        "replaces the amount.",
    )
    router.add_api_route(
        "/spend/csv",
        _store_errors_as_503(endpoints.spend_csv),
        methods=["POST"],
        summary="Upload spend as CSV",
        responses={**invalid, 413: {"description": "Body too large."}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"text/csv": {"schema": {"type": "string"}}},
            }
        },
        description="Body: CSV with the header `day,channel,campaign,amount[,currency]` (ISO "
        "dates, dot decimals, one currency). Nothing is stored from a file with an "
        'invalid row; `detail[0].loc` is `["body", LINE, COLUMN]`.',
    )
    return router
