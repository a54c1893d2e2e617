"""The control / selection split of the validation users (a seeded hash of the user id) and
held-out Hit@K on a slice, against the evaluation protocol's own ranks on the same users."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.eval.evaluator import evaluate, heldout_rows
from morec_dist.eval.slices import HeldoutSlice, control_mask

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from integer_model import integer_mf

CTX = DistContext(0, 1, 0, torch.device("cpu"), "gloo", None)


def test_the_split_is_seeded_per_user_and_has_the_stated_share():
    users = np.arange(1, 20_001)
    mask = control_mask(users, seed=3, fraction=0.3)
    assert mask.mean() == pytest.approx(0.3, abs=0.015)
    assert np.array_equal(control_mask(users, 3, 0.3), mask)  # the same every time
    assert not np.array_equal(control_mask(users, 4, 0.3), mask)  # another seed, another split
    # a user's side depends on its id alone: a subset is split the same way
    assert np.array_equal(control_mask(users[::7], 3, 0.3), mask[::7])
    # a larger fraction only adds users to the control slice
    assert np.all(control_mask(users, 3, 0.5)[mask])
    with pytest.raises(ValueError, match="control_fraction"):
        control_mask(users, 3, 1.0)


def test_slice_hit_equals_the_evaluation_of_those_users(small_synthetic):
    ds = PreparedDataset.open(small_synthetic)
    features = FeatureBuilder(ds.path, ds.num_users, ds.num_items, "ids")
    model = integer_mf(features)
    full = evaluate(model, ds, "valid", [10], features, CTX)
    users, _ = heldout_rows(ds, "valid")
    mask = control_mask(users, seed=5, fraction=0.5)
    by_user = dict(zip(full.user_ids.tolist(), full.ranks.tolist(), strict=True))
    for name, keep in (("control", mask), ("selection", ~mask)):
        part = HeldoutSlice.load(ds, CTX, name, seed=5, fraction=0.5)
        assert np.array_equal(part.users.user_ids, users[keep])
        expected = np.mean([by_user[u] <= 10 for u in users[keep]])
        assert part.hit(model, features, CTX, k=10, batch_users=37) == pytest.approx(expected, abs=1e-15)
    with pytest.raises(ValueError, match="expected one of"):
        HeldoutSlice.load(ds, CTX, "test", seed=5, fraction=0.5)


def test_a_ranks_only_pass_gives_the_evaluation_ranks_at_any_batch_size(small_synthetic):
    """``ranked_batches`` with k = 0 (the control slice's pass) keeps no top-K and returns the
    held-out ranks of the full protocol (integer scores: many ties), in batches of 7 users or
    in the ranks-only batch size."""
    from morec_dist.eval.ranking import EvalOptions, model_scorer, ranked_batches, ranks_only_batch_users

    ds = PreparedDataset.open(small_synthetic)
    features = FeatureBuilder(ds.path, ds.num_users, ds.num_items, "ids")
    model = integer_mf(features)
    full = evaluate(model, ds, "valid", [10], features, CTX)
    by_user = dict(zip(full.user_ids.tolist(), full.ranks.tolist(), strict=True))
    part = HeldoutSlice.load(ds, CTX, "control", seed=5, fraction=0.5)
    expected = [by_user[u] for u in part.users.user_ids.tolist()]
    assert ranks_only_batch_users(7, ds.num_items, 1) >= len(part)  # one batch at this size
    for batch_users in (7, ranks_only_batch_users(7, ds.num_items, 1)):
        scorer = model_scorer(model, features, CTX, lambda: None)
        batches = list(ranked_batches(scorer, part.users, ds.num_items, 0, CTX, EvalOptions(batch_users=batch_users)))
        assert all(b.top_items.shape == (b.stop - b.start, 0) for b in batches)
        assert torch.cat([b.ranks for b in batches]).tolist() == expected
