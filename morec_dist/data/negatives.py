"""Sampled negatives for BPR-style losses: items drawn with probability ~ popularity ** alpha.

The distribution is over the catalogue (O(items) memory): ``alpha = 0`` is uniform over all
items, ``alpha = 1`` follows train popularity (``items.parquet`` ``popularity``). Item 0
(padding) is never drawn. Optionally a negative that equals its row's positive is redrawn
(a few rounds, vectorised), so the loss never compares an item with itself.

With a ``UserHistory`` (the authors' setup, microsoft/UniRec: negatives exclude the user's
train + valid history) a negative in its row's user's history is redrawn instead: vectorised
rejection rounds, then an exact draw from the restricted distribution for the few rows still
clashing, so every negative is outside the history and the marginal is exactly
``popularity ** alpha`` restricted to the user's non-history items, renormalised.

Draws use Walker's alias method (built once, O(items), a compiled loop over arrays:
``kernels.alias_table``): two uniforms and two lookups per
negative, whatever the catalogue size, because negatives outnumber positives ten to one and
a binary search per negative dominated batch assembly.
"""

from __future__ import annotations

import numpy as np

from morec_dist.data import storage
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.kernels import alias_table

REDRAW_ROUNDS = 8
HISTORY_SPLITS = ("train", "valid")  # what the authors exclude: every interaction before test
READ_BATCH_ROWS = 1 << 20


class UserHistory:
    """Each user's items as a CSR (indptr by user_id, item ids sorted within a user).

    Memory: 4 bytes per interaction (int32 items) + 8 per user, steady; building streams the
    splits in batches of ``READ_BATCH_ROWS`` and sorts once through a transient int64 key
    (8 more bytes per interaction). ML-1M: about 4 MB.
    """

    def __init__(self, indptr: np.ndarray, items: np.ndarray, num_items: int):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int32)
        self.num_items = num_items
        if self.indptr[0] != 0 or self.indptr[-1] != len(self.items) or (np.diff(self.indptr) < 0).any():
            raise ValueError("user history: indptr must start at 0, be non-decreasing and end at len(items)")

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> UserHistory:
        users = np.asarray(users, dtype=np.int64)
        keys = users * (num_items + 1) + np.asarray(items, dtype=np.int64)
        keys.sort()
        indptr = np.zeros(num_users + 2, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(users, minlength=num_users + 1))
        return cls(indptr, (keys % (num_items + 1)).astype(np.int32), num_items)

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset, splits: tuple[str, ...] = HISTORY_SPLITS) -> UserHistory:
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        for split in splits:
            for path in dataset.split_files(split):
                for batch in storage.parquet_file(path).iter_batches(
                    batch_size=READ_BATCH_ROWS, columns=["user_id", "item_id"]
                ):
                    users.append(batch.column(0).to_numpy().astype(np.int32))
                    items.append(batch.column(1).to_numpy().astype(np.int32))
        empty = np.zeros(0, np.int32)
        return cls.from_pairs(
            np.concatenate(users) if users else empty,
            np.concatenate(items) if items else empty,
            dataset.num_users,
            dataset.num_items,
        )

    def user_items(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Element-wise: is items[i] in users[i]'s history? (vectorised binary search)."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items)
        if users.shape != items.shape:
            raise ValueError(f"history lookup: users {users.shape} and items {items.shape} differ in shape")
        if users.size and (users.min() < 0 or users.max() >= len(self.indptr) - 1):
            raise ValueError(f"history lookup: user ids must lie in 0..{len(self.indptr) - 2}")
        lo, hi = self.indptr[users].copy(), self.indptr[users + 1].copy()
        while True:  # the first position in [lo, hi) whose item >= the query
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) // 2
            below = np.zeros(users.shape, dtype=bool)
            below[open_] = self.items[mid[open_]] < items[open_]
            lo = np.where(open_ & below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)
        found = lo < self.indptr[users + 1]
        found[found] = self.items[lo[found]] == items[found]
        return found


class NegativeSampler:
    """Draws ``[rows, num_negatives]`` item ids from ``popularity ** alpha`` (ids 1..num_items)."""

    def __init__(
        self,
        popularity_by_item: np.ndarray,
        alpha: float,
        *,
        exclude_positive: bool = True,
        history: UserHistory | None = None,
    ):
        """``popularity_by_item[i]`` is item i's train count; index 0 (padding) is ignored.

        ``history``: negatives avoid their row's user's history (``sample(..., users=...)``)."""
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
        self.history = history
        self.probabilities = weights / total  # by item_id - 1
        self.num_items = popularity.size
        self._accept, self._alias = alias_table(self.probabilities)

    @classmethod
    def from_dataset(
        cls,
        dataset: PreparedDataset,
        alpha: float,
        *,
        exclude_positive: bool = True,
        exclude_history: bool = False,
        history_splits: tuple[str, ...] = HISTORY_SPLITS,
    ) -> NegativeSampler:
        history = UserHistory.from_dataset(dataset, history_splits) if exclude_history else None
        return cls(dataset.item_column("popularity"), alpha, exclude_positive=exclude_positive, history=history)

    def _draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        column = rng.integers(0, self.num_items, size)
        keep = rng.random(size) < self._accept[column]
        return np.where(keep, column, self._alias[column]) + 1

    def sample(
        self,
        rng: np.random.Generator,
        positives: np.ndarray,
        num_negatives: int,
        users: np.ndarray | None = None,
    ) -> np.ndarray:
        """Negatives for each positive: int64 ``[len(positives), num_negatives]``.

        With a history, ``users`` (one per positive) is required and no negative is in its
        user's history (the positive, a train item, is then excluded too)."""
        negatives = self._draw(rng, (len(positives), num_negatives))
        if self.history is not None:
            if users is None or len(users) != len(positives):
                raise ValueError("negative sampler: excluding history needs users, one per positive")
            return self._outside_history(rng, negatives, np.asarray(users, dtype=np.int64), self.history)
        if self.exclude_positive and self.num_items > 1:
            for _ in range(REDRAW_ROUNDS):
                clash = negatives == np.asarray(positives)[:, None]
                count = int(clash.sum())
                if count == 0:
                    break
                negatives[clash] = self._draw(rng, count)
        return negatives

    def _outside_history(
        self, rng: np.random.Generator, negatives: np.ndarray, users: np.ndarray, history: UserHistory
    ) -> np.ndarray:
        row_users = np.broadcast_to(users[:, None], negatives.shape)
        clash = history.contains(row_users, negatives)
        for _ in range(REDRAW_ROUNDS):
            count = int(clash.sum())
            if count == 0:
                return negatives
            negatives[clash] = self._draw(rng, count)
            clash[clash] = history.contains(row_users[clash], negatives[clash])
        # the rows still clashing (users whose history holds most of the mass): exact draws
        for row, col in zip(*np.nonzero(clash), strict=True):
            negatives[row, col] = self._draw_outside(rng, int(users[row]), history)
        return negatives

    def _draw_outside(self, rng: np.random.Generator, user: int, history: UserHistory) -> int:
        p = self.probabilities.copy()
        p[history.user_items(user) - 1] = 0.0
        total = p.sum()
        if total <= 0:
            raise ValueError(
                f"negative sampler: user {user}'s history covers every item with popularity ** "
                f"{self.alpha} > 0; no negative exists (use alpha = 0 or keep history in the negatives)"
            )
        return int(rng.choice(self.num_items, p=p / total)) + 1
