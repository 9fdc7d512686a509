"""The recorder's health in the Prometheus text exposition format (version 0.0.4).

:func:`render_metrics` turns a :class:`~chatmw.recorder.Recorder` (and its spool, when it
has one) into text a Prometheus server can scrape; :func:`create_health_router` serves it
at ``GET {prefix}/health/metrics`` with a JSON summary at ``GET {prefix}/health``. The
format is written here directly because it is a few lines of text; see
https://prometheus.io/docs/instrumenting/exposition_formats/ for the grammar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatmw.recorder import HEALTHY, REPLAYING, SPOOLING, Recorder

if TYPE_CHECKING:
    from fastapi import APIRouter

    from chatmw.runtime import Runtime

__all__ = ["render_metrics", "health_summary", "create_health_router", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = (HEALTHY, SPOOLING, REPLAYING)


@dataclass(slots=True)
class _Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[str, Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, labels: Mapping[str, str] | None = None, suffix: str = "") -> None:
        self.samples.append((self.name + suffix, labels or {}, value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _render(families: Iterable[_Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for name, labels, value in family.samples:
            label_text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            rendered = f"{name}{{{label_text}}}" if label_text else name
            lines.append(f"{rendered} {_format_value(value)}")
    return "\n".join(lines) + "\n"


def _recorder_families(recorder: Recorder) -> list[_Family]:
    stats = recorder.stats()
    state = _Family("chatmw_recorder_state", "gauge",
                    "1 for the recorder's current state (healthy, spooling, replaying), else 0.")
    for name in STATES:
        state.add(1.0 if stats.state == name else 0.0, {"state": name})
    changes = _Family("chatmw_recorder_state_changes_total", "counter",
                      "Times the recorder entered each state.")
    for name in STATES:
        changes.add(stats.state_changes.get(name, 0), {"state": name})
    dropped = _Family("chatmw_events_dropped_total", "counter",
                      "Events lost, by reason (queue_full, spool_full, write_error, ...).")
    for reason, count in sorted(stats.dropped.items()):
        dropped.add(count, {"reason": reason})
    write = _Family("chatmw_write_seconds", "summary", "Time of successful batch writes.")
    write.add(stats.write_batches, suffix="_count")
    write.add(stats.write_seconds_sum, suffix="_sum")
    last_write = _Family("chatmw_last_write_seconds", "gauge",
                         "Time of the last successful batch write (NaN before the first).")
    last_write.add(math.nan if stats.last_write_seconds is None else stats.last_write_seconds)

    simple = [
        ("chatmw_queue_depth", "gauge", "Events waiting in the recorder's queue.",
         stats.queue_depth),
        ("chatmw_overflow_depth", "gauge",
         "Events waiting for the spill thread because the queue was full.", stats.overflow_depth),
        ("chatmw_events_submitted_total", "counter", "Events accepted by the recorder.",
         stats.submitted),
        ("chatmw_events_written_total", "counter", "Events written to the store.", stats.written),
        ("chatmw_events_spooled_total", "counter", "Events appended to the spool.", stats.spooled),
        ("chatmw_events_replayed_total", "counter", "Events written to the store from the spool.",
         stats.replayed),
        ("chatmw_failed_batches_total", "counter",
         "Batches that failed after every retry, or events the store rejected.",
         stats.failed_batches),
    ]
    families = [_single(*item) for item in simple]
    return [state, changes, *families, dropped, write, last_write]


def _single(name: str, kind: str, help_text: str, value: float) -> _Family:
    family = _Family(name, kind, help_text)
    family.add(value)
    return family


def _spool_families(spool: Any) -> list[_Family]:
    stats = spool.stats()
    replayed, pending = stats.replayed_events, stats.pending_events
    progress = 1.0 if pending == 0 else replayed / (replayed + pending)
    oldest = math.nan if stats.oldest_age_seconds is None else stats.oldest_age_seconds
    items = [
        ("chatmw_spool_pending_events", "gauge", "Spooled events waiting for replay.", pending),
        ("chatmw_spool_bytes", "gauge", "Size of the spool's segment files.",
         stats.pending_bytes),
        ("chatmw_spool_segments", "gauge", "Segment files in the spool.", stats.segments),
        ("chatmw_spool_oldest_age_seconds", "gauge",
         "Age of the oldest spooled event waiting for replay (NaN when none waits).", oldest),
        ("chatmw_spool_appended_events_total", "counter", "Events appended to the spool files.",
         stats.appended_events),
        ("chatmw_spool_replayed_events_total", "counter", "Events replayed from the spool files.",
         stats.replayed_events),
        ("chatmw_spool_rejected_events_total", "counter",
         "Events moved to rejected.log because they could not be decoded or stored.",
         stats.rejected_events),
        ("chatmw_spool_full_rejections_total", "counter",
         "Appends rejected because the spool had reached its size limit.",
         stats.full_rejections),
        ("chatmw_spool_replay_progress_ratio", "gauge",
         "Events replayed since start divided by those plus the events still waiting.",
         progress),
    ]
    return [_single(*item) for item in items]


def render_metrics(recorder: Recorder) -> str:
    """Render the recorder's counters, and its spool's when it has ``stats()``, as text."""
    families = _recorder_families(recorder)
    if callable(getattr(recorder.spool, "stats", None)):
        families.extend(_spool_families(recorder.spool))
    raises = getattr(recorder.writer, "priority_raises", None)
    if isinstance(raises, int):
        families.append(_single(
            "chatmw_writer_priority_raises_total", "counter",
            "Times the writer processes starved under the idle scheduling policy and were "
            "started again under the batch policy.", raises))
    return _render(families)


def health_summary(recorder: Recorder) -> dict[str, Any]:
    """Return the recorder's state and main counters as JSON-ready data."""
    stats = recorder.stats()
    summary: dict[str, Any] = {
        "state": stats.state,
        "queue_depth": stats.queue_depth,
        "submitted": stats.submitted,
        "written": stats.written,
        "spooled": stats.spooled,
        "replayed": stats.replayed,
        "dropped": stats.dropped,
    }
    if callable(getattr(recorder.spool, "stats", None)):
        spool = recorder.spool.stats()  # type: ignore[union-attr]
        summary["spool"] = {"pending_events": spool.pending_events,
                            "bytes": spool.pending_bytes,
                            "oldest_age_seconds": spool.oldest_age_seconds}
    return summary


def create_health_router(runtime: Runtime, prefix: str = "/metrics",
                         dependencies: Iterable[Callable[..., Any]] = ()) -> APIRouter:
    """Return a router with ``GET {prefix}/health`` (JSON) and ``GET {prefix}/health/metrics``.

    ``dependencies`` run before each route, for example ``require_key("read", keys)`` from
    :mod:`chatmw.security.keys`; without them both routes are public. Both return 200 in
    every recorder state: a spooling recorder must not make a load balancer take the bot
    out of service.
    """
    from fastapi import APIRouter, Depends
    from fastapi.responses import JSONResponse, Response

    router = APIRouter(prefix=prefix, dependencies=[Depends(d) for d in dependencies])

    # response_model=None: the return annotations name classes imported in this function,
    # which FastAPI cannot resolve from the module, and the OpenAPI description would fail.
    @router.get("/health/metrics", response_model=None)
    def health_metrics() -> Response:
        return Response(render_metrics(runtime.recorder), media_type=CONTENT_TYPE)

    @router.get("/health", response_model=None)
    def health() -> JSONResponse:
        return JSONResponse(health_summary(runtime.recorder))

    return router
