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

from chatmw._lazy import lazy_exports

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

# Each name is imported from its module on first use, so that importing one submodule
# (such as the privacy rules) does not import the others (such as FastAPI for the routes).
__getattr__ = lazy_exports(globals(), {
    "REGISTRY": "chatmw.security.erasure",
    "DataRegistry": "chatmw.security.erasure",
    "erase_person": "chatmw.security.erasure",
    "purge_older_than": "chatmw.security.erasure",
    "KeyAuth": "chatmw.security.keys",
    "create_key": "chatmw.security.keys",
    "list_keys": "chatmw.security.keys",
    "require_key": "chatmw.security.keys",
    "revoke_key": "chatmw.security.keys",
    "Privacy": "chatmw.security.privacy",
    "PrivacySettings": "chatmw.security.privacy",
    "Pseudonymiser": "chatmw.security.pseudonyms",
    "redact_text": "chatmw.security.redaction",
    "Secret": "chatmw.security.secret",
})
