"""Security and privacy: API keys, pseudonyms, redaction, erasure and retention.

The functions other parts call:

- :func:`require_key` (``chatmw.security.keys``): a FastAPI dependency for routes that
  need an API key of a scope, with per-key rate limits.
- :class:`Privacy` and :class:`PrivacySettings` (``chatmw.security.privacy``): keyed
  pseudonyms of user and conversation ids, and how message text is stored.
- :data:`REGISTRY` (``chatmw.security.erasure``): where a feature registers the tables and
  steps that erasure and retention must cover.
- :func:`create_admin_router` (``chatmw.security.api``): erasure over HTTP and Meta's
  data-deletion callback.
"""

from chatmw.security.erasure import REGISTRY, DataRegistry, erase_person, purge_older_than
from chatmw.security.keys import KeyAuth, create_key, list_keys, require_key, revoke_key
from chatmw.security.privacy import Privacy, PrivacySettings
from chatmw.security.pseudonyms import Pseudonymiser
from chatmw.security.redaction import redact_text
from chatmw.security.secret import Secret

__all__ = [
    "REGISTRY",
    "DataRegistry",
    "KeyAuth",
    "Privacy",
    "PrivacySettings",
    "Pseudonymiser",
    "Secret",
    "create_key",
    "erase_person",
    "list_keys",
    "purge_older_than",
    "redact_text",
    "require_key",
    "revoke_key",
]
