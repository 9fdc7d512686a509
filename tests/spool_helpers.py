"""Helpers shared by the spool, health and fault tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import IntegrityError, OperationalError

from chatmw import events as ev


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every 10 ms until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()



class SwitchableWriter:
    """Keeps written events in memory; raises a retryable error while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.batches: list[list[ev.Event]] = []
        self.delay = 0.0
        self.poison: set[str] = set()

    def write(self, batch: Sequence[ev.Event]) -> None:
        if self.down.is_set():
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        if self.delay:
            time.sleep(self.delay)
        if any(getattr(event, "key", None) in self.poison for event in batch):
            raise IntegrityError("INSERT", {}, Exception("value too long"))
        self.batches.append(list(batch))

    def keys(self) -> list[str]:
        return [event.key for batch in self.batches for event in batch]  # type: ignore[attr-defined]
