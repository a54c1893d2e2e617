"""Pareto statistics for the study of the paper's experiments: fronts, hypervolume, intervals.

All objectives are maximised; callers negate the ones to minimise (Pop-KL). For the study
the objective vector of a run is (Hit@K, R-Hit@K, min-Hit@K, -Pop-KL@K) (``objective_vector``)
and the reference point is the pretrained model's vector, so a method's hypervolume is the
volume of the region its front improves on the pretrained model in every objective at once.

- ``non_dominated``: the indices of the non-dominated points (ties: equal points both kept).
- ``hypervolume``: exact, by recursive slicing (HSO, While et al. 2006): sort on the last
  objective, sum slab heights times the (d-1)-dimensional volume of the points above each
  slab. O(n^d) in the worst case, instant for the ~20 points x 4 objectives of the study.
  Points that do not exceed the reference in every objective contribute nothing.
- ``bootstrap_hypervolume``: the interval over seeds: resample the seeds with replacement
  (one seeded generator), average each setting's runs, take the front's hypervolume; the
  percentile interval of those, and the point estimate from the seed means. ``paired=True``
  draws one resample of seeds for all settings (a seed's runs stay together: the pairing
  of issue 23's study); the default draws each setting's seeds independently (issue 14's).
- ``paired_interval``: the mean of per-seed paired differences with a t-interval (n - 1
  degrees of freedom) and a percentile bootstrap over seeds, both keeping the pairing
  (each difference is one seed's two runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from morec_dist.config import Config
from morec_dist.coordinator.objectives import headline_metrics
from morec_dist.eval.metrics import TEST_METRICS, metric_key

# each objective's headline metric (its kind's first test metric), accuracy first, for the
# reference objectives; "-" marks one to minimise: ("hit", "r_hit", "min_hit", "-pop_kl")
STUDY_OBJECTIVES = tuple(
    ("-" if TEST_METRICS.get(m).lower_is_better else "") + m
    for m in headline_metrics([o.kind for o in Config().morec.objectives])
)


def objective_vector(metrics: Mapping[str, float], k: int = 10) -> np.ndarray:
    """The ``STUDY_OBJECTIVES`` at k of one run's metrics (Hit@k, R-Hit@k, min-Hit@k,
    -Pop-KL@k), all to maximise."""
    keys = [(metric_key(o.lstrip("-"), k), -1.0 if o.startswith("-") else 1.0) for o in STUDY_OBJECTIVES]
    missing = [key for key, _ in keys if key not in metrics]
    if missing:
        raise KeyError(f"objective_vector: metric {missing[0]!r} missing (have {sorted(metrics)})")
    return np.array([sign * metrics[key] for key, sign in keys], dtype=np.float64)


def _points(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"expected points of shape [n, d], got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("points must be finite")
    return p


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a is at least as good as b everywhere and better somewhere (maximisation)."""
    return bool((a >= b).all() and (a > b).any())


def non_dominated(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Indices (ascending) of the points no other point dominates."""
    p = _points(points)
    keep = [i for i in range(len(p)) if not any(dominates(p[j], p[i]) for j in range(len(p)) if j != i)]
    return np.asarray(keep, dtype=np.int64)


def _hso(points: np.ndarray, reference: np.ndarray) -> float:
    d = points.shape[1]
    if len(points) == 0:
        return 0.0
    if d == 1:
        return float(points[:, 0].max() - reference[0])
    order = np.argsort(-points[:, -1], kind="stable")
    p = points[order]
    volume = 0.0
    for i in range(len(p)):
        top = p[i, -1]
        bottom = p[i + 1, -1] if i + 1 < len(p) else reference[-1]
        if top > bottom:  # the slab (bottom, top] is covered by the points 0..i
            volume += (top - bottom) * _hso(p[: i + 1, :-1], reference[:-1])
    return volume


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]) -> float:
    """The volume of the union of the boxes [reference, p] (maximisation), exactly."""
    p = _points(points)
    r = np.asarray(reference, dtype=np.float64)
    if r.shape != (p.shape[1],) or not np.isfinite(r).all():
        raise ValueError(f"reference: expected {p.shape[1]} finite numbers, got {reference}")
    p = p[(p > r).all(axis=1)]  # the others add no volume
    if len(p) == 0:
        return 0.0
    return _hso(p[non_dominated(p)], r)


def hypervolume_inclusion_exclusion(
    points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]
) -> float:
    """The same volume by inclusion-exclusion over subsets (2^n terms): a cross-check for n <= 12."""
    p = _points(points)
    r = np.asarray(reference, dtype=np.float64)
    p = p[(p > r).all(axis=1)]
    n = len(p)
    if n > 16:
        raise ValueError(f"inclusion-exclusion: {n} points is too many (2^n terms); use hypervolume()")
    total = 0.0
    for mask in range(1, 1 << n):
        members = [i for i in range(n) if mask >> i & 1]
        corner = p[members].min(axis=0)  # the intersection of their boxes
        total += (-1) ** (len(members) + 1) * float(np.prod(corner - r))
    return total


def bootstrap_hypervolume(
    runs: Sequence[Sequence[Sequence[float]]] | np.ndarray,
    reference: Sequence[float],
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = False,
) -> dict[str, float]:
    """{"hypervolume", "low", "high"} for runs shaped [settings, seeds, objectives].

    The point estimate is the hypervolume of the settings' seed means; the interval is the
    percentile interval of the hypervolumes of ``samples`` bootstrap resamples of the seeds,
    drawn independently per setting from ``np.random.default_rng(seed)`` (``paired``: one
    draw of seeds shared by every setting).
    """
    x = np.asarray(runs, dtype=np.float64)
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"runs: expected shape [settings, seeds, objectives], got {x.shape}")
    if not 0 < level < 1 or samples < 1:
        raise ValueError(f"bootstrap: expected 0 < level < 1 and samples >= 1, got {level}, {samples}")
    settings, seeds, _ = x.shape
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for b in range(samples):
        picks = rng.integers(0, seeds, size=(1 if paired else settings, seeds)).repeat(settings if paired else 1, 0)
        means = np.take_along_axis(x, picks[:, :, None], axis=1).mean(axis=1)
        values[b] = hypervolume(means, reference)
    tail = (1.0 - level) / 2.0
    return {
        "hypervolume": hypervolume(x.mean(axis=1), reference),
        "low": float(np.quantile(values, tail)),
        "high": float(np.quantile(values, 1.0 - tail)),
        "samples": float(samples),
        "level": level,
    }


def paired_interval(
    differences: Sequence[float] | np.ndarray, *, level: float = 0.95, samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """{"mean", "t_low", "t_high", "boot_low", "boot_high", "n", "level"} of per-seed paired
    differences (one number per seed: method minus reference on the same seed).

    The t-interval is mean +- t_{n-1} x sd / sqrt(n); the bootstrap resamples the seeds (so
    each difference keeps its two runs together) from ``np.random.default_rng(seed)``. With
    one difference both intervals are NaN (no spread to estimate)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"paired_interval: expected a non-empty vector of finite differences, got {d}")
    if not 0 < level < 1:
        raise ValueError(f"paired_interval: expected 0 < level < 1, got {level}")
    n, mean = d.size, float(d.mean())
    out = {"mean": mean, "n": float(n), "level": level}
    if n < 2:
        return {
            **out,
            "t_low": float("nan"),
            "t_high": float("nan"),
            "boot_low": float("nan"),
            "boot_high": float("nan"),
        }
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1)) * float(d.std(ddof=1)) / np.sqrt(n)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return {
        **out,
        "t_low": mean - half,
        "t_high": mean + half,
        "boot_low": float(np.quantile(boot, tail)),
        "boot_high": float(np.quantile(boot, 1.0 - tail)),
    }
