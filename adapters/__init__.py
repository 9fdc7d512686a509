"""Platform adapters, importable as ``chatmw.adapters``: Facebook Messenger and WhatsApp.

- :func:`create_proxy_app`: the proxy in front of a bot of any language.
- :class:`MetaWebhookMiddleware` and the recording httpx transports: a Python bot in process.
- :class:`MessengerSender` and :class:`WhatsAppSender`: the outbound channels for surveys.
"""

from chatmw.adapters._meta import MetaSettings
from chatmw.adapters.httpx_hooks import AsyncRecordingTransport, RecordingTransport
from chatmw.adapters.messenger import MessengerSender
from chatmw.adapters.middleware import MetaWebhookMiddleware
from chatmw.adapters.proxy import create_proxy_app
from chatmw.adapters.whatsapp import WhatsAppSender

__all__ = [
    "MetaSettings",
    "create_proxy_app",
    "MetaWebhookMiddleware",
    "AsyncRecordingTransport",
    "RecordingTransport",
    "MessengerSender",
    "WhatsAppSender",
]
