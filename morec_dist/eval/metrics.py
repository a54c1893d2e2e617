"""The test metrics, by name (``TEST_METRICS``), from the 1-based rank of each user's
held-out item: the ones of DATA.md and any a plugin registers.

Which metrics an evaluation reports is the objective kinds' to say: each kind of
``coordinator/objectives.py`` names its test metrics (``ObjectiveKind.test_metrics``, the
accuracy kind ``hit`` and ``ndcg``), as it names its signal, and the jobs evaluate the
metrics of the registered kinds. A metric is ``TestMetric(compute)``, ``compute(inputs, k)``
one number over the evaluated users; it is reported as ``"<name>@<k>"`` for every K.

Everything here is plain numpy in float64 over arrays given in a fixed order (users
sorted by id), so the same inputs give bit-identical numbers however they were computed.

- Hit@K = [r <= K]; NDCG@K = [r <= K] / log2(r + 1); averaged over users.
- R-Hit@K, R-NDCG@K: the same, times the held-out item's price.
- min-Hit@K, min-NDCG@K: the minimum over fairness groups of the group mean, users grouped
  by their held-out item's group; groups without any evaluated user are skipped.
- Pop-KL@K = KL(q* || q_rec): q_rec is the histogram of the popularity bands of all users'
  top-K items, with 1e-10 added to every bin before normalising; bins where q* is 0
  contribute 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from morec_dist.registry import Registry

POP_KL_SMOOTHING = 1e-10


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks <= k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = ranks.astype(np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def least_misery(per_user: np.ndarray, groups: np.ndarray) -> float:
    """The minimum over the groups present of the group mean of ``per_user``."""
    present = np.unique(groups)
    if present.size == 0:
        return float("nan")
    return float(min(per_user[groups == g].mean() for g in present))


def pop_kl(band_counts: np.ndarray, q_star: np.ndarray) -> float:
    """KL(q* || q_rec) with q_rec the smoothed, normalised band histogram (bands 1..G at
    positions 0..G-1)."""
    counts = np.asarray(band_counts, dtype=np.float64)
    q_star = np.asarray(q_star, dtype=np.float64)
    if counts.shape != q_star.shape:
        raise ValueError(f"pop_kl: {counts.size} band counts but q* has {q_star.size} bands")
    smoothed = counts + POP_KL_SMOOTHING
    q_rec = smoothed / smoothed.sum()
    support = q_star > 0
    return float(np.sum(q_star[support] * np.log(q_star[support] / q_rec[support])))


@dataclass(frozen=True)
class MetricInputs:
    """One evaluated split as every test metric sees it, users sorted by id."""

    ranks: np.ndarray  # [U] 1-based rank of each user's held-out item
    # item column name -> [U] that column's value of each user's held-out item (price in
    # float64, group ids in int64); the evaluator reads a column the first time it is asked
    heldout: Mapping[str, np.ndarray]
    band_counts: Mapping[int, np.ndarray]  # k -> the top-k items' popularity-band histogram
    q_star: np.ndarray  # the alignment target over popularity bands


@dataclass(frozen=True)
class TestMetric:
    """``compute(inputs, k)``: the metric at K; ``lower_is_better`` for the study's signs
    and plots (Pop-KL), ``label`` its name in figures."""

    compute: Callable[[MetricInputs, int], float]
    label: str
    lower_is_better: bool = False

    __test__ = False  # not a pytest class, whatever its name


TEST_METRICS: Registry[TestMetric] = Registry("test metric", "an objective kind's test_metrics")


def _hit(inputs: MetricInputs, k: int) -> np.ndarray:
    return hit_at_k(inputs.ranks, k)


def _ndcg(inputs: MetricInputs, k: int) -> np.ndarray:
    return ndcg_at_k(inputs.ranks, k)


TEST_METRICS.register("hit", TestMetric(lambda x, k: float(_hit(x, k).mean()), "Hit"))
TEST_METRICS.register("ndcg", TestMetric(lambda x, k: float(_ndcg(x, k).mean()), "NDCG"))
TEST_METRICS.register("r_hit", TestMetric(lambda x, k: float((_hit(x, k) * x.heldout["price"]).mean()), "R-Hit"))
TEST_METRICS.register("r_ndcg", TestMetric(lambda x, k: float((_ndcg(x, k) * x.heldout["price"]).mean()), "R-NDCG"))
TEST_METRICS.register("min_hit", TestMetric(lambda x, k: least_misery(_hit(x, k), x.heldout["fair_group"]), "min-Hit"))
TEST_METRICS.register(
    "min_ndcg", TestMetric(lambda x, k: least_misery(_ndcg(x, k), x.heldout["fair_group"]), "min-NDCG")
)
TEST_METRICS.register(
    "pop_kl", TestMetric(lambda x, k: pop_kl(x.band_counts[k], x.q_star), "Pop-KL", lower_is_better=True)
)


def metric_key(name: str, k: int) -> str:
    """How a metric at K is named in every record: ``"<name>@<k>"``."""
    return f"{name}@{k}"


# the metrics this module registers: the protocol of DATA.md (``compute_metrics``' default)
PROTOCOL_METRICS = tuple(TEST_METRICS.names())


def metric_values(inputs: MetricInputs, ks: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    """The metrics ``names`` (registered on ``TEST_METRICS``) at every K, and ``num_users``."""
    ranks = np.asarray(inputs.ranks)
    if ranks.size == 0:
        raise ValueError("metric_values: no users to evaluate")
    if (ranks < 1).any():
        raise ValueError("metric_values: ranks are 1-based; got a rank < 1")
    metrics = [(name, TEST_METRICS.get(name, "evaluation metrics")) for name in names]
    out: dict[str, float] = {"num_users": float(ranks.size)}
    for k in ks:
        for name, metric in metrics:
            out[metric_key(name, k)] = float(metric.compute(inputs, k))
    return out


def compute_metrics(
    ranks: np.ndarray,
    prices: np.ndarray,
    fair_groups: np.ndarray,
    band_counts: Mapping[int, np.ndarray],
    q_star: np.ndarray,
    ks: Sequence[int],
    names: Sequence[str] = PROTOCOL_METRICS,
) -> dict[str, float]:
    """DATA.md's metrics at every K from per-user arrays: ``ranks``, ``prices``, ``fair_groups``
    (the held-out item's price and group); ``band_counts[k]`` is the top-k band histogram."""
    heldout = {"price": np.asarray(prices), "fair_group": np.asarray(fair_groups)}
    return metric_values(MetricInputs(np.asarray(ranks), heldout, band_counts, q_star), ks, names)
