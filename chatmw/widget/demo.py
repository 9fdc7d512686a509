"""The widget in the ``chatmw demo`` app: the example site, chatting with the example bot."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from chatmw.runtime import Runtime
from chatmw.widget import WidgetSettings, example_site_dir, mount_widget
from chatmw.widget.example_bot import EXAMPLE_BOT_PATH, create_example_bot

__all__ = ["mount_demo_site", "demo_origins"]

# The example bot runs in the same process through httpx.ASGITransport, so this host name
# is never resolved.
_EXAMPLE_BOT_URL = f"http://example-bot.invalid{EXAMPLE_BOT_PATH}"


def demo_origins(host: str, port: int) -> list[str]:
    """Return the origins a browser on this machine uses for a server on ``host:port``."""
    origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::"):
        origins.append(f"http://{host.lower()}:{port}")
    return origins


def mount_demo_site(app: FastAPI, runtime: Runtime, host: str, port: int) -> bool:
    """Serve the example site at ``/`` with the widget talking to the example bot.

    Returns ``False`` (and mounts nothing) when ``examples/site`` is not next to the
    package, as in an installed wheel.
    """
    site_dir = example_site_dir()
    if site_dir is None:
        return False
    settings = WidgetSettings(allowed_origins=demo_origins(host, port), bot_url=_EXAMPLE_BOT_URL)
    transport = httpx.ASGITransport(create_example_bot())
    mount_widget(app, runtime, settings, site_dir=site_dir, bot_transport=transport)
    return True
