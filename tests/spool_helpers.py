"""Helpers shared by the spool, health and fault tests."""

from __future__ import annotations

import itertools
import queue
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


class PipelinedWriter(SwitchableWriter):
    """A :class:`SwitchableWriter` with ``submit`` and ``result``, as a writer process has.

    A thread writes the submitted batches in order, so the recorder hands a batch over
    while the previous one is being written. ``calls`` records the order of the calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self._submitted: queue.SimpleQueue[tuple[int, list[ev.Event]]] = queue.SimpleQueue()
        self._outcomes: dict[int, BaseException | int] = {}
        self._done = threading.Condition()
        self._tickets = itertools.count()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            ticket, batch = self._submitted.get()
            try:
                super().write(batch)
                outcome: BaseException | int = len(batch)
            except Exception as error:  # noqa: BLE001 - handed to result()
                outcome = error
            with self._done:
                self._outcomes[ticket] = outcome
                self._done.notify_all()

    def submit(self, batch: Sequence[ev.Event]) -> int:
        ticket = next(self._tickets)
        self.calls.append(("submit", ticket))
        self._submitted.put((ticket, list(batch)))
        return ticket

    def result(self, ticket: int) -> int:
        self.calls.append(("result", ticket))
        with self._done:
            self._done.wait_for(lambda: ticket in self._outcomes)
            outcome = self._outcomes.pop(ticket)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def write(self, batch: Sequence[ev.Event]) -> int:
        return self.result(self.submit(batch))

    def overlapped(self) -> bool:
        """Whether some batch was submitted before the result of an earlier one was read."""
        read: set[int] = set()
        for call, ticket in self.calls:
            if call == "result":
                read.add(ticket)
            elif any(earlier not in read for earlier in range(ticket)):
                return True
        return False
