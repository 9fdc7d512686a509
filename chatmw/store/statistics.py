"""Planner statistics of a young PostgreSQL store, refreshed as its tables grow.

The writer runs the same statements for every batch, and psycopg prepares them on the
server after a few runs. A few runs later PostgreSQL switches each to a generic plan,
chosen with the table sizes of that moment, and keeps it until the statistics of a table
it reads change. In a new
store those sizes are a few thousand rows, so the plans scan whole tables and hash them.
They keep doing so as the tables grow, until autovacuum analyses the tables, at the
earliest a minute (``autovacuum_naptime``) after the first rows. Writing 180,000 messages
into a new store, the server spent about a fifth of its time in such scans.

:class:`GrowthAnalyzer` analyses ``messages``, ``conversations`` and ``contacts`` each time
the messages a writer stored double, from ``first_at`` messages until the table contains
``until``. From there on autovacuum, which analyses a table each time a tenth of it
changed, keeps the statistics closer than doubling would. Analysing a table reads a
sample of at most 30,000 of its rows with the default statistics target. Each run counts
the table's rows, those other writers stored included, so the next run comes at twice
that count. A role that does not own a table may not analyse it: the server skips the
table with a warning, which is logged.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

__all__ = ["GrowthAnalyzer", "ANALYZED_TABLES"]

logger = logging.getLogger("chatmw")

ANALYZED_TABLES = ("messages", "conversations", "contacts")
# The maximum wait for a lock held by another ANALYZE or VACUUM (such as autovacuum's),
# which then refreshes the statistics itself.
_LOCK_TIMEOUT = "100ms"


class GrowthAnalyzer:
    """Runs ``ANALYZE`` on the writer's tables each time the stored messages double.

    With ``background`` (the default) each run has a thread and a pooled connection of its
    own, so the writer goes on with its next batch meanwhile. ``ANALYZE`` takes a lock that
    does not conflict with the writer's inserts and updates. At most one run is in flight,
    and :meth:`wait` waits for it.
    """

    def __init__(self, first_at: int = 2_000, until: int = 1_000_000,
                 background: bool = True) -> None:
        self.first_at = first_at
        self.until = until
        self.background = background
        # Messages in the table, as estimated at the first call and counted since.
        self.messages: float | None = None
        self.next_at = float(first_at)
        self.done = False
        self.runs = 0
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None

    def __getstate__(self) -> dict[str, object]:
        # A copy (a writer process's) estimates the table again.
        return {"first_at": self.first_at, "until": self.until,
                "background": self.background, "messages": None,
                "next_at": float(self.first_at), "done": False, "runs": 0}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._running = None

    def after_commit(self, engine: Engine, new_messages: int) -> None:
        """Count ``new_messages`` just committed, and analyse the tables once they doubled.

        A failed ``ANALYZE`` is logged, not raised, so the committed batch is unaffected.
        """
        if self.done or engine.dialect.name != "postgresql":
            return
        try:
            with self._lock:
                if self.messages is None:
                    self.messages = self._estimate(engine)
                    self.next_at = max(2 * self.messages, float(self.first_at))
                    if self.messages >= self.until:
                        self.done = True
                        return
                self.messages += new_messages
                if self.messages < self.next_at or self._running is not None:
                    return
                self.next_at = 2 * self.messages
                self.done = self.messages >= self.until
                if self.background:
                    self._running = threading.Thread(
                        target=self._run, args=(engine,), name="chatmw-analyze", daemon=True)
                    self._running.start()
                    return
        except DBAPIError as error:
            self._failed(error)
            return
        except Exception:  # noqa: BLE001 - statistics never fail a committed batch
            logger.exception("analysing the store's tables failed")
            return
        self._run(engine)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run in flight, if any, and return whether none is left."""
        running = self._running
        if running is not None:
            running.join(timeout)
        return self._running is None

    def _run(self, engine: Engine) -> None:
        try:
            if not self._analyze(engine):
                return
            # ANALYZE counted every row, those of other writers included. The count here
            # is kept when it is higher, as for a table never analysed before.
            estimate = self._estimate(engine)
            with self._lock:
                self.messages = max(self.messages or 0.0, estimate)
                self.next_at = 2 * self.messages
                self.done = self.messages >= self.until
                messages = self.messages
            logger.info("analysed %s at about %d stored messages", ", ".join(ANALYZED_TABLES),
                        messages)
        except DBAPIError as error:
            self._failed(error)
        except Exception:  # noqa: BLE001 - statistics never fail a committed batch
            logger.exception("analysing the store's tables failed")
        finally:
            with self._lock:
                if self._running is threading.current_thread():
                    self._running = None

    def _failed(self, error: DBAPIError) -> None:
        # For example a lock timeout, or a connection the server ended. The estimate is
        # unknown when reading it failed.
        stored = "unknown" if self.messages is None else f"about {self.messages:.0f}"
        logger.info("analysing the store's tables failed (stored messages: %s), the next "
                    "attempt is at %d: %s", stored, self.next_at, error.orig)

    def _estimate(self, engine: Engine) -> float:
        with engine.connect() as connection:
            estimate = connection.execute(text(
                "SELECT reltuples FROM pg_class WHERE oid = CAST('messages' AS regclass)"
            )).scalar_one()
        # -1 until the table was first analysed or vacuumed.
        return max(float(estimate), 0.0)

    def _analyze(self, engine: Engine) -> bool:
        # Returns whether every table was analysed. The server skips a table the role
        # may not analyse with a warning instead of an error.
        warnings: list[str] = []

        def keep_warning(diagnostic: Any) -> None:
            if diagnostic.severity_nonlocalized == "WARNING":
                warnings.append(str(diagnostic.message_primary))

        with engine.begin() as connection:
            driver = connection.connection.driver_connection
            listening = hasattr(driver, "add_notice_handler")
            if listening:
                driver.add_notice_handler(keep_warning)  # type: ignore[union-attr]
            try:
                connection.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
                connection.execute(text(f"ANALYZE {', '.join(ANALYZED_TABLES)}"))
            finally:
                if listening:
                    driver.remove_notice_handler(keep_warning)  # type: ignore[union-attr]
        if warnings:
            logger.warning("analysing the store's tables at about %d stored messages skipped "
                           "some of them: %s. Autovacuum analyses them, or a role allowed to "
                           "analyse them (their owner) can.", self.messages, "; ".join(warnings))
            return False
        with self._lock:
            self.runs += 1
        return True
