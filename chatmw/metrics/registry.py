"""The catalogue of metrics that the API and the CLI both serve.

Each metric registers a :class:`MetricSpec`; ``GET {prefix}/{name}`` and
``chatmw metrics NAME`` are built from it, so they take the same parameters and return
the same JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from chatmw.metrics.filters import FilterError, MetricFilter

__all__ = ["Param", "MetricSpec", "REGISTRY", "register", "render_json", "parse_options"]

Compute = Callable[[Engine, MetricFilter, Mapping[str, Any]], dict[str, Any]]
Rows = Callable[[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Param:
    """An extra parameter of one metric (beyond the common filter)."""

    name: str
    help: str
    default: Any = None
    choices: Sequence[str] = ()
    kind: type = str

    def parse(self, values: Sequence[str]) -> Any:
        present = [value for value in values if value != ""]
        if len(present) > 1:
            raise FilterError(self.name, "given more than once")
        if not present:
            return self.default
        value = present[0]
        if self.choices and value not in self.choices:
            raise FilterError(
                self.name, f"expected one of {', '.join(self.choices)}, got {value!r}"
            )
        if self.kind is int:
            try:
                return int(value)
            except ValueError:
                raise FilterError(self.name, f"expected an integer, got {value!r}") from None
        if self.kind is float:
            try:
                number = float(value)
            except ValueError:
                raise FilterError(self.name, f"expected a number, got {value!r}") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise FilterError(self.name, f"expected a finite number, got {value!r}")
            return number
        return value


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its name, description, extra parameters and how to compute it.

    ``rows`` flattens a result into table rows for ``format=csv``; metrics without it are
    not tabular.
    """

    name: str
    summary: str
    description: str
    compute: Compute
    params: Sequence[Param] = field(default_factory=tuple)
    rows: Rows | None = None


REGISTRY: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the catalogue; a second metric of the same name is an error."""
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise ValueError(f"metric {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def parse_options(spec: MetricSpec, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Parse the metric's own parameters from ``params``."""
    return {param.name: param.parse(params.get(param.name, ())) for param in spec.params}


def render_json(result: Mapping[str, Any]) -> bytes:
    """Serialise a metric result; the API and the CLI both emit exactly these bytes."""
    return json.dumps(result, ensure_ascii=False, indent=2, allow_nan=False).encode()
