"""The evaluation protocol of DATA.md: full-catalogue ranking with history masked, its
metrics, distributed over ranks by item range with results identical for any number of ranks."""

# Loaded on first use (PEP 562): the registries of eval/metrics.py are read by the CLI's
# launcher process, which must not pay for the evaluator's torch, TorchRec and numba.
import importlib
from typing import Any

_EXPORTS = {
    "EvalOptions": "morec_dist.eval.ranking",
    "EvalResult": "morec_dist.eval.evaluator",
    "EvaluationInterrupted": "morec_dist.eval.ranking",
    "compute_metrics": "morec_dist.eval.metrics",
    "evaluate": "morec_dist.eval.evaluator",
    "evaluate_most_popular": "morec_dist.eval.evaluator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
