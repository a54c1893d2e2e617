"""Distributed full-ranking evaluation (DATA.md): every user of the valid or test split
ranks the whole catalogue, with the user's history masked, and the metrics come from the
1-based rank of the held-out item.

Work split (eval/ranking.py): the catalogue, not the users, is cut into ``world_size``
contiguous item ranges. Every rank reads all held-out rows of the split, keeps the history
rows that fall in its range (streamed, test: train + valid; valid: train), scores all
users against its range in batches and keeps per-user counts and a local top-K; a merge
per batch gives every rank the ranks and top-K lists of a single process. The metrics are
then computed on every rank from the ranks in user-id order, so 1 rank and N ranks give
bit-identical numbers, and a rank's memory and scoring work are 1/N of the catalogue's.

Ranking rule (deterministic, ties included): items are ordered by (score descending,
item_id ascending). The held-out item's rank is 1 + the number of candidate items before
it in that order, and a user's top-K list is the first K candidates in that order, so
"Hit@K = 1" and "the held-out item is in the top-K list" always agree. Candidates are all
catalogue items except item 0 (padding) and the user's history items; the held-out item
itself is always a candidate, even if it also occurs in the history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from morec_dist.data import storage
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.eval.metrics import TEST_METRICS, MetricInputs, metric_values
from morec_dist.eval.ranking import (
    EvalOptions,
    RangeScorer,
    UserSet,
    as_recommender,
    band_counts,
    item_range,
    model_scorer,
    popularity_scorer,
    ranked_batches,
    stop_checker,
)

EVAL_SPLITS = ("valid", "test")
HISTORY_SPLITS = {"valid": ("train",), "test": ("train", "valid")}
READ_BATCH_ROWS = 1 << 20
__all__ = ["EvalOptions", "EvalResult", "ItemMeta", "as_recommender", "evaluate", "evaluate_most_popular", "load_users"]


@dataclass(frozen=True)
class ItemMeta:
    """Per-item columns indexed by item_id (index 0 = padding) and the alignment target."""

    price: np.ndarray
    fair_group: np.ndarray
    align_group: np.ndarray
    popularity: np.ndarray
    num_align_groups: int
    q_star: np.ndarray

    @classmethod
    def from_dataset(cls, data: PreparedDataset) -> ItemMeta:
        num_bands = data.num_groups("align_group")
        q_star = data.q_star
        if q_star.size != num_bands:
            raise ValueError(f"{data.path}/manifest.json: q_star has {q_star.size} bands, align_group has {num_bands}")
        return cls(
            price=data.item_column("price").astype(np.float64),
            fair_group=data.item_column("fair_group").astype(np.int64),
            align_group=data.item_column("align_group").astype(np.int64),
            popularity=data.item_column("popularity").astype(np.int64),
            num_align_groups=num_bands,
            q_star=q_star,
        )


class HeldoutColumns(Mapping[str, np.ndarray]):
    """Per user, an item column's value of the held-out item, read when a metric first asks
    (float columns in float64, the others in int64, as ``ItemMeta`` holds them)."""

    def __init__(self, data: PreparedDataset, targets: np.ndarray, meta: ItemMeta):
        self.data, self.targets = data, targets
        # the columns evaluation has already read, not read again
        self.known = {"price": meta.price, "fair_group": meta.fair_group, "align_group": meta.align_group}
        self.read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.read:
            column = self.known[name] if name in self.known else np.asarray(self.data.item_column(name))
            self.read[name] = column.astype(np.float64 if column.dtype.kind == "f" else np.int64)[self.targets]
        return self.read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.read)

    def __len__(self) -> int:
        return len(self.read)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    band_counts: dict[int, np.ndarray]  # k -> top-k items per popularity band (bands 1..G)
    user_ids: np.ndarray = field(repr=False)  # all evaluated users, sorted
    ranks: np.ndarray = field(repr=False)  # their held-out items' ranks


# ------------------------------------------------------------------------- data


def open_dataset(dataset: PreparedDataset | str | Path) -> PreparedDataset:
    if isinstance(dataset, PreparedDataset):
        return dataset
    return PreparedDataset.open(dataset, verify_checksums=False)


def heldout_rows(data: PreparedDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids) of a held-out split, sorted by user; one row per user."""
    table = data.read_split(split, columns=["user_id", "item_id"])
    users = table["user_id"].to_numpy().astype(np.int64)
    items = table["item_id"].to_numpy().astype(np.int64)
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    repeated = users[1:][users[1:] == users[:-1]]
    if repeated.size:
        raise ValueError(
            f"{data.path}/{split}: user {int(repeated[0])} has more than one held-out row; "
            "the protocol expects exactly one per user"
        )
    return users, items


def sample_rows(num_rows: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of ``size`` rows (all rows when size is 0 or
    not smaller); the same on every rank and for every call with the same seed."""
    if size <= 0 or size >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng([seed, 104729]).choice(num_rows, size, replace=False))


def history_csr(
    data: PreparedDataset, splits: tuple[str, ...], user_ids: np.ndarray, items: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stream ``splits`` and keep the rows of ``user_ids`` whose item lies in [lo, hi):
    (indptr, items), items in read order within a user."""
    lo, hi = items
    position = np.full(data.num_users + 1, -1, dtype=np.int64)
    position[user_ids] = np.arange(user_ids.size)
    rows: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    for split in splits:
        for path in data.split_files(split):
            for batch in storage.parquet_file(path).iter_batches(
                batch_size=READ_BATCH_ROWS, columns=["user_id", "item_id"]
            ):
                local = position[batch.column(0).to_numpy()]
                item = batch.column(1).to_numpy().astype(np.int64)
                keep = (local >= 0) & (item >= lo) & (item < hi)
                rows.append(local[keep])
                kept.append(item[keep])
    local_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    local_items = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    order = np.argsort(local_rows, kind="stable")
    indptr = np.zeros(user_ids.size + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(local_rows, minlength=user_ids.size))
    return indptr, local_items[order]


def load_users(data: PreparedDataset, split: str, ctx: DistContext, sample: int = 0, seed: int = 0) -> UserSet:
    """The split's users (or a seeded sample of ``sample`` of them), with the history that
    falls in this rank's item range."""
    users, targets = heldout_rows(data, split)
    keep = sample_rows(users.size, sample, seed)
    users, targets = users[keep], targets[keep]
    indptr, items = history_csr(data, HISTORY_SPLITS[split], users, item_range(data.num_items, ctx))
    return UserSet(users, targets, indptr, items)


# ------------------------------------------------------------------------ entry


def check_args(split: str, ks: list[int], num_items: int, ctx: DistContext) -> None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split {split!r}: expected one of {EVAL_SPLITS}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"eval.ks: expected positive integers, got {ks}")
    if not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"evaluation: rank {ctx.rank} outside world size {ctx.world_size}")
    if ctx.world_size > num_items + 1:
        raise ValueError(f"evaluation: {ctx.world_size} ranks for a catalogue of {num_items} items")


def run_protocol(
    make_scorer: Callable[[], RangeScorer],
    data: PreparedDataset,
    split: str,
    ks: list[int],
    ctx: DistContext,
    options: EvalOptions,
    metrics: Sequence[str] | None = None,
) -> EvalResult:
    check_args(split, ks, data.num_items, ctx)
    ks = sorted({int(k) for k in ks})
    meta = ItemMeta.from_dataset(data)
    users = load_users(data, split, ctx)
    bands = torch.from_numpy(meta.align_group).to(ctx.device)
    counts = {k: torch.zeros(meta.num_align_groups, dtype=torch.int64, device=ctx.device) for k in ks}
    ranks = np.zeros(len(users), dtype=np.int64)
    for batch in ranked_batches(make_scorer(), users, data.num_items, ks[-1], ctx, options):
        ranks[batch.start : batch.stop] = batch.ranks.cpu().numpy()
        for k in ks:
            counts[k] += band_counts(batch.top_items, k, bands, meta.num_align_groups)
    histograms = {k: counts[k].cpu().numpy() for k in ks}
    inputs = MetricInputs(ranks, HeldoutColumns(data, users.targets, meta), histograms, meta.q_star)
    values = metric_values(inputs, ks, TEST_METRICS.names() if metrics is None else metrics)
    return EvalResult(values, histograms, users.user_ids, ranks)


def evaluate(
    model: nn.Module,
    dataset: PreparedDataset | str | Path,
    split: str,
    ks: list[int],
    features: FeatureBuilder,
    ctx: DistContext,
    options: EvalOptions | None = None,
    metrics: Sequence[str] | None = None,
) -> EvalResult:
    """Evaluate a model (plain, or sharded with DMP: then every rank must call this, with
    the same options) on ``split``; every rank returns the same result. ``metrics``: the
    ``TEST_METRICS`` names to report (the jobs pass their objective kinds'; default all)."""
    from morec_dist.model.sharding import unwrap

    options = options or EvalOptions()
    data = open_dataset(dataset)
    module = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        return run_protocol(
            lambda: model_scorer(module, features, ctx, stop_checker(ctx, options)),
            data,
            split,
            ks,
            ctx,
            options,
            metrics,
        )
    finally:
        model.train(was_training)


def evaluate_most_popular(
    dataset: PreparedDataset | str | Path,
    split: str,
    ks: list[int],
    ctx: DistContext | None = None,
    options: EvalOptions | None = None,
    metrics: Sequence[str] | None = None,
) -> EvalResult:
    """The most-popular baseline (score = train popularity), under the same protocol."""
    ctx = ctx or DistContext.single()
    data = open_dataset(dataset)
    popularity = ItemMeta.from_dataset(data).popularity
    return run_protocol(
        lambda: popularity_scorer(popularity, ctx), data, split, ks, ctx, options or EvalOptions(), metrics
    )
