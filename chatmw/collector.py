"""The garbage-collector policy of chatmw's long-running processes.

CPython's cyclic collector examines every tracked container of the generations it
collects. A full collection (generation 2) also walks everything the process made at start-up:
modules, SQLAlchemy's mappers and compiled statements, the FastAPI routes and their pydantic
models. A metrics query over a large window allocates enough row objects to trigger one
now and then, and the call that meets it pays for that walk.

:func:`settle_collector` runs once, after start-up: it collects what start-up left behind,
then freezes the survivors (``gc.freeze()``), so that later collections skip them, and
raises the youngest generation's threshold. The policy of the older generations stays
CPython's: generation 1 is collected after ``middle`` young collections, and a full
collection runs after ``oldest`` collections of generation 1, and only once the objects
promoted since the last full collection number at least a quarter of those it kept. So
cyclic garbage waits at most for that many allocations, or a quarter of the live heap
above the frozen objects, before it is freed: memory stays bounded.

Frozen objects are never examined again. Garbage cycles among them are never freed, so the
freeze happens once, after start-up, and never again while the process serves requests.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["SERVER_THRESHOLDS", "settle_collector", "settle_after_startup"]

logger = logging.getLogger("chatmw")

# Collector thresholds of a serving process: a young collection per 10,000 net allocations of
# containers instead of 700, then CPython's 10 and 10 for the older generations. A full
# collection is considered at most once per million such allocations.
SERVER_THRESHOLDS = (10_000, 10, 10)


def settle_collector(thresholds: tuple[int, int, int] = SERVER_THRESHOLDS) -> int:
    """Collect, freeze the surviving objects and set the collector's ``thresholds``.

    Call it once, when the process has finished starting. Returns the number of objects
    frozen, which is also logged at INFO level.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    frozen = gc.get_freeze_count()
    logger.info("garbage collector settled: %d start-up objects frozen, thresholds %s",
                frozen, thresholds)
    return frozen


def settle_after_startup(app: Any) -> None:
    """Run :func:`settle_collector` once the lifespan start-up of ``app`` has finished.

    ``app`` is a Starlette or FastAPI application; the runtime, the routes and the first
    connections then exist before the freeze. Only for an app that owns its process:
    ``chatmw serve`` and ``chatmw proxy``.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with inner(target) as state:
            settle_collector()
            yield state

    app.router.lifespan_context = lifespan
