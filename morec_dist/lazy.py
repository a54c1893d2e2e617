"""A package's re-exports, imported on first use (PEP 562).

The CLI's launcher process imports ``morec_dist.coordinator.service``, ``eval.metrics`` and
the model registries to check a config; importing their packages must not load what only the
ranks need (torch, TorchRec, numba: seconds per process on this machine). A package lists
its re-exports as {name: module} and takes its ``__getattr__`` and ``__all__`` from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: each name of ``exports`` is read from its
    module when first asked for."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__, sorted(exports)
