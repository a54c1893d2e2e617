"""Sampled negatives for BPR-style losses: items drawn with probability ~ popularity ** alpha.

The distribution is over the catalogue (O(items) memory): ``alpha = 0`` is uniform over all
items, ``alpha = 1`` follows train popularity (``items.parquet`` ``popularity``). Item 0
(padding) is never drawn. Optionally a negative that equals its row's positive is redrawn
(a few rounds, vectorised), so the loss never compares an item with itself.

Draws use Walker's alias method (built once, O(items)): two uniforms and two lookups per
negative, whatever the catalogue size, because negatives outnumber positives ten to one and
a binary search per negative dominated batch assembly.
"""

from __future__ import annotations

import numpy as np

from morec_dist.data.dataset import PreparedDataset

REDRAW_ROUNDS = 8


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table for ``p`` (sums to 1): column i keeps i with probability accept[i],
    else gives alias[i]. Exact: each column carries mass 1/n, split between two outcomes."""
    n = len(p)
    scaled = (p * n).tolist()
    accept = [1.0] * n
    alias = list(range(n))
    small = [i for i, v in enumerate(scaled) if v < 1.0]
    large = [i for i, v in enumerate(scaled) if v >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    # leftovers are 1 up to rounding: they keep themselves (accept = 1)
    return np.asarray(accept, dtype=np.float64), np.asarray(alias, dtype=np.int64)


class NegativeSampler:
    """Draws ``[rows, num_negatives]`` item ids from ``popularity ** alpha`` (ids 1..num_items)."""

    def __init__(self, popularity_by_item: np.ndarray, alpha: float, *, exclude_positive: bool = True):
        """``popularity_by_item[i]`` is item i's train count; index 0 (padding) is ignored."""
        if alpha < 0 or not np.isfinite(alpha):
            raise ValueError(f"negative_alpha: expected a finite number >= 0, got {alpha}")
        popularity = np.asarray(popularity_by_item, dtype=np.float64)[1:]
        if popularity.size == 0 or (popularity < 0).any() or not np.isfinite(popularity).all():
            raise ValueError("negative sampler: popularity must be a non-empty array of finite counts >= 0")
        weights = np.power(popularity, alpha) if alpha > 0 else np.ones_like(popularity)
        total = weights.sum()
        if total <= 0:
            raise ValueError(f"negative sampler: popularity ** {alpha} is zero for every item; use alpha = 0")
        self.alpha = alpha
        self.exclude_positive = exclude_positive
        self.probabilities = weights / total  # by item_id - 1
        self.num_items = popularity.size
        self._accept, self._alias = alias_table(self.probabilities)

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset, alpha: float, *, exclude_positive: bool = True) -> NegativeSampler:
        return cls(dataset.item_column("popularity"), alpha, exclude_positive=exclude_positive)

    def _draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        column = rng.integers(0, self.num_items, size)
        keep = rng.random(size) < self._accept[column]
        return np.where(keep, column, self._alias[column]) + 1

    def sample(self, rng: np.random.Generator, positives: np.ndarray, num_negatives: int) -> np.ndarray:
        """Negatives for each positive: int64 ``[len(positives), num_negatives]``."""
        negatives = self._draw(rng, (len(positives), num_negatives))
        if self.exclude_positive and self.num_items > 1:
            for _ in range(REDRAW_ROUNDS):
                clash = negatives == np.asarray(positives)[:, None]
                count = int(clash.sum())
                if count == 0:
                    break
                negatives[clash] = self._draw(rng, count)
        return negatives
