"""The middle level of MoRec: per-objective group distributions and their sign-gradient update.

Each auxiliary objective k holds a distribution p_k over the groups of its group column;
the reader draws block k by picking group g with probability p_k[g] and then a training row
whose positive item is in g. The update is exactly MOREC.md's::

    p_k <- normalise(max(0, p_k + alpha * s_k)),   s_k in {-1, 0, +1}^G

(clip negatives, then divide by the sum). If the step would zero every group (possible only
for a user objective whose signal is -1 everywhere), p_k is left unchanged: an all-zero
distribution cannot be sampled from.

This module also owns the dataset statistics the initial distributions come from
(``GroupStats``): per group column the number of groups and the training shares (from the
manifest's ``groups[col].train_counts``), and, for revenue, two price statistics computed
once from the files and cached:

- ``item_mean_price(col)``: mean ``price`` over the *catalogue items* of each group
  (items.parquet), the reference's "band mean price";
- ``train_price_sum(col)``: sum of ``price`` over the *training rows* of each group
  (streamed over the train parts, bounded memory). Drawing band g with probability
  S_g / S and then a row inside the band with probability price / S_g draws every training
  row with probability exactly price / S: the exact price-weighted option.

Group ids in the data are 1-based; every vector here is 0-based (index g - 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from morec_dist.data import schema, storage
from morec_dist.data.storage import StoragePath

if TYPE_CHECKING:  # the dataset handle is for annotations only: the coordinator reads no data
    from morec_dist.data.dataset import PreparedDataset


class SamplerError(ValueError):
    """A distribution, a sign vector or a statistic is malformed."""


def normalise(values: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise SamplerError(f"{where}: expected a non-empty vector, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise SamplerError(f"{where}: expected finite non-negative values, got {values.tolist()}")
    total = float(values.sum())
    if total <= 0:
        raise SamplerError(f"{where}: values sum to 0; cannot form a distribution")
    return values / total


def sign_gradient_step(p: np.ndarray, s: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(max(0, p + alpha * s)); p unchanged if that would zero every group."""
    p = np.asarray(p, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if s.shape != p.shape:
        raise SamplerError(f"sign vector has {s.shape} entries, distribution {p.shape}")
    if not np.all(np.isin(s, (-1.0, 0.0, 1.0))):
        raise SamplerError(f"sign vector must hold only -1, 0, +1, got {s.tolist()}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise SamplerError(f"sampler alpha must be finite and > 0, got {alpha}")
    stepped = np.maximum(0.0, p + alpha * s)
    total = float(stepped.sum())
    if total <= 0:
        return p.copy()
    return stepped / total


# ------------------------------------------------------------------------ statistics


def item_mean_price(data_dir: StoragePath, column: str, num_groups: int) -> np.ndarray:
    """Mean catalogue-item price of each group of ``column`` (0-based vector, length G)."""
    path = storage.location(data_dir) / schema.ITEMS_FILE
    table = storage.read_table(path, columns=["price", column])
    groups = table[column].to_numpy().astype(np.int64)
    prices = table["price"].to_numpy().astype(np.float64)
    _check_group_ids(groups, num_groups, f"{path}:{column}")
    sums = np.bincount(groups - 1, weights=prices, minlength=num_groups)
    counts = np.bincount(groups - 1, minlength=num_groups)
    if np.any(counts == 0):
        empty = (np.flatnonzero(counts == 0) + 1).tolist()
        raise SamplerError(f"{path}:{column}: groups {empty} have no items; a mean price is undefined")
    return sums / counts


def train_price_sum(files: list[StoragePath], column: str, num_groups: int) -> np.ndarray:
    """Sum of ``price`` over the training rows of each group, streamed file by file."""
    sums = np.zeros(num_groups, dtype=np.float64)
    for path in files:
        parquet = storage.parquet_file(path)
        for batch in parquet.iter_batches(
            columns=["price", column], batch_size=schema.ROW_GROUP_ROWS, use_threads=False
        ):
            groups = batch.column(column).to_numpy().astype(np.int64)
            _check_group_ids(groups, num_groups, f"{path}:{column}")
            sums += np.bincount(groups - 1, weights=batch.column("price").to_numpy(), minlength=num_groups)
    return sums


def _check_group_ids(groups: np.ndarray, num_groups: int, where: str) -> None:
    if groups.size and (groups.min() < 1 or groups.max() > num_groups):
        raise SamplerError(f"{where}: group ids must lie in 1..{num_groups}, found {groups.min()}..{groups.max()}")


@dataclass
class GroupStats:
    """Per group column: group counts and training counts, plus lazily computed price stats.

    Built from a prepared dataset (``from_dataset``) or given explicitly (tests, custom
    data). Picklable, so it travels to the Ray actor with the objectives.
    """

    num_groups: dict[str, int]
    train_counts: dict[str, np.ndarray]
    data_dir: StoragePath | None = None
    train_files: list[StoragePath] = field(default_factory=list)
    mean_prices: dict[str, np.ndarray] = field(default_factory=dict)
    price_sums: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], data_dir: StoragePath | None = None) -> GroupStats:
        groups = manifest.get("groups")
        if not isinstance(groups, Mapping) or not groups:
            raise SamplerError("manifest: 'groups' missing or empty; expected {column: {num_groups, train_counts}}")
        num_groups: dict[str, int] = {}
        train_counts: dict[str, np.ndarray] = {}
        for column, info in groups.items():
            g = int(info["num_groups"])
            counts = np.asarray(info["train_counts"], dtype=np.float64)
            if counts.shape != (g,):
                raise SamplerError(f"manifest: groups.{column}.train_counts has {counts.size} entries, expected {g}")
            num_groups[column] = g
            train_counts[column] = counts
        root = storage.location(data_dir) if data_dir is not None else None
        files = [root / rel for rel in manifest["splits"]["train"]["files"]] if root is not None else []
        return cls(num_groups, train_counts, root, files)

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset) -> GroupStats:
        """From a prepared dataset's manifest."""
        return cls.from_manifest(dataset.manifest, dataset.path)

    def require_column(self, column: str, where: str) -> int:
        if column not in self.num_groups:
            raise SamplerError(f"{where}: group column {column!r} not in the dataset; have {sorted(self.num_groups)}")
        return self.num_groups[column]

    def train_share(self, column: str) -> np.ndarray:
        return normalise(self.train_counts[column], f"train_counts of {column}")

    def item_mean_price(self, column: str) -> np.ndarray:
        if column not in self.mean_prices:
            self.mean_prices[column] = item_mean_price(self._need_dir(column), column, self.num_groups[column])
        return self.mean_prices[column]

    def train_price_sum(self, column: str) -> np.ndarray:
        if column not in self.price_sums:
            self._need_dir(column)
            self.price_sums[column] = train_price_sum(self.train_files, column, self.num_groups[column])
        return self.price_sums[column]

    def _need_dir(self, column: str) -> StoragePath:
        if self.data_dir is None:
            raise SamplerError(
                f"price statistics of {column!r} need the dataset directory (GroupStats.data_dir is unset)"
            )
        return self.data_dir


# --------------------------------------------------------------------------- state


class SamplerState:
    """The current p_k of every auxiliary objective and the version counter."""

    def __init__(self, initial: Mapping[str, np.ndarray], alphas: Mapping[str, float]) -> None:
        if set(initial) != set(alphas):
            raise SamplerError(f"sampler: distributions for {sorted(initial)} but step sizes for {sorted(alphas)}")
        self.order = list(initial)
        self.probabilities = {k: normalise(v, f"initial p of {k}") for k, v in initial.items()}
        self.alphas = dict(alphas)
        self.version = 0

    def step(self, signs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply one sign-gradient step to every objective named in ``signs``; bump the version."""
        unknown = sorted(set(signs) - set(self.probabilities))
        if unknown:
            raise SamplerError(f"sampler: signs for unknown objectives {unknown}; have {self.order}")
        for name, s in signs.items():
            try:
                self.probabilities[name] = sign_gradient_step(self.probabilities[name], s, self.alphas[name])
            except SamplerError as exc:
                raise SamplerError(f"objective {name!r}: {exc}") from None
        self.version += 1
        return self.snapshot()

    def snapshot(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.probabilities.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "probabilities": {k: v.tolist() for k, v in self.probabilities.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        probs = state["probabilities"]
        if set(probs) != set(self.probabilities):
            raise SamplerError(f"sampler state: objectives {sorted(probs)} != configured {self.order}")
        for k, v in probs.items():
            arr = np.asarray(v, dtype=np.float64)
            if arr.shape != self.probabilities[k].shape:
                raise SamplerError(f"sampler state: {k} has {arr.size} groups, configured {self.probabilities[k].size}")
            self.probabilities[k] = arr
        self.version = int(state["version"])
