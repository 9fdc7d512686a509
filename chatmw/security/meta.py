"""Meta's data-deletion callback: verify a ``signed_request`` and erase the person.

Meta sends ``signed_request=<signature>.<payload>`` (form-encoded), both parts base64url
without padding; the signature is HMAC-SHA256 of the payload part with the app secret, and
the payload is JSON with ``algorithm`` ("HMAC-SHA256") and ``user_id``. The callback must
return ``{"url": ..., "confirmation_code": ...}``, where the URL shows the deletion's
status (Meta's "Data Deletion Request Callback" documentation for apps).

NOTE: ``user_id`` is the app-scoped id of the person, which for Messenger can differ from
the page-scoped id (PSID) the webhooks carry; erasure finds the person only where the two
agree. Erase by PSID with ``chatmw erase`` or the admin API otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from chatmw.security.secret import Secret

__all__ = ["SignedRequestError", "parse_signed_request", "sign_request"]


class SignedRequestError(ValueError):
    """A ``signed_request`` was malformed or its signature did not verify."""


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_signed_request(signed_request: str, app_secret: Secret) -> dict[str, Any]:
    """Verify ``signed_request`` with ``app_secret`` and return its payload."""
    signature_part, separator, payload_part = signed_request.strip().partition(".")
    if not separator or not signature_part or not payload_part:
        raise SignedRequestError("signed_request must be '<signature>.<payload>'")
    try:
        signature = _b64decode(signature_part)
        payload = json.loads(_b64decode(payload_part))
    except (ValueError, UnicodeDecodeError) as error:
        raise SignedRequestError("signed_request is not valid base64url JSON") from error
    if not isinstance(payload, dict):
        raise SignedRequestError("signed_request payload is not a JSON object")
    if str(payload.get("algorithm", "")).upper() != "HMAC-SHA256":
        raise SignedRequestError(f"unsupported algorithm {payload.get('algorithm')!r}")
    expected = hmac.new(app_secret.reveal().encode(), payload_part.encode("ascii"),
                        hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise SignedRequestError("signed_request signature does not match the app secret")
    if not isinstance(payload.get("user_id"), str | int) or not str(payload["user_id"]):
        raise SignedRequestError("signed_request payload has no user_id")
    return payload


def sign_request(payload: dict[str, Any], app_secret: Secret) -> str:
    """Build a ``signed_request`` as Meta does (for tests and local tools)."""
    payload_part = _b64encode(json.dumps(payload).encode("utf-8"))
    signature = hmac.new(app_secret.reveal().encode(), payload_part.encode("ascii"),
                         hashlib.sha256).digest()
    return f"{_b64encode(signature)}.{payload_part}"
