"""Metric definitions. Importing this package registers every metric in ``REGISTRY``."""

from chatmw.metrics import (  # noqa: F401
    attribution,
    business_hours,
    channels,
    conversion,
    cpa,
    dropoff,
    engagement,
    growth,
    heatmap,
    leads,
    ltv,
    query_types,
    resolution,
    response_time,
    retention,
    sentiment,
    summary,
    volume,
)
from chatmw.metrics.filters import FilterError, MetricFilter, parse_filter
from chatmw.metrics.registry import REGISTRY, MetricSpec, Param, register, render_json

__all__ = ["REGISTRY", "FilterError", "MetricFilter", "MetricSpec", "Param", "parse_filter",
           "register", "render_json"]
