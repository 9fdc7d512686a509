"""The garbage-collector policy of chatmw's long-running processes.

CPython's cyclic collector examines every tracked container of the generations it
collects. A full collection (generation 2) also walks everything the process made at start-up:
modules, SQLAlchemy's mappers and compiled statements, the FastAPI routes and their pydantic
models. A metrics query over a large window allocates enough row objects to trigger one
now and then, and the call that meets it pays for that walk.

:func:`settle_collector` runs once, after start-up. It collects what start-up left behind,
then freezes the survivors (``gc.freeze()``), so that later collections skip them, and
raises the youngest generation's threshold. The older generations keep CPython's policy
(``gc_collect_generations`` in ``Modules/gcmodule.c``, CPython 3.11). Generation 1 is
collected after ``middle`` young collections, and a full collection is due after ``oldest``
collections of generation 1. It runs only once the objects promoted since the last full
collection number at least a quarter of those it kept. So cyclic garbage waits at most for
that many allocations, or for a quarter of the live objects above the frozen ones, before
it is freed, and memory stays bounded.

Frozen objects are never examined again, so a garbage cycle among them is never freed.
The freeze therefore happens once, after start-up, and not while the process serves
requests.
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
# tracked containers instead of CPython's 700, and CPython's 10 and 10 for the older
# generations. CPython thus considers a full collection only after 10,000 x 10 x 10, about a
# million, such allocations.
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
    ``chatmw serve``, ``chatmw proxy``, or a bot that is the only app of its server.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with inner(target) as state:
            settle_collector()
            yield state

    app.router.lifespan_context = lifespan
