"""Real HTTP servers on 127.0.0.1: uvicorn in a background thread, one per app."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """Runs ``app`` with uvicorn on ``127.0.0.1:port`` (a free port when ``port`` is 0)."""

    def __init__(self, app: Any, port: int = 0, lifespan: str = "off") -> None:
        self.app = app
        self.port = port
        self.lifespan = lifespan
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the proto
        # says TCP. Without it, keep-alive responses wait about 40 ms for a delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = int(listener.getsockname()[1])
        config = uvicorn.Config(self.app, log_level="warning", lifespan=self.lifespan)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [listener]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start within {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"server on port {self.port} did not stop within {timeout}s")
        self._server = None
        self._thread = None


@contextmanager
def serve(app: Any, port: int = 0, lifespan: str = "off") -> Iterator[ServerThread]:
    """Serve ``app`` during the ``with`` block; ``lifespan="on"`` runs the app's lifespan."""
    server = ServerThread(app, port, lifespan).start()
    try:
        yield server
    finally:
        server.stop()
