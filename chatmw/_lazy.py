"""Lazy re-exports for package ``__init__`` modules (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(namespace: dict[str, Any], exports: Mapping[str, str]) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that imports each name of ``exports`` on first use.

    ``exports`` maps a public name to the module that defines it. The value is stored in
    ``namespace`` (the package's ``globals()``), so later lookups skip the import. A package
    then costs nothing to import until one of its names is used, while
    ``from package import name`` works as with an eager import.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
