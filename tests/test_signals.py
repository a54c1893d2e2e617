"""eval/signals.py ``compute_signals`` against a numpy brute force, on 1 rank and on 2 gloo
ranks: the per-group validation loss (BPR against the signal's fixed-seed negatives), the
per-group Hit@k, and the top-100 histogram with the train history masked; the reduction
over ranks gives every rank the same vector, equal to the single-process one.

The model is ``integer_mf`` (small integer weights), so scores are exact in float32 and
full of ties, which exercises the tie rule (score descending, then item id ascending).
Every call into signals.py goes through ``run_signals``, so a change of its signature
touches one place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from morec_dist.config import ConfigError, load_config
from morec_dist.coordinator.objectives import SignalRequest
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.eval.signals import SignalOptions, compute_signals
from tests.conftest import free_tcp_port

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from integer_model import integer_mf

NUM_NEGATIVES, ALPHA, SEED = 3, 1.0, 11


def requests(ds: PreparedDataset) -> list[SignalRequest]:
    return [
        SignalRequest("fairness", "group_loss", "fair_group", ds.num_groups("fair_group")),
        SignalRequest("revenue", "group_loss", "rev_group", ds.num_groups("rev_group")),
        SignalRequest("fair_hit", "group_hit", "fair_group", ds.num_groups("fair_group"), 10),
        SignalRequest("alignment", "topk_histogram", "align_group", ds.num_groups("align_group"), 100),
    ]


def run_signals(ds, model, features, rank, world_size, batch_users=64, users=0) -> dict[str, list[float]]:
    """The one call into signals.py (adapt here if its signature changes)."""
    ctx = DistContext(rank, world_size, rank, torch.device("cpu"), "gloo", dist.group.WORLD if world_size > 1 else None)
    options = SignalOptions(NUM_NEGATIVES, ALPHA, SEED, users=users, batch_users=batch_users)
    return compute_signals(requests(ds), model, ds, features, ctx, options)


def walker_table(p: list[float]) -> tuple[list[float], list[int]]:
    """Walker's alias table of ``p`` built here, in plain Python (Vose's order: the small and
    the large columns each a stack in index order, paired from the top), so the brute force
    does not draw through the package's sampler or its table."""
    n = len(p)
    scaled = [x * n for x in p]
    accept, alias = [1.0] * n, list(range(n))
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return accept, alias


def signal_negatives(ds: PreparedDataset, targets: np.ndarray) -> np.ndarray:
    """The signal's negatives by the documented rule, drawn here: items 1..N with probability
    popularity ** alpha (train counts, items.parquet), one draw for all (sampled) valid users
    from ``default_rng([seed, 7919])`` (the same on every rank), a column and a uniform per
    negative (Walker), and a negative equal to its row's positive redrawn, up to 8 rounds
    (adapt here if the scheme changes)."""
    popularity = ds.item_column("popularity").astype(np.float64)[1:]
    weights = popularity**ALPHA
    p = (weights / weights.sum()).tolist()
    accept, alias = walker_table(p)
    # the table draws exactly p: each column carries 1/n, split between itself and its alias
    drawn = np.zeros(len(p))
    for i, (a, j) in enumerate(zip(accept, alias, strict=True)):
        drawn[i] += a / len(p)
        drawn[j] += (1.0 - a) / len(p)
    np.testing.assert_allclose(drawn, p, rtol=0, atol=1e-12)
    rng = np.random.default_rng([SEED, 7919])

    def draw(count: int) -> list[int]:
        columns = rng.integers(0, len(p), count).tolist()
        uniforms = rng.random(count).tolist()
        return [(c if u < accept[c] else alias[c]) + 1 for c, u in zip(columns, uniforms, strict=True)]

    negatives = np.array(draw(len(targets) * NUM_NEGATIVES), dtype=np.int64).reshape(len(targets), NUM_NEGATIVES)
    for _ in range(8):
        clash = negatives == targets[:, None]
        if not clash.any():
            break
        negatives[clash] = draw(int(clash.sum()))
    assert not (negatives == targets[:, None]).any()
    return negatives


def brute_force(ds: PreparedDataset, model, features, keep: np.ndarray | None = None) -> dict[str, list[float]]:
    valid = ds.read_split("valid", ["user_id", "item_id"])
    order = np.argsort(valid["user_id"].to_numpy(), kind="stable")
    users = valid["user_id"].to_numpy()[order].astype(np.int64)
    targets = valid["item_id"].to_numpy()[order].astype(np.int64)
    if keep is not None:  # the positions (in user order) of a user sample
        users, targets = users[keep], targets[keep]
    train = ds.read_split("train", ["user_id", "item_id"])
    history: dict[int, set[int]] = {}
    for u, i in zip(train["user_id"].to_numpy().tolist(), train["item_id"].to_numpy().tolist(), strict=True):
        history.setdefault(u, set()).add(i)
    with torch.no_grad():
        u_vec = model.user_vectors(features.user_kjt(users)).double().numpy()
        i_vec = model.item_vectors(features.item_kjt(np.arange(ds.num_items + 1))).double().numpy()
    negatives = signal_negatives(ds, targets)
    out: dict[str, list[float]] = {}
    for req in requests(ds):
        group = ds.item_column(req.group_column).astype(np.int64)
        sums, counts = np.zeros(req.num_groups + 1), np.zeros(req.num_groups + 1)
        for row, (u, t) in enumerate(zip(users.tolist(), targets.tolist(), strict=True)):
            scores = i_vec @ u_vec[row]
            if req.kind == "group_loss":
                gaps = scores[negatives[row]] - scores[t]
                sums[group[t]] += np.mean(np.log1p(np.exp(gaps)))
                counts[group[t]] += 1
                continue
            candidates = [i for i in range(1, ds.num_items + 1) if i == t or i not in history.get(u, set())]
            ranked = sorted(candidates, key=lambda i: (-scores[i], i))
            if req.kind == "group_hit":
                sums[group[t]] += float(t in ranked[: req.k])
                counts[group[t]] += 1
            else:
                for i in ranked[: req.k]:
                    sums[group[i]] += 1
        if req.kind == "topk_histogram":
            out[req.objective] = sums[1:].tolist()
        else:
            out[req.objective] = [s / c if c else float("nan") for s, c in zip(sums[1:], counts[1:], strict=True)]
    return out


def assert_signals_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.fixture(scope="module")
def setup(small_synthetic):
    ds = PreparedDataset.open(small_synthetic)
    features = FeatureBuilder(ds.path, ds.num_users, ds.num_items, "ids")
    return ds, features, integer_mf(features)


@pytest.fixture(scope="module")
def one_rank(setup) -> dict:
    ds, features, model = setup
    return run_signals(ds, model, features, 0, 1)


def test_one_rank_matches_brute_force(setup, one_rank):
    ds, features, model = setup
    expected = brute_force(ds, model, features)
    assert_signals_equal(one_rank, expected)
    # the signals are not trivially flat: the checks above can fail
    assert np.nanstd(one_rank["fairness"]) > 0 and np.nanstd(one_rank["fair_hit"]) > 0
    assert sum(one_rank["alignment"]) == 100 * ds.split_rows("valid")


def test_history_is_masked_in_the_histogram(setup, one_rank):
    # without the mask the top-100 counts differ: the brute force's masking is what matches
    ds, features, model = setup
    valid = ds.read_split("valid", ["user_id"])["user_id"].to_numpy().astype(np.int64)
    with torch.no_grad():
        u_vec = model.user_vectors(features.user_kjt(valid)).double().numpy()
        i_vec = model.item_vectors(features.item_kjt(np.arange(ds.num_items + 1))).double().numpy()
    scores = u_vec @ i_vec[1:].T  # items 1..N
    ids = np.arange(1, ds.num_items + 1)
    top = np.array([ids[np.lexsort((ids, -row))[:100]] for row in scores])
    group = ds.item_column("align_group")
    unmasked = np.bincount(group[top.ravel()], minlength=ds.num_groups("align_group") + 1)[1:]
    assert unmasked.sum() == sum(one_rank["alignment"])
    assert unmasked.tolist() != one_rank["alignment"]
    assert model.training is True  # compute_signals restores train mode


def test_batch_size_does_not_change_the_signals(setup, one_rank):
    ds, features, model = setup
    assert_signals_equal(run_signals(ds, model, features, 0, 1, batch_users=7), one_rank)


def test_a_pairwise_scorer_gives_the_same_signals(setup, one_rank):
    """The signals score through the model's spec: the same weights behind a PairwiseScorer
    (the model's forward over candidate pairs) give the vector path's signals."""
    import dataclasses

    from morec_dist.model.spec import PairwiseScorer, attach_spec, spec_of

    ds, features, _ = setup
    model = integer_mf(features)  # the same seeded weights, its own spec
    attach_spec(model, dataclasses.replace(spec_of(model), scorer=PairwiseScorer()))
    assert_signals_equal(run_signals(ds, model, features, 0, 1, batch_users=50), one_rank)


def sample_size(ds: PreparedDataset) -> int:
    return ds.split_rows("valid") // 3


def expected_sample(num_users: int, size: int) -> np.ndarray:
    """The signals' user sample, re-derived: positions (in user order) drawn without
    replacement from ``default_rng([seed, 104729])`` (adapt here if the scheme changes)."""
    return np.sort(np.random.default_rng([SEED, 104729]).choice(num_users, size, replace=False))


def test_user_sample_is_seeded_and_matches_the_brute_force(setup, one_rank):
    ds, features, model = setup
    size = sample_size(ds)
    sampled = run_signals(ds, model, features, 0, 1, users=size)
    assert_signals_equal(sampled, brute_force(ds, model, features, expected_sample(ds.split_rows("valid"), size)))
    assert sum(sampled["alignment"]) == 100 * size
    assert sampled["alignment"] != one_rank["alignment"]  # a sample, not all users
    # the same users at every update: another call (other batches) gives the same signals
    assert_signals_equal(run_signals(ds, model, features, 0, 1, batch_users=7, users=size), sampled)
    # 0 and a size of at least all users both mean every user
    assert_signals_equal(run_signals(ds, model, features, 0, 1, users=ds.split_rows("valid")), one_rank)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "morec.sampler.validation_users=-5",
            "morec.sampler.validation_users: expected >= 0 (0 = all validation users), got -5",
        ),
        ("eval.batch_users=0", "eval.batch_users: expected >= 1, got 0"),
    ],
)
def test_bad_signal_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _rank_worker(rank: int, port: int, root: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = PreparedDataset.open(root)
        features = FeatureBuilder(ds.path, ds.num_users, ds.num_items, "ids")
        model = integer_mf(features)
        out[rank] = run_signals(ds, model, features, rank, 2, batch_users=50)
        out[f"sample{rank}"] = run_signals(ds, model, features, rank, 2, batch_users=50, users=sample_size(ds))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_reduce_to_the_brute_force(setup, one_rank):
    ds, features, model = setup
    port = free_tcp_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(port, str(ds.path), out), nprocs=2, join=True)
        out = dict(out)
    assert_signals_equal(out[0], out[1])  # every rank returns the same signals
    assert_signals_equal(out[0], brute_force(ds, model, features))
    # the same users and negatives on any number of ranks: the single-process signals (hits
    # and histograms exactly; the float32 per-row losses of other batch sizes to float32)
    sampled = run_signals(ds, model, features, 0, 1, users=sample_size(ds))
    assert_signals_equal(out["sample0"], out["sample1"])
    for two, one in ((out[0], one_rank), (out["sample0"], sampled)):
        assert_signals_equal(two, one)
        for name in ("fair_hit", "alignment"):
            np.testing.assert_allclose(two[name], one[name], rtol=1e-12, err_msg=name)
