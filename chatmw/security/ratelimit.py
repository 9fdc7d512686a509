"""Token-bucket rate limits, one bucket per key, kept in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]

# Buckets unused this long are forgotten, so that the map stays small.
IDLE_FORGET_S = 3600.0


class RateLimiter:
    """A token bucket per name: ``burst`` tokens, refilled at ``rate_per_second``."""

    def __init__(self, rate_per_second: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_second <= 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, name: str) -> float:
        """Take one token for ``name``: 0 when allowed, else the seconds until one is free."""
        now = self._clock()
        with self._lock:
            tokens, updated = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - updated) * self.rate_per_second)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                self._forget_idle(now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_second

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) < 1024:
            return
        for name, (_, updated) in list(self._buckets.items()):
            if now - updated > IDLE_FORGET_S:
                del self._buckets[name]
