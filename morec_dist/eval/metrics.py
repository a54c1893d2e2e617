"""The metrics of DATA.md, from the 1-based rank of each user's held-out item.

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

import numpy as np

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


def compute_metrics(
    ranks: np.ndarray,
    prices: np.ndarray,
    fair_groups: np.ndarray,
    band_counts: dict[int, np.ndarray],
    q_star: np.ndarray,
    ks: list[int],
) -> dict[str, float]:
    """All metrics at every K. ``ranks``, ``prices``, ``fair_groups`` are per user (the
    held-out item's price and group); ``band_counts[k]`` is the top-k band histogram."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("compute_metrics: no users to evaluate")
    if (ranks < 1).any():
        raise ValueError("compute_metrics: ranks are 1-based; got a rank < 1")
    out: dict[str, float] = {"num_users": float(ranks.size)}
    for k in ks:
        hit, ndcg = hit_at_k(ranks, k), ndcg_at_k(ranks, k)
        out[f"hit@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(ndcg.mean())
        out[f"r_hit@{k}"] = float((hit * prices).mean())
        out[f"r_ndcg@{k}"] = float((ndcg * prices).mean())
        out[f"min_hit@{k}"] = least_misery(hit, fair_groups)
        out[f"min_ndcg@{k}"] = least_misery(ndcg, fair_groups)
        out[f"pop_kl@{k}"] = pop_kl(band_counts[k], q_star)
    return out
