"""Distributed full-ranking evaluation (DATA.md): every user of the valid or test split
ranks the whole catalogue, with the user's history masked, and the metrics come from the
1-based rank of the held-out item.

Work split: the split's users, sorted by id, are cut into ``world_size`` contiguous
slices; a rank reads only its slice's held-out rows and builds its slice's history as a
CSR by streaming the history splits (test: train + valid; valid: train). Users are scored
in batches (catalogue x batch scores at a time). Per-user ranks are all-gathered and the
metrics computed on every rank from the ranks in user-id order, and the top-K band
histograms are integer all-reduces, so 1 rank and N ranks give bit-identical numbers.

Ranking rule (deterministic, ties included): items are ordered by (score descending,
item_id ascending). The held-out item's rank is 1 + the number of candidate items before
it in that order, and a user's top-K list is the first K candidates in that order, so
"Hit@K = 1" and "the held-out item is in the top-K list" always agree. Candidates are all
catalogue items except item 0 (padding) and the user's history items; the held-out item
itself is always a candidate, even if it also occurs in the history.

A sharded model's lookups are collectives: every rank runs the same number of equally
sized batches (short slices are padded with user 0, whose results are dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.eval.metrics import compute_metrics

EVAL_SPLITS = ("valid", "test")
HISTORY_SPLITS = {"valid": ("train",), "test": ("train", "valid")}
# A batch never holds more than this many scores (batch_users is lowered to fit), so that
# huge catalogues stay within memory.
MAX_SCORES_PER_BATCH = 1 << 26
ITEM_CHUNK = 1 << 16
READ_BATCH_ROWS = 1 << 20
CPU = torch.device("cpu")  # the default device of the baselines (a device is immutable)

Scorer = Callable[[np.ndarray], torch.Tensor]  # user ids [B] -> scores [B, num_items + 1]


class Recommender(Protocol):
    """What evaluation needs of a model (every model of model/registry.py has it). A model is
    typed nn.Module elsewhere, whose __getattr__ hides these methods from the type checker,
    so ``as_recommender`` states it once."""

    def user_vectors(self, user_kjt: Any) -> torch.Tensor: ...

    def item_vectors(self, item_kjt: Any) -> torch.Tensor: ...


def as_recommender(model: nn.Module) -> Recommender:
    return cast(Recommender, model)


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


@dataclass
class UserSlice:
    """One rank's users: ids (sorted), held-out items, and history as a CSR."""

    user_ids: np.ndarray
    targets: np.ndarray
    history_indptr: np.ndarray
    history_items: np.ndarray

    def __len__(self) -> int:
        return int(self.user_ids.size)


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


def slice_bounds(num_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced slice of [0, num_users) for ``rank`` (numpy.array_split)."""
    base, extra = divmod(num_users, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def history_csr(data: PreparedDataset, splits: tuple[str, ...], user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stream ``splits`` and keep the rows of ``user_ids`` only: (indptr, items)."""
    position = np.full(data.num_users + 1, -1, dtype=np.int64)
    position[user_ids] = np.arange(user_ids.size)
    rows: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for split in splits:
        for path in data.split_files(split):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=["user_id", "item_id"]):
                local = position[batch.column(0).to_numpy()]
                keep = local >= 0
                rows.append(local[keep])
                items.append(batch.column(1).to_numpy()[keep].astype(np.int64))
    local_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    local_items = np.concatenate(items) if items else np.zeros(0, np.int64)
    order = np.argsort(local_rows, kind="stable")
    indptr = np.zeros(user_ids.size + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(local_rows, minlength=user_ids.size))
    return indptr, local_items[order]


def load_user_slice(data: PreparedDataset, split: str, rank: int, world_size: int) -> UserSlice:
    users, targets = heldout_rows(data, split)
    start, stop = slice_bounds(users.size, rank, world_size)
    mine, my_targets = users[start:stop], targets[start:stop]
    indptr, items = history_csr(data, HISTORY_SPLITS[split], mine)
    return UserSlice(mine, my_targets, indptr, items)


# ---------------------------------------------------------------------- scoring


def effective_batch_users(batch_users: int, num_items: int) -> int:
    return max(1, min(batch_users, MAX_SCORES_PER_BATCH // (num_items + 1)))


@torch.no_grad()
def catalogue_vectors(model: nn.Module, features: FeatureBuilder, device: torch.device) -> torch.Tensor:
    """Item vectors of items 0..num_items (row 0 is padding), in fixed chunks (every rank
    makes the same calls, as sharded lookups require)."""
    ids = np.arange(features.num_items + 1, dtype=np.int64)
    parts = [
        as_recommender(model).item_vectors(features.item_kjt(ids[s : s + ITEM_CHUNK]).to(device))
        for s in range(0, ids.size, ITEM_CHUNK)
    ]
    return torch.cat(parts)


def model_scorer(model: nn.Module, features: FeatureBuilder, device: torch.device) -> Scorer:
    items_t = catalogue_vectors(model, features, device).t().contiguous()

    @torch.no_grad()
    def score(user_ids: np.ndarray) -> torch.Tensor:
        users = as_recommender(model).user_vectors(features.user_kjt(user_ids).to(device))
        return users @ items_t

    return score


def popularity_scorer(meta: ItemMeta, device: torch.device) -> Scorer:
    popularity = torch.from_numpy(meta.popularity.astype(np.float64)).to(device)

    def score(user_ids: np.ndarray) -> torch.Tensor:
        return popularity.unsqueeze(0).expand(len(user_ids), -1)

    return score


# ---------------------------------------------------------------------- ranking


def candidate_mask(
    num_rows: int, num_columns: int, targets: torch.Tensor, hist_rows: torch.Tensor, hist_items: torch.Tensor
) -> torch.Tensor:
    mask = torch.ones(num_rows, num_columns, dtype=torch.bool, device=targets.device)
    mask[:, 0] = False
    mask[hist_rows, hist_items] = False
    mask[torch.arange(num_rows, device=targets.device), targets] = True
    return mask


def heldout_ranks(scores: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 + the candidates before the target in (score desc, item_id asc) order."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    item_ids = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    before = (scores > target_scores) | ((scores == target_scores) & (item_ids < targets.unsqueeze(1)))
    return 1 + (before & candidates).sum(dim=1)


def topk_band_counts(
    scores: torch.Tensor, candidates: torch.Tensor, k: int, bands: torch.Tensor, num_bands: int
) -> torch.Tensor:
    """Band histogram (bands 1..G at 0..G-1) of every row's top-k candidates, ties by item id."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    threshold = masked.topk(min(k, masked.shape[1]), dim=1).values[:, -1:]
    above = masked > threshold
    room = k - above.sum(dim=1, keepdim=True)
    at_threshold = (masked == threshold) & candidates
    chosen = above | (at_threshold & (at_threshold.cumsum(dim=1) <= room))
    picked = bands.unsqueeze(0).expand_as(chosen)[chosen]
    return torch.bincount(picked, minlength=num_bands + 1)[1:]


def scored_batches(
    scorer: Scorer, users: UserSlice, num_columns: int, batch_users: int, num_batches: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This slice's users in batches of ``batch_users``: (start, stop, full-catalogue scores,
    held-out items, candidate mask with history masked) for each batch with real users.

    Every rank makes exactly ``num_batches`` scorer calls (padding with user 0 past its
    slice), as sharded lookups are collectives."""
    for b in range(num_batches):
        start, stop = min(b * batch_users, len(users)), min((b + 1) * batch_users, len(users))
        real = stop - start
        user_ids = np.zeros(batch_users, dtype=np.int64)
        user_ids[:real] = users.user_ids[start:stop]
        scores = scorer(user_ids)[:real]
        if real == 0:
            continue
        if torch.isnan(scores).any():
            raise FloatingPointError("evaluation: the model produced NaN scores")
        lo, hi = users.history_indptr[start], users.history_indptr[stop]
        hist_rows = torch.from_numpy(np.repeat(np.arange(real), np.diff(users.history_indptr[start : stop + 1])))
        hist_items = torch.from_numpy(users.history_items[lo:hi])
        targets = torch.from_numpy(users.targets[start:stop]).to(device)
        candidates = candidate_mask(real, num_columns, targets, hist_rows.to(device), hist_items.to(device))
        yield start, stop, scores, targets, candidates


def rank_users(
    scorer: Scorer,
    users: UserSlice,
    meta: ItemMeta,
    ks: list[int],
    batch_users: int,
    num_batches: int,
    device: torch.device,
) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Ranks of this slice's held-out items and the slice's top-k band counts."""
    num_columns = meta.align_group.size
    bands = torch.from_numpy(meta.align_group).to(device)
    counts = {k: torch.zeros(meta.num_align_groups, dtype=torch.int64, device=device) for k in ks}
    ranks = np.zeros(len(users), dtype=np.int64)
    for start, stop, scores, targets, candidates in scored_batches(
        scorer, users, num_columns, batch_users, num_batches, device
    ):
        ranks[start:stop] = heldout_ranks(scores, candidates, targets).cpu().numpy()
        for k in ks:
            counts[k] += topk_band_counts(scores, candidates, k, bands, meta.num_align_groups)
    return ranks, counts


# -------------------------------------------------------------------- reduction


def collective(world_size: int) -> bool:
    return world_size > 1 and dist.is_initialized()


def max_over_ranks(value: int, world_size: int, device: torch.device) -> int:
    if not collective(world_size):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_concat(local: np.ndarray, world_size: int, device: torch.device) -> np.ndarray:
    """All ranks' int64 arrays, concatenated in rank order."""
    if not collective(world_size):
        return local
    size = torch.tensor([local.size], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: local.size] = torch.from_numpy(local).to(device)
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[: int(s.item())].cpu().numpy() for p, s in zip(parts, sizes, strict=True)])


def sum_over_ranks(t: torch.Tensor, world_size: int) -> np.ndarray:
    if collective(world_size):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


# ------------------------------------------------------------------------ entry


def check_args(split: str, ks: list[int], rank: int, world_size: int) -> None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split {split!r}: expected one of {EVAL_SPLITS}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"eval.ks: expected positive integers, got {ks}")
    if not 0 <= rank < world_size:
        raise ValueError(f"evaluation: rank {rank} outside world size {world_size}")


def run_protocol(
    make_scorer: Callable[[], Scorer],
    data: PreparedDataset,
    split: str,
    ks: list[int],
    rank: int,
    world_size: int,
    device: torch.device,
    batch_users: int,
) -> EvalResult:
    check_args(split, ks, rank, world_size)
    ks = sorted({int(k) for k in ks})
    meta = ItemMeta.from_dataset(data)
    users = load_user_slice(data, split, rank, world_size)
    batch = effective_batch_users(batch_users, data.num_items)
    num_batches = max_over_ranks(-(-len(users) // batch), world_size, device)
    ranks, counts = rank_users(make_scorer(), users, meta, ks, batch, num_batches, device)

    all_users = gather_concat(users.user_ids, world_size, device)
    all_ranks = gather_concat(ranks, world_size, device)
    all_targets = gather_concat(users.targets, world_size, device)
    order = np.argsort(all_users, kind="stable")
    all_users, all_ranks, all_targets = all_users[order], all_ranks[order], all_targets[order]
    band_counts = {k: sum_over_ranks(counts[k], world_size) for k in ks}
    metrics = compute_metrics(
        all_ranks, meta.price[all_targets], meta.fair_group[all_targets], band_counts, meta.q_star, ks
    )
    return EvalResult(metrics, band_counts, all_users, all_ranks)


def evaluate(
    model: nn.Module,
    dataset: PreparedDataset | str | Path,
    split: str,
    ks: list[int],
    rank: int,
    world_size: int,
    features: FeatureBuilder,
    device: torch.device,
    batch_users: int = 1024,
) -> EvalResult:
    """Evaluate a model (plain, or sharded with DMP: then every rank must call this) on
    ``split``; every rank returns the same result."""
    from morec_dist.model.sharding import unwrap

    data = open_dataset(dataset)
    module = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        return run_protocol(
            lambda: model_scorer(module, features, device), data, split, ks, rank, world_size, device, batch_users
        )
    finally:
        model.train(was_training)


def evaluate_most_popular(
    dataset: PreparedDataset | str | Path,
    split: str,
    ks: list[int],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = CPU,
    batch_users: int = 1024,
) -> EvalResult:
    """The most-popular baseline (score = train popularity), under the same protocol."""
    data = open_dataset(dataset)
    return run_protocol(
        lambda: popularity_scorer(ItemMeta.from_dataset(data), device),
        data,
        split,
        ks,
        rank,
        world_size,
        device,
        batch_users,
    )
