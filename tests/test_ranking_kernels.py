"""eval/ranking.py's per-batch kernels (``count_before``, ``local_topk``, ``local_keys``,
``merge_topk``, ``merge_keys``, ``mask_non_candidates_``) against the implementations they
replaced (kept here verbatim as the reference semantics)
and against a brute force over (score desc, id asc), on adversarial inputs: scores drawn
from a few values (ties everywhere), -inf non-candidates, -0.0 next to +0.0, rows with fewer
candidates than k, k larger than the range, several ranks' ranges, every score dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from morec_dist.eval import ranking
from morec_dist.eval.ranking import (
    PAD_ID,
    UserSet,
    count_before,
    local_keys,
    local_topk,
    mask_non_candidates_,
    merge_keys,
    merge_topk,
    row_positions,
)

# ----------------------------------------------- the replaced implementations (commit 11135e0)


def old_count_before(scores: torch.Tensor, target_scores: torch.Tensor, targets: torch.Tensor, lo: int) -> torch.Tensor:
    t = target_scores.to(scores.dtype).unsqueeze(1)
    above = (scores > t).sum(dim=1, dtype=torch.int32).to(torch.int64)
    row, col = (scores == t).nonzero(as_tuple=True)
    earlier = row[col + lo < targets[row]]
    return above + torch.bincount(earlier, minlength=scores.shape[0])


def old_local_topk(scores: torch.Tensor, k: int, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = scores.shape[0]
    out_scores = torch.full((rows, k), float("-inf"), dtype=torch.float64, device=scores.device)
    out_ids = torch.full((rows, k), float(PAD_ID), dtype=torch.float64, device=scores.device)
    kk = min(k, scores.shape[1])
    if kk == 0:
        return out_scores, out_ids
    values, index = scores.topk(kk, dim=1)
    threshold = values[:, -1:]
    strict = values > threshold
    out_scores[:, :kk] = torch.where(strict, values.to(torch.float64), out_scores[:, :kk])
    out_ids[:, :kk] = torch.where(strict, (index + lo).to(torch.float64), out_ids[:, :kk])
    room = kk - strict.sum(dim=1)
    row, col = (scores == threshold).nonzero(as_tuple=True)
    real = threshold[row, 0] > float("-inf")
    row, col = row[real], col[real]
    position = row_positions(row, rows)
    take = position < room[row]
    row, col, slot = row[take], col[take], (kk - room)[row[take]] + position[take]
    out_scores[row, slot] = threshold[row, 0].to(torch.float64)
    out_ids[row, slot] = (col + lo).to(torch.float64)
    return out_scores, out_ids


def old_merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    by_id = torch.sort(ids, dim=1, stable=True)
    by_score = torch.sort(scores.gather(1, by_id.indices), dim=1, descending=True, stable=True)
    return by_id.values.gather(1, by_score.indices)[:, :k].to(torch.int64)


def old_mask_non_candidates_(
    scores: torch.Tensor, users: UserSet, start: int, stop: int, lo: int, target_scores: torch.Tensor
) -> None:
    rows, width = stop - start, scores.shape[1]
    device = scores.device
    if lo == 0:
        scores[:, 0] = float("-inf")
    counts = np.diff(users.history_indptr[start : stop + 1])
    h_lo, h_hi = users.history_indptr[start], users.history_indptr[stop]
    hist_rows = torch.from_numpy(np.repeat(np.arange(rows), counts)).to(device)
    hist_cols = torch.from_numpy(users.history_items[h_lo:h_hi] - lo).to(device)
    scores[hist_rows, hist_cols] = float("-inf")
    targets = users.targets[start:stop] - lo
    mine = torch.from_numpy(np.flatnonzero((targets >= 0) & (targets < width))).to(device)
    scores[mine, torch.from_numpy(targets).to(device)[mine]] = target_scores[mine].to(scores.dtype)


# ------------------------------------------------------------------------ inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def adversarial_scores(rng: np.random.Generator, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores from a handful of values (ties in most rows), with -inf non-candidates, -0.0
    and +0.0, a few distinct values, and some rows with hardly any candidate."""
    pool = np.array([-3.5, -1.0, -0.0, 0.0, 0.25, 1.0, 2.0, 1e-30, -1e-30, 7.0])
    values = rng.choice(pool, size=(rows, width))
    values[rng.random((rows, width)) < 0.2] = -np.inf
    distinct = rng.random((rows, width)) < 0.3
    values[distinct] = rng.normal(size=int(distinct.sum()))
    sparse = rng.random(rows) < 0.2  # rows with at most a couple of candidates
    values[sparse] = np.where(rng.random((int(sparse.sum()), width)) < 0.05, 1.0, -np.inf)
    if rows:
        values[0] = -np.inf  # a row without any candidate
    if rows > 1:
        values[1] = 0.0  # a flat row
        values[1, ::2] = -0.0
    return torch.from_numpy(values).to(dtype)


def as_pairs(scores: torch.Tensor, ids: torch.Tensor) -> list[list[tuple[float, float]]]:
    """Each row's (score, id) slots as a sorted list: local_topk's output is unordered."""
    return [sorted(zip(s.tolist(), i.tolist(), strict=True)) for s, i in zip(scores, ids, strict=True)]


def brute_order(row: torch.Tensor, lo: int) -> list[int]:
    """Candidate ids of a row in ranking order (score desc, id asc), -inf left out."""
    values = row.to(torch.float64).tolist()
    return sorted((lo + c for c, v in enumerate(values) if v > float("-inf")), key=lambda i: (-values[i - lo], i))


CASES = [(seed, dtype) for seed in range(6) for dtype in DTYPES]


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed,dtype", CASES)
@pytest.mark.parametrize("chunk", [None, 1, 6])
def test_count_before_matches_the_replaced_one_and_the_brute_force(seed, dtype, chunk, monkeypatch):
    """In one chunk of rows, or in several (``COUNT_SCORES``: rows of 23 columns)."""
    if chunk is not None:
        monkeypatch.setattr(ranking, "COUNT_SCORES", chunk * 23)
    rng = np.random.default_rng(seed)
    rows, width, lo = 40, 23, int(rng.integers(0, 50))
    scores = adversarial_scores(rng, rows, width, dtype)
    # held-out items inside the range (their column holds the held-out score, as ranking
    # writes it), outside on either side, and inside with a column that differs from it
    targets = torch.from_numpy(rng.integers(lo - 10, lo + width + 10, rows))
    local = (targets - lo).clamp(0, width - 1)
    target_scores = scores.gather(1, local.unsqueeze(1)).squeeze(1).to(torch.float64)
    outside = rng.random(rows) < 0.3
    target_scores[outside] = torch.from_numpy(rng.choice([-1.0, 0.0, -0.0, 1.0, 2.0], int(outside.sum())))
    new = count_before(scores.clone(), target_scores, targets, lo)
    assert new.dtype == torch.int64
    assert torch.equal(new, old_count_before(scores, target_scores, targets, lo))
    for r in range(rows):
        t = float(target_scores[r].to(dtype))
        values = scores[r].to(torch.float64).tolist()
        expected = sum(v > t or (v == t and lo + c < int(targets[r])) for c, v in enumerate(values))
        assert int(new[r]) == expected, r


def test_count_before_without_ties_and_on_an_empty_range():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, -float("inf"), 0.25]])
    targets, lo = torch.tensor([11, 12]), 10
    assert count_before(scores, torch.tensor([1.0, 0.25]), targets, lo).tolist() == [2, 1]
    empty = torch.empty(2, 0)
    assert count_before(empty, torch.tensor([1.0, 0.25]), targets, lo).tolist() == [0, 0]


@pytest.mark.parametrize("seed,dtype", CASES)
def test_local_topk_matches_the_replaced_one_and_the_brute_force(seed, dtype):
    rng = np.random.default_rng(100 + seed)
    rows, width, lo = 30, 17, int(rng.integers(0, 1000))
    scores = adversarial_scores(rng, rows, width, dtype)
    for k in (0, 1, 3, 16, 17, 18, 40):
        new_scores, new_ids = local_topk(scores, k, lo)
        old_scores, old_ids = old_local_topk(scores, k, lo)
        assert new_scores.shape == new_ids.shape == (rows, k)
        assert new_scores.dtype == new_ids.dtype == torch.float64
        assert as_pairs(new_scores, new_ids) == as_pairs(old_scores, old_ids), k
        for r in range(rows):
            order = brute_order(scores[r], lo)[:k]
            ids = sorted(i for i in new_ids[r].tolist() if i != PAD_ID)
            assert ids == sorted(order), (k, r)
            assert new_ids[r].tolist().count(float(PAD_ID)) == k - len(order)
            slots = zip(new_scores[r].tolist(), new_ids[r].tolist(), strict=True)
            assert all(s == float("-inf") for s, i in slots if i == PAD_ID)


@pytest.mark.parametrize("seed,dtype", CASES)
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_merge_of_several_ranks_matches_the_replaced_pipeline_and_the_brute_force(seed, dtype, world):
    """Each rank's local top-k over its slice of the catalogue, gathered in rank order and
    merged: the same lists as the replaced kernels and as one process sorting every row."""
    rng = np.random.default_rng(200 + seed)
    rows, num_columns = 25, 31
    scores = adversarial_scores(rng, rows, num_columns, dtype)
    bounds = np.linspace(0, num_columns, world + 1).astype(int)
    for k in (1, 4, 10, 31, 50):
        parts_new, parts_old = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            parts_new.append(local_topk(scores[:, lo:hi], k, int(lo)))
            parts_old.append(old_local_topk(scores[:, lo:hi], k, int(lo)))

        def merged(parts, merge, k=k):
            return merge(torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1), k)

        new = merged(parts_new, merge_topk)
        assert new.dtype == torch.int64
        assert torch.equal(new, merged(parts_old, old_merge_topk)), k
        for r in range(rows):
            order = brute_order(scores[r], 0)[:k]
            assert new[r].tolist() == order + [PAD_ID] * (min(k, new.shape[1]) - len(order)), (k, r)
        if dtype != torch.float64:  # the keyed payload: (count, k keys) per rank, merge_keys
            targets = torch.from_numpy(rng.integers(0, num_columns, rows))
            target_scores = scores.gather(1, targets.unsqueeze(1)).squeeze(1).to(torch.float64)
            keyed = [
                local_keys(scores[:, lo:hi], target_scores, targets, k, int(lo))
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            assert torch.equal(merge_keys(torch.cat([p[1] for p in keyed], dim=1), k), new), k
            total = sum(p[0] for p in keyed)
            assert torch.equal(total, old_count_before(scores, target_scores, targets, 0)), k


@pytest.mark.parametrize("seed", range(8))
def test_merge_topk_on_raw_candidates_matches_the_replaced_one(seed):
    """merge_topk alone on arbitrary candidate lists: float32 values, float64 values that
    float32 cannot hold and ids past 2^32, PAD slots with any score, k larger than the
    candidates."""
    rng = np.random.default_rng(300 + seed)
    rows, n = 20, 12
    scores = torch.from_numpy(rng.choice([-np.inf, -2.0, -0.0, 0.0, 1.5, 3.0], (rows, n)))
    ids = torch.from_numpy(rng.permuted(np.tile(np.arange(1, n + 1) * 7.0, (rows, 1)), axis=1))
    ids[torch.from_numpy(rng.random((rows, n)) < 0.25)] = float(PAD_ID)
    wide = scores.clone()
    wide[:, 0] = 1.0 + 2.0**-40  # not a float32 value
    big = ids.clone()
    big[:, 1] = float(1 << 33)  # an id past 32 bits
    for s, i in [(scores, ids), (wide, ids), (scores, big), (scores.to(torch.float32), ids)]:
        for k in (0, 1, 5, n, n + 3):
            assert torch.equal(merge_topk(s, i, k), old_merge_topk(s, i, k)), k


@pytest.mark.parametrize("seed,dtype", [c for c in CASES if c[1] != torch.float64])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_local_keys_are_count_before_and_local_topk(seed, dtype, chunk, monkeypatch):
    """The count and the top-k keys from the same keys (ranked_batches' k > 0 path), in one
    chunk of rows or in several (``KEYED_SCORES``), hold the replaced functions' answers."""
    if chunk is not None:
        monkeypatch.setattr(ranking, "KEYED_SCORES", chunk * 19)  # chunk rows of 19 columns
    rng = np.random.default_rng(400 + seed)
    rows, width, lo = 33, 19, int(rng.integers(0, 100))
    scores = adversarial_scores(rng, rows, width, dtype)
    targets = torch.from_numpy(rng.integers(lo - 5, lo + width + 5, rows))
    local = (targets - lo).clamp(0, width - 1)
    target_scores = scores.gather(1, local.unsqueeze(1)).squeeze(1).to(torch.float64)
    outside = rng.random(rows) < 0.3
    target_scores[outside] = torch.from_numpy(rng.choice([-1.0, 0.0, -0.0, 1.0, -np.inf], int(outside.sum())))
    for k in (0, 1, 5, 19, 25):
        before, keys = local_keys(scores, target_scores, targets, k, lo)
        assert before.dtype == keys.dtype == torch.int64 and keys.shape == (rows, k)
        assert torch.equal(before, old_count_before(scores, target_scores, targets, lo)), k
        _, old_ids = old_local_topk(scores, k, lo)
        ids = torch.where(keys == ranking.EMPTY_KEY, PAD_ID, ranking.LOW_MASK - (keys & ranking.LOW_MASK))
        assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in old_ids.to(torch.int64).tolist()], k
        if chunk is not None:
            assert as_pairs(*local_topk(scores, k, lo)) == as_pairs(*old_local_topk(scores, k, lo)), k


def test_an_empty_slot_key_is_below_every_candidates():
    finite = torch.tensor([[-3.4e38, -1e-45, -0.0, 0.0, 1e-45, 3.4e38]])
    keys = ranking.packed_keys(finite, torch.tensor([0]))
    assert bool((keys >= ranking.FIRST_REAL_KEY).all())
    assert int(ranking.packed_keys(torch.tensor([[float("-inf")]]), torch.tensor([0]))) == ranking.EMPTY_KEY


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lo", [0, 13])
def test_mask_non_candidates_matches_the_replaced_one(seed, lo):
    """The same -inf and restored held-out scores, on a contiguous batch (flat offsets) and on
    a transposed view (the 2-D path): users without history, held-out items in their own
    history, held-out items of other ranges, a batch that starts past the first user."""
    rng = np.random.default_rng(500 + seed)
    num_users, width = 40, 29
    counts = rng.integers(0, 9, num_users)
    counts[:3] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.concatenate([np.sort(rng.choice(width, c, replace=False)) + lo for c in counts]).astype(np.int64)
    targets = rng.integers(lo - 6, lo + width + 6, num_users)
    for u in range(5, 10):  # held-out items also in their history
        if counts[u]:
            targets[u] = items[indptr[u]]
    users = UserSet(np.arange(1, num_users + 1), targets, indptr, items)
    for start, stop in [(0, num_users), (7, 31)]:
        scores = torch.from_numpy(rng.normal(size=(stop - start, width))).to(torch.float32)
        target_scores = torch.from_numpy(rng.normal(size=stop - start))
        expected = scores.clone()
        old_mask_non_candidates_(expected, users, start, stop, lo, target_scores)
        for layout in (scores.clone(), scores.t().contiguous().t()):
            assert layout.is_contiguous() == (layout.stride(1) == 1)
            mask_non_candidates_(layout, users, start, stop, lo, target_scores)
            assert torch.equal(layout, expected)
        assert bool((expected == float("-inf")).any())
