"""The evaluation protocol of DATA.md: full-catalogue ranking with history masked, its
metrics, distributed over ranks by item range with results identical for any number of ranks."""

from morec_dist.lazy import lazy_exports

_EXPORTS = {
    "EvalOptions": "morec_dist.eval.ranking",
    "EvalResult": "morec_dist.eval.evaluator",
    "EvaluationInterrupted": "morec_dist.eval.ranking",
    "compute_metrics": "morec_dist.eval.metrics",
    "evaluate": "morec_dist.eval.evaluator",
    "evaluate_most_popular": "morec_dist.eval.evaluator",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)  # loaded on first use: see morec_dist/lazy.py
