"""Full-catalogue ranking split over ranks by *items*, merged into exactly one rank's answer.

Each rank owns a contiguous range of the columns 0..num_items (``item_range``; column 0 is
the padding item, never a candidate) and holds only that range's item vectors. Every rank
scores *all* users of the batch against its range and keeps, per user:

- the number of candidates of its range ordered before the held-out item, and
- its local top-K (K = the largest K asked for) under the ranking rule.

The ranking rule is total: (score descending, item_id ascending). The global top-K list is
therefore the top-K of the union of the local top-K lists, and the held-out rank is
1 + the sum of the per-range counts; the merge (one all_gather per batch) gives exactly
the ranks and top-K lists of a single process scoring the whole catalogue.

Float32 (or narrower) scores are ranked through int64 keys packing (order key of the score,
2^32 - 1 - item id): the ranking rule as one integer order, so a rank's top-K is one ``topk``
(no tie among keys to break), its count is the keys above the held-out item's, a rank sends
(count, K keys) and the merge is one ``topk`` of the gathered keys (``local_keys``,
``merge_keys``). Float64 scores keep float payloads, ties resolved explicitly
(``count_before``, ``local_topk``, ``merge_topk``); a ranks-only pass (k = 0) counts with
``count_before`` whatever the dtype.

The held-out item's score is taken from the one rank whose range holds it (its own score
matrix) and shared in the batch's control all_reduce, together with any other picked
columns (the signals' negatives), a flag for non-finite scores (NaN or infinite: they
raise; masked items are -inf) and the SIGTERM flag. Sharing the owner's
value, instead of recomputing it elsewhere, keeps ties exact: every comparison uses the
very number the owner ranks the item with.

Sharded lookups are collectives: every rank looks up the same user batches, and the item
vectors of its range in rounds of equal size (padded with item 0).

How a rank scores its range is the model's spec's (model/spec.py): a ``VectorScorer`` model
gives the range's item vectors once and every user batch is one matrix product; a
``PairwiseScorer`` model (no item vectors, e.g. a ranking MLP over both sides' features) gets
Batches of (user, candidate item) pairs, the range in rounds of equal size on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext, any_rank
from morec_dist.model.spec import PairwiseScorer, Recommender, Scorer, VectorScorer, as_recommender, scorer_of

# A batch never holds more than this many scores per rank (batch_users is lowered to fit),
# so that huge catalogues stay within memory (about 5 bytes per score in flight).
MAX_SCORES_PER_BATCH = 1 << 26
# A ranks-only pass (``ranked_batches`` with k = 0: Hit@K of the budget's control slice)
# scores at least this many per batch (32 MB of float32 scores, plus two boolean masks):
# every batch costs a sharded lookup and two collectives, and a pass keeps no top-K, so on a
# small catalogue the slice goes in one batch (``ranks_only_batch_users``).
RANKS_ONLY_SCORES = 1 << 23
ITEM_CHUNK = 1 << 16
# ``count_before`` counts in chunks of rows of this many scores (float32: 4 MB): its two
# passes read a chunk from the cache (about 15% less CPU time than passes over a whole
# batch of 2,999 x 1,942)
COUNT_SCORES = 1 << 20
# the chunks of rows on an accelerator (not timed there): a bound on memory only
DEVICE_CHUNK_SCORES = 1 << 24
# (user, item) pairs per call of a pairwise scorer: bounds its inputs' memory (KJTs, dense rows)
PAIRS_PER_CALL = 1 << 18
# ids of empty top-K slots: above every item id and exact in float64 (the merge's payload)
PAD_ID = 1 << 52

# user ids [B] -> scores [B, hi - lo], a fresh tensor (ranking writes into it)
RangeScorer = Callable[[np.ndarray], torch.Tensor]


class EvaluationInterrupted(RuntimeError):
    """Every rank stops scoring at the same batch because one of them got SIGTERM."""


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs (not what it measures).

    ``stop`` is this rank's local stop request (the SIGTERM flag); the ranks agree on it
    between batches and raise ``EvaluationInterrupted`` together."""

    batch_users: int = 1024
    stop: Callable[[], bool] | None = None


__all__ = ["Recommender", "as_recommender"]  # re-exported: the spec's vector view of a model


@dataclass
class UserSet:
    """The users every rank scores (sorted ids), their held-out items, and their history
    restricted to this rank's item range, as a CSR (global item ids)."""

    user_ids: np.ndarray
    targets: np.ndarray
    history_indptr: np.ndarray
    history_items: np.ndarray

    def __len__(self) -> int:
        return int(self.user_ids.size)


@dataclass
class RankedBatch:
    """One batch of users after the merge (identical on every rank)."""

    start: int
    stop: int
    targets: torch.Tensor  # [B] held-out item ids
    ranks: torch.Tensor  # [B] 1-based held-out ranks
    top_items: torch.Tensor  # [B, K] ids in ranking order; PAD_ID past a user's candidates
    picked: torch.Tensor  # [B, P] float64 scores of the picked columns (column 0: the held-out item)
    score_dtype: torch.dtype  # the scorer's dtype (``picked`` converts back to it exactly)


# ------------------------------------------------------------------- partition


def slice_bounds(size: int, part: int, parts: int) -> tuple[int, int]:
    """Contiguous, balanced slice of [0, size) for ``part`` (numpy.array_split)."""
    base, extra = divmod(size, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def item_range(num_items: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's columns [lo, hi) of 0..num_items."""
    return slice_bounds(num_items + 1, ctx.rank, ctx.world_size)


def longest_range(num_items: int, world_size: int) -> int:
    return -(-(num_items + 1) // world_size)


def effective_batch_users(batch_users: int, num_items: int, world_size: int) -> int:
    """Users per batch: the same on every rank (sized by the longest item range)."""
    return max(1, min(batch_users, MAX_SCORES_PER_BATCH // longest_range(num_items, world_size)))


def ranks_only_batch_users(batch_users: int, num_items: int, world_size: int) -> int:
    """Users per batch of a ranks-only pass: ``batch_users``, or more while a batch holds at
    most ``RANKS_ONLY_SCORES`` scores per rank. The ranks are the same at any batch size."""
    return max(batch_users, RANKS_ONLY_SCORES // longest_range(num_items, world_size))


# ---------------------------------------------------------------------- scorers


def range_rounds(num_items: int, ctx: DistContext, chunk: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """This rank's range in rounds of ``chunk`` items whose count and sizes agree on every rank
    (sharded lookups are collectives): (offset in the range, ids padded with item 0, real ids)."""
    lo, hi = item_range(num_items, ctx)
    longest = longest_range(num_items, ctx.world_size)
    for s in range(0, longest, chunk):
        size = min(chunk, longest - s)
        ids = np.zeros(size, dtype=np.int64)
        real = max(0, min(size, hi - lo - s))
        ids[:real] = np.arange(lo + s, lo + s + real)
        yield s, ids, real


@torch.no_grad()
def range_item_vectors(
    model: Recommender, features: FeatureBuilder, ctx: DistContext, check_stop: Callable[[], None]
) -> torch.Tensor:
    """Item vectors of this rank's range, in rounds whose sizes agree on every rank (a short
    range is padded with item 0, whose vectors are dropped)."""
    lo, hi = item_range(features.num_items, ctx)
    out: torch.Tensor | None = None  # filled in place: no second copy of the range's vectors
    for s, ids, real in range_rounds(features.num_items, ctx, ITEM_CHUNK):
        kjt, dense = features.item_kjt(ids).to(ctx.device), features.item_dense(ids).to(ctx.device)
        vectors = model.item_vectors(kjt, dense)
        if out is None:
            out = torch.empty(hi - lo, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
        out[s : s + real] = vectors[:real]
        check_stop()
    assert out is not None  # longest >= 1
    return out


def vector_scorer(
    model: Recommender, features: FeatureBuilder, ctx: DistContext, check_stop: Callable[[], None]
) -> RangeScorer:
    # [R, d] as BLAS's transposed operand: no [d, R] copy at catalogue scale
    items_t = range_item_vectors(model, features, ctx, check_stop).t()

    @torch.no_grad()
    def score(user_ids: np.ndarray) -> torch.Tensor:
        kjt, dense = features.user_kjt(user_ids).to(ctx.device), features.user_dense(user_ids).to(ctx.device)
        return model.user_vectors(kjt, dense) @ items_t

    return score


def pairwise_scorer(
    module: nn.Module, scorer: PairwiseScorer, features: FeatureBuilder, ctx: DistContext
) -> RangeScorer:
    """Scores a user batch against this rank's range through the model's pair scores: every
    user with each round of candidates (the batch size and the rounds agree on every rank)."""
    lo, hi = item_range(features.num_items, ctx)

    @torch.no_grad()
    def score(user_ids: np.ndarray) -> torch.Tensor:
        rows = len(user_ids)
        out: torch.Tensor | None = None
        for s, ids, real in range_rounds(features.num_items, ctx, max(1, PAIRS_PER_CALL // max(rows, 1))):
            batch = features.batch(user_ids, np.broadcast_to(ids, (rows, ids.size)))
            scores = scorer.score(module, batch.to(ctx.device))
            if out is None:
                out = torch.empty(rows, hi - lo, dtype=scores.dtype, device=scores.device)
            out[:, s : s + real] = scores[:, :real]
        assert out is not None  # longest >= 1
        return out

    return score


def model_scorer(
    model: nn.Module,
    features: FeatureBuilder,
    ctx: DistContext,
    check_stop: Callable[[], None],
    scorer: Scorer | None = None,
) -> RangeScorer:
    """The range scorer of ``model`` (unwrapped) by its spec's scorer, or by ``scorer``."""
    kind = scorer_of(model, scorer)
    if isinstance(kind, VectorScorer):
        return vector_scorer(as_recommender(model, kind), features, ctx, check_stop)
    return pairwise_scorer(model, kind, features, ctx)


def popularity_scorer(popularity: np.ndarray, ctx: DistContext) -> RangeScorer:
    lo, hi = item_range(popularity.size - 1, ctx)
    mine = torch.from_numpy(popularity[lo:hi].astype(np.float64)).to(ctx.device)

    def score(user_ids: np.ndarray) -> torch.Tensor:
        return mine.unsqueeze(0).repeat(len(user_ids), 1)  # a copy: ranking masks it in place

    return score


# ---------------------------------------------------------------- local ranking


def non_finite(scores: torch.Tensor) -> bool:
    """Any NaN or infinite score. A NaN or inf makes the sum non-finite, so the element-wise
    check (15x slower) runs only to confirm a non-finite sum (finite scores can overflow it)."""
    if bool(torch.isfinite(scores.sum())):
        return False
    return not bool(torch.isfinite(scores).all())


def mask_non_candidates_(
    scores: torch.Tensor, users: UserSet, start: int, stop: int, lo: int, target_scores: torch.Tensor
) -> None:
    """In place: -inf at item 0 and at the history items of this range; the held-out item
    stays a candidate with its own score. Sparse writes: no dense candidate mask; on a
    contiguous ``scores``, one ``index_fill_`` at flat offsets (half the time of a 2-D
    index_put at ML-1M's control slice)."""
    rows, width = stop - start, scores.shape[1]
    device = scores.device
    if lo == 0:
        scores[:, 0] = float("-inf")
    counts = np.diff(users.history_indptr[start : stop + 1])
    h_lo, h_hi = users.history_indptr[start], users.history_indptr[stop]
    if scores.is_contiguous():
        flat = np.repeat(np.arange(rows, dtype=np.int64) * width - lo, counts)
        flat += users.history_items[h_lo:h_hi]
        scores.view(-1).index_fill_(0, torch.from_numpy(flat).to(device), float("-inf"))
    else:
        hist_rows = torch.from_numpy(np.repeat(np.arange(rows), counts)).to(device)
        hist_cols = torch.from_numpy(users.history_items[h_lo:h_hi] - lo).to(device)
        scores[hist_rows, hist_cols] = float("-inf")
    targets = users.targets[start:stop] - lo
    mine = torch.from_numpy(np.flatnonzero((targets >= 0) & (targets < width))).to(device)
    scores[mine, torch.from_numpy(targets).to(device)[mine]] = target_scores[mine].to(scores.dtype)


def owned_scores(scores: torch.Tensor, columns: np.ndarray, lo: int) -> torch.Tensor:
    """[B, P] float64: the scores of ``columns`` (global ids) this range owns, 0 elsewhere."""
    local = torch.from_numpy(columns - lo).to(scores.device)
    owned = (local >= 0) & (local < scores.shape[1])
    values = scores.gather(1, local.clamp(0, scores.shape[1] - 1)).to(torch.float64)
    return torch.where(owned, values, torch.zeros_like(values))


def row_positions(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """For row indices sorted ascending: each entry's position within its row."""
    counts = torch.bincount(rows, minlength=num_rows)
    first = torch.cumsum(counts, dim=0) - counts
    return torch.arange(rows.numel(), device=rows.device) - first[rows]


def row_chunks(rows: int, width: int, budget: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """[r0, r1) of ``rows`` in chunks of at most ``budget`` scores (at least a row) on the
    CPU: passes over a chunk that fits in the cache, instead of each pass over the whole
    batch; elsewhere (an accelerator: no such cache, a launch per step) chunks of at most
    ``DEVICE_CHUNK_SCORES``, to bound the memory."""
    if device.type != "cpu":
        budget = max(budget, DEVICE_CHUNK_SCORES)
    step = max(1, budget // max(width, 1))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def count_before(scores: torch.Tensor, target_scores: torch.Tensor, targets: torch.Tensor, lo: int) -> torch.Tensor:
    """Per row: this range's candidates ordered before the held-out item (non-candidates
    are -inf, below every finite score).

    Two counting passes (> and >= the held-out score) per chunk of rows (``COUNT_SCORES``);
    the columns tied with it are listed (a third pass) only in the rows holding a tie other
    than the held-out item's own column (none, unless the model is flat)."""
    rows, width = scores.shape
    t = target_scores.to(scores.dtype).unsqueeze(1)
    above = torch.zeros(rows, dtype=torch.int32, device=scores.device)
    if width == 0:
        return above.to(torch.int64)
    ties = torch.empty_like(above)
    for r0, r1 in row_chunks(rows, width, COUNT_SCORES, scores.device):
        chunk, tc = scores[r0:r1], t[r0:r1]
        above[r0:r1] = (chunk > tc).sum(dim=1, dtype=torch.int32)  # an int32 sum of bools: 3x faster
        ties[r0:r1] = (chunk >= tc).sum(dim=1, dtype=torch.int32)
    ties -= above
    before = above.to(torch.int64)
    local = targets - lo
    own = (local >= 0) & (local < width)  # the held-out item's column: a tie, never before
    own &= scores.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1) == t.squeeze(1)
    tied_rows = (ties > own.to(torch.int32)).nonzero().squeeze(1)
    if tied_rows.numel():
        row, col = (scores[tied_rows] == t[tied_rows]).nonzero(as_tuple=True)
        earlier = tied_rows[row[col + lo < targets[tied_rows][row]]]
        before += torch.bincount(earlier, minlength=rows)
    return before


# float32 order keys: int32 in the scores' order (ties equal), packed above a 32-bit id
LOW_BITS = 32
LOW_MASK = (1 << LOW_BITS) - 1
# scores exactly representable as float32: ranked through int64 keys (score, id) packed
KEYED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# keys built at once (int64: 2 MB), a chunk of a batch's rows: bounded memory at any width,
# and the count and the topk read them from the cache (about 10% less CPU time than keys of
# a whole batch of 1,024 x 1,942)
KEYED_SCORES = 1 << 18


def order_keys32(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of float32 ``scores`` (no NaN): x < y iff key(x) < key(y),
    x == y iff key(x) == key(y) (-0.0 and +0.0 share key 0; -inf has the least key)."""
    bits = scores.to(torch.float32).view(torch.int32)
    sign = bits >> 31  # -1 for a negative float, 0 otherwise
    # a negative float: its magnitude bits flipped (reversed order), plus 1 so -0.0 -> 0
    keys = torch.bitwise_and(sign, 0x7FFFFFFF)
    return keys.bitwise_xor_(bits).sub_(sign)  # in place: no temporary per step


def packed_keys(scores: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int64 keys (order key of the score, ``low``): ``low`` (0 <= low < 2^32, broadcast)
    breaks ties between equal scores, larger first."""
    return order_keys32(scores).to(torch.int64).mul_(1 << LOW_BITS).add_(low)


# the key of an empty top-k slot (a -inf score, low 0): below every candidate's, whose
# scores are finite (keys from FIRST_REAL_KEY on)
EMPTY_KEY = int(order_keys32(torch.tensor([float("-inf")]))) << LOW_BITS
FIRST_REAL_KEY = EMPTY_KEY + (1 << LOW_BITS)


def keyed_catalogue(dtype: torch.dtype, num_items: int) -> bool:
    """Whether a batch's top-k lists travel and merge as int64 keys (``local_keys``,
    ``merge_keys``): scores of ``dtype`` keyed and every item id below 2^32 - 1 (the same on
    every rank: the same model and catalogue)."""
    return dtype in KEYED_DTYPES and num_items < LOW_MASK


def keyed_rows(scores: torch.Tensor, lo: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, end row, keys [rows, width]) of ``scores`` in chunks of at most
    ``KEYED_SCORES`` keys: (score, lowest item id first) packed in int64, a total order."""
    rows, width = scores.shape
    low = LOW_MASK - lo - torch.arange(width, device=scores.device)
    for r0, r1 in row_chunks(rows, width, KEYED_SCORES, scores.device):
        yield r0, r1, packed_keys(scores[r0:r1], low)


def local_keys(
    scores: torch.Tensor, target_scores: torch.Tensor, targets: torch.Tensor, k: int, lo: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count_before`` and ``local_topk`` of keyed ``scores`` from the same keys: [B] counts
    (the keys above the held-out item's), and [B, k] int64 keys (score, item id) of the first
    k candidates, unordered, ``EMPTY_KEY`` past a row's candidates (``merge_keys`` reads them)."""
    rows, width = scores.shape
    out = torch.full((rows, k), EMPTY_KEY, dtype=torch.int64, device=scores.device)
    # the held-out item's key: its score, with its id (a column of the range, or outside it)
    low = LOW_MASK - targets.clamp(lo, lo + width)
    target_keys = packed_keys(target_scores.to(scores.dtype).unsqueeze(1), low.unsqueeze(1))
    before = torch.zeros(rows, dtype=torch.int64, device=scores.device)
    kk = min(k, width)
    for r0, r1, keys in keyed_rows(scores, lo):
        before[r0:r1] = (keys > target_keys[r0:r1]).sum(dim=1, dtype=torch.int32)
        if kk:
            top = keys.topk(kk, dim=1, sorted=False).values
            out[r0:r1, :kk] = torch.where(top >= FIRST_REAL_KEY, top, EMPTY_KEY)  # -inf: a non-candidate
    return before, out


def merge_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """[B, n] keys from ``local_keys`` (every rank's) -> [B, k] ids in ranking order (score
    desc, id asc), PAD_ID past a user's candidates: ``merge_topk`` of the same candidates."""
    top = keys.topk(min(k, keys.shape[1]), dim=1).values
    return torch.where(top >= FIRST_REAL_KEY, LOW_MASK - top.bitwise_and(LOW_MASK), PAD_ID)


def local_topk(scores: torch.Tensor, k: int, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, this range's first k candidates under the ranking rule, as float64
    (scores [B, k], ids [B, k]), unordered; empty slots are (-inf, PAD_ID): the payload of
    scores that are not keyed (``local_keys`` ranks the keyed ones).

    ``topk`` breaks ties at the k-th value arbitrarily, so only the values strictly above
    it are taken from it; the slots left go to the columns equal to it, lowest ids first."""
    rows = scores.shape[0]
    out_scores = torch.full((rows, k), float("-inf"), dtype=torch.float64, device=scores.device)
    out_ids = torch.full((rows, k), float(PAD_ID), dtype=torch.float64, device=scores.device)
    kk = min(k, scores.shape[1])
    if kk == 0:
        return out_scores, out_ids
    values, index = scores.topk(kk, dim=1)  # sorted: the strictly-above values are a prefix
    threshold = values[:, -1:]
    strict = values > threshold
    out_scores[:, :kk] = torch.where(strict, values.to(torch.float64), out_scores[:, :kk])
    out_ids[:, :kk] = torch.where(strict, (index + lo).to(torch.float64), out_ids[:, :kk])
    room = kk - strict.sum(dim=1)
    row, col = (scores == threshold).nonzero(as_tuple=True)
    real = threshold[row, 0] > float("-inf")  # a -inf threshold: fewer candidates than k
    row, col = row[real], col[real]
    position = row_positions(row, rows)
    take = position < room[row]
    row, col, slot = row[take], col[take], (kk - room)[row[take]] + position[take]
    out_scores[row, slot] = threshold[row, 0].to(torch.float64)
    out_ids[row, slot] = (col + lo).to(torch.float64)
    return out_scores, out_ids


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """[B, n] candidates (from every rank) -> [B, k] ids in ranking order (score desc, id asc):
    the merge of unkeyed (float64) payloads; keyed batches merge with ``merge_keys``."""
    by_id = torch.sort(ids, dim=1, stable=True)
    by_score = torch.sort(scores.gather(1, by_id.indices), dim=1, descending=True, stable=True)
    return by_id.values.gather(1, by_score.indices)[:, :k].to(torch.int64)


# -------------------------------------------------------------------- the merge


def all_reduce_sum_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, group=ctx.pg)
    return t


def all_gather_stack(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """[world_size, *t.shape], in rank order."""
    if not ctx.distributed:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t, group=ctx.pg)
    return torch.stack(parts)


def stop_checker(ctx: DistContext, options: EvalOptions) -> Callable[[], None]:
    """A collective: raises ``EvaluationInterrupted`` on every rank once any rank's stop is set."""

    def check() -> None:
        if options.stop is not None and any_rank(options.stop(), ctx):
            raise EvaluationInterrupted("evaluation interrupted by SIGTERM")

    return check


def agree_on_batch(picked: torch.Tensor, non_finite: bool, options: EvalOptions, ctx: DistContext) -> torch.Tensor:
    """One all_reduce: the picked columns' scores (each from the rank owning the column),
    the non-finite-score flag and the SIGTERM flag; raises on every rank alike."""
    stop = options.stop is not None and options.stop()
    flags = torch.tensor([float(non_finite), float(stop)], dtype=torch.float64, device=picked.device)
    control = all_reduce_sum_(torch.cat([picked.flatten(), flags]), ctx)
    if control[-1] > 0:
        raise EvaluationInterrupted("evaluation interrupted by SIGTERM")
    if control[-2] > 0:
        raise FloatingPointError("evaluation: the model produced non-finite (NaN or infinite) scores")
    return control[:-2].view_as(picked)


def ranked_batches(
    scorer: RangeScorer,
    users: UserSet,
    num_items: int,
    k: int,
    ctx: DistContext,
    options: EvalOptions,
    extra_columns: np.ndarray | None = None,
) -> Iterator[RankedBatch]:
    """Every user of ``users`` in batches, ranked against the whole catalogue: the merge of
    every rank's item range. ``extra_columns`` [U, P-1] are further items whose scores each
    batch carries (after the held-out item's). ``k`` = 0 asks for the held-out ranks alone
    (Hit@K of the budget's control slice): no top-K is kept or merged, ``top_items`` is
    [B, 0], and the ranks are the same as with any k."""
    lo, _ = item_range(num_items, ctx)
    batch = effective_batch_users(options.batch_users, num_items, ctx.world_size)
    for start in range(0, len(users), batch):
        stop = min(start + batch, len(users))
        scores = scorer(users.user_ids[start:stop])
        columns = users.targets[start:stop, None]
        if extra_columns is not None:
            columns = np.concatenate([columns, extra_columns[start:stop]], axis=1)
        picked = agree_on_batch(owned_scores(scores, columns, lo), non_finite(scores), options, ctx)
        targets = torch.from_numpy(users.targets[start:stop]).to(scores.device)
        mask_non_candidates_(scores, users, start, stop, lo, picked[:, 0])
        dtype = scores.dtype
        if k == 0:  # ranks only: the counts are the whole payload
            before = count_before(scores, picked[:, 0], targets, lo)
            del scores
            ranks = 1 + all_gather_stack(before, ctx).sum(dim=0)
            top = torch.empty(stop - start, 0, dtype=torch.int64, device=ranks.device)
            yield RankedBatch(start, stop, targets, ranks, top, picked, dtype)
            continue
        if keyed_catalogue(dtype, num_items):  # (count, k keys) per user, int64
            before, keys = local_keys(scores, picked[:, 0], targets, k, lo)
            del scores
            gathered = all_gather_stack(torch.cat([before.unsqueeze(1), keys], dim=1), ctx)  # [W, B, 1 + k]
            ranks = 1 + gathered[:, :, 0].sum(dim=0)
            top = merge_keys(gathered[:, :, 1:].permute(1, 0, 2).reshape(stop - start, -1), k)
            yield RankedBatch(start, stop, targets, ranks, top, picked, dtype)
            continue
        before = count_before(scores, picked[:, 0], targets, lo)  # float64 scores: (count, k scores, k ids)
        top_scores, top_ids = local_topk(scores, k, lo)
        del scores
        payload = torch.cat([before.to(torch.float64).unsqueeze(1), top_scores, top_ids], dim=1)
        gathered = all_gather_stack(payload, ctx)  # [W, B, 1 + 2k]
        ranks = 1 + gathered[:, :, 0].sum(dim=0).to(torch.int64)
        merged_scores = gathered[:, :, 1 : 1 + k].permute(1, 0, 2).reshape(stop - start, -1)
        merged_ids = gathered[:, :, 1 + k :].permute(1, 0, 2).reshape(stop - start, -1)
        top = merge_topk(merged_scores, merged_ids, k)
        yield RankedBatch(start, stop, targets, ranks, top, picked, dtype)


def band_counts(top_items: torch.Tensor, k: int, bands: torch.Tensor, num_bands: int) -> torch.Tensor:
    """Histogram (bands 1..G at 0..G-1) of the first k items of each row's list."""
    first = top_items[:, :k]
    real = first[first != PAD_ID]
    return torch.bincount(bands[real], minlength=num_bands + 1)[1:]
