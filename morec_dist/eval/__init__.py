"""The evaluation protocol of DATA.md: full-catalogue ranking with history masked, its
metrics, distributed over ranks by item range with results identical for any number of ranks."""

from morec_dist.eval.evaluator import EvalResult, evaluate, evaluate_most_popular
from morec_dist.eval.metrics import compute_metrics
from morec_dist.eval.ranking import EvalOptions, EvaluationInterrupted

__all__ = ["EvalOptions", "EvalResult", "EvaluationInterrupted", "compute_metrics", "evaluate", "evaluate_most_popular"]
