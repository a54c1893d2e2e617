"""The baseline combiners (coordinator/baselines.py, pareto_solvers.py) on hand-computable
cases: static weights, MGDA's common descent direction, EPO reaching the preference ray and
ParetoMTL staying in its sub-region on toy quadratics, the exact simplex LP against scipy,
gradients by table row, Stateful round trips and the Gram reduction over 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from morec_dist.coordinator.baselines import (
    COMBINERS,
    CombinerError,
    block_gradients,
    build_combiner,
)
from morec_dist.coordinator.pareto_solvers import (
    epo_weights,
    is_close_to_ray,
    pareto_mtl_constraints,
    preference_vectors,
    simplex_lp,
)
from morec_dist.registry import RegistryError
from tests.conftest import free_tcp_port


def linear_losses(grads: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """L_k = g_k . x at x = 0 (+1 so losses are positive): gradient g_k exactly."""
    x = torch.zeros(len(grads[0]), dtype=torch.float64, requires_grad=True)
    g = torch.tensor(grads, dtype=torch.float64)
    return g @ x + 1.0, x


def test_registry_lists_the_four_baselines():
    assert COMBINERS.names() == ["static", "mgda", "pareto_mtl", "epo"]
    with pytest.raises(RegistryError, match="finetune.combiner: unknown combiner 'pid'"):
        COMBINERS.get("pid")


def test_static_is_the_fixed_weighted_sum_and_needs_no_gradients():
    c = build_combiner("static", 3, {"weights": [0.5, 0.25, 0.25]})
    losses = torch.tensor([2.0, 4.0, 8.0], requires_grad=True)
    loss, info = c.combine(losses)
    assert loss.item() == pytest.approx(0.5 * 2 + 0.25 * 4 + 0.25 * 8)
    loss.backward()
    assert losses.grad.tolist() == [0.5, 0.25, 0.25]
    assert info["weights"] == [0.5, 0.25, 0.25]
    with pytest.raises(CombinerError, match="static.weights: expected 3"):
        build_combiner("static", 3, {"weights": [1.0, 1.0]})
    with pytest.raises(CombinerError, match="static: bad options"):
        build_combiner("static", 3, {"wieghts": [1.0, 1.0, 1.0]})


def test_mgda_orthogonal_gradients_weight_by_inverse_square_norm():
    # g1 = (1, 0), g2 = (0, 2): min-norm point of the segment is (4/5, 1/5) weights -> (0.8, 0.4)
    losses, x = linear_losses([[1.0, 0.0], [0.0, 2.0]])
    loss, info = build_combiner("mgda", 2).combine(losses, x)
    assert info["weights"] == pytest.approx([0.8, 0.2])
    (d,) = torch.autograd.grad(loss, x)
    # a common descent direction: -d decreases both losses, equally (|d|^2 = g_k . d)
    assert d @ torch.tensor([1.0, 0.0], dtype=torch.float64) == pytest.approx(0.8)
    assert d @ torch.tensor([0.0, 2.0], dtype=torch.float64) == pytest.approx(0.8)


def test_mgda_three_objectives_ignores_the_dominated_gradient():
    # the hull of (1,0), (0,1), (1,1): its min-norm point is (1/2, 1/2), on the first edge
    losses, x = linear_losses([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    _, info = build_combiner("mgda", 3).combine(losses, x)
    assert info["weights"] == pytest.approx([0.5, 0.5, 0.0], abs=1e-9)


def test_gradients_by_id_equal_the_embedding_table_gradient():
    torch.manual_seed(0)
    table = torch.nn.Embedding(6, 3).double()
    ids = torch.tensor([1, 4, 1, 2, 4, 4])
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = table(ids)
    per_row = (rows**2).sum(1) * torch.arange(1, 7, dtype=torch.float64)
    means = torch.stack([per_row[blocks == b].mean() for b in range(3)])
    by_id = block_gradients(means, rows, ids)  # [3, unique ids (1, 2, 4) x 3]
    for b in range(3):
        (g,) = torch.autograd.grad(means[b], table.weight, retain_graph=True)
        assert torch.allclose(by_id[b].reshape(3, 3), g[[1, 2, 4]])
    # by score rows the blocks are disjoint: their gradients are orthogonal
    by_row = block_gradients(means, rows)
    gram = by_row @ by_row.T
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros(3, 3, dtype=torch.float64))


def quadratic_losses(x: torch.Tensor, centres: torch.Tensor, offset: float = 0.1) -> torch.Tensor:
    return ((x[None, :] - centres) ** 2).sum(1) + offset


def run_descent(name: str, options: dict, centres: torch.Tensor, steps: int, lr: float, start) -> tuple:
    combiner = build_combiner(name, len(centres), options)
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        losses = quadratic_losses(x, centres)
        loss, info = combiner.combine(losses, x)
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= lr * g
    return x.detach(), quadratic_losses(x.detach(), centres).numpy(), combiner


CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def on_segment(x: torch.Tensor) -> float:
    """Distance from x to the segment between the centres (the Pareto set of the toy)."""
    t = float(torch.clamp((x - CENTRES[0]) @ (CENTRES[1] - CENTRES[0]) / 2.0, 0, 1))
    return float(torch.linalg.norm(x - (CENTRES[0] + t * (CENTRES[1] - CENTRES[0]))))


@pytest.mark.parametrize("preference", [[1.0, 1.0], [1.0, 2.0], [3.0, 1.0]])
def test_epo_reaches_the_preference_ray_on_the_pareto_set(preference):
    # eps bounds KL(l_hat || uniform) at the switch to descent: 1e-6 is r * l equal to ~0.3%
    x, losses, combiner = run_descent("epo", {"preference": preference, "eps": 1e-6}, CENTRES, 400, 0.05, [2.0, 2.0])
    assert is_close_to_ray(losses, np.asarray(preference), tol=0.01), (losses, preference)
    assert on_segment(x) < 0.02
    assert combiner.moves["bal"] > 0 and combiner.moves["dom"] > 0  # it balanced, then descended


def test_epo_differs_from_static_at_the_same_preference():
    # static weights (1, 2) stop where the weighted gradient vanishes: not on the ray r * l = c
    _, losses, _ = run_descent("static", {"weights": [1.0, 2.0]}, CENTRES, 400, 0.05, [2.0, 2.0])
    assert not is_close_to_ray(losses, np.array([1.0, 2.0]), tol=0.05)


@pytest.fixture(scope="module")
def pareto_mtl_runs() -> dict[int, tuple]:
    return {
        i: run_descent("pareto_mtl", {"preference_id": i, "init_steps": 100}, CENTRES, 300, 0.05, [1.5, 2.0])
        for i in (0, 2, 4)
    }


@pytest.mark.parametrize("pref_id", [0, 2, 4])
def test_pareto_mtl_ends_in_its_preference_sub_region(pareto_mtl_runs, pref_id):
    prefs = preference_vectors(2)
    x, losses, combiner = pareto_mtl_runs[pref_id]
    w, _ = pareto_mtl_constraints(losses, prefs, pref_id)
    # in u_i's cone: no other preference is closer in angle to the final loss vector
    assert (w @ (losses / np.linalg.norm(losses)) <= 1e-3).all(), (losses, prefs[pref_id])
    assert on_segment(x) < 1e-3  # and Pareto optimal
    assert combiner.feasible


def test_pareto_mtl_preferences_spread_along_the_front(pareto_mtl_runs):
    # the end points are ordered like the preferences' angles: distinct points of the front
    l1 = [pareto_mtl_runs[i][1][0] for i in (0, 2, 4)]
    assert l1[0] > l1[1] + 0.3 and l1[1] > l1[2] + 0.3


def test_pareto_mtl_preferences_for_k_plus_one_blocks():
    prefs = preference_vectors(4)  # acc + 3 objectives: interior lattice, UniRec has none
    assert prefs.shape == (10, 4) and np.allclose(np.linalg.norm(prefs, axis=1), 1.0) and (prefs > 0).all()
    losses, x = linear_losses([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    loss, info = build_combiner("pareto_mtl", 4, {"preference_id": 3}).combine(losses, x)
    assert np.isfinite(info["weights"]).all() and info["phase"] in ("init", "main")
    with pytest.raises(CombinerError, match="pareto_mtl.preference_id: expected 0..9"):
        build_combiner("pareto_mtl", 4, {"preference_id": 10})


def test_simplex_lp_matches_scipy():
    linprog = pytest.importorskip("scipy.optimize").linprog
    rng = np.random.default_rng(3)
    solved = 0
    for _ in range(40):
        m = int(rng.integers(2, 5))
        c = rng.normal(size=m)
        a = rng.normal(size=(m, m))
        b = rng.normal(size=m) - 1.0
        ours = simplex_lp(c, a, b)
        ref = linprog(-c, A_ub=-a, b_ub=-b, A_eq=np.ones((1, m)), b_eq=[1.0], bounds=[(0, None)] * m)
        assert (ours is None) == (ref.status == 2), (c, a, b)
        if ours is not None:
            solved += 1
            assert ours[1] == pytest.approx(-ref.fun, abs=1e-7)
            assert (a @ ours[0] >= b - 1e-7).all() and ours[0].sum() == pytest.approx(1.0)
    assert solved >= 10


def test_epo_balance_step_lowers_the_worst_relative_loss():
    gram = np.eye(3)
    losses = np.array([1.0, 3.0, 1.0])  # objective 1 is far above the ray r = 1
    weights, move = epo_weights(gram, losses, np.ones(3))
    assert move == "bal"
    assert weights[1] == pytest.approx(3.0) and weights.sum() == pytest.approx(3.0)


def test_stateful_round_trip_continues_the_same_way():
    a = build_combiner("pareto_mtl", 2, {"preference_id": 4, "init_steps": 5})
    losses, x = linear_losses([[1.0, 0.0], [0.0, 1.0]])
    for _ in range(3):
        a.combine(losses, x)
    b = build_combiner("pareto_mtl", 2, {"preference_id": 4, "init_steps": 5})
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert a.combine(losses, x)[1] == b.combine(losses, x)[1]
    summary = a.epoch_summary()
    assert len(summary["pareto_mtl_mean_weights"]) == 2 and a.steps == 0


def _rank_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        g = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 3.0]], dtype=torch.float64)
        mine = slice(2 * rank, 2 * rank + 2)  # each rank holds two of the four score columns
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        losses = g[:, mine] @ x + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (1 + rank)
        for name in ("mgda", "epo"):
            _, info = build_combiner(name, 3).combine(losses, x)
            out[f"{name}{rank}"] = info["weights"]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_solve_the_global_problem():
    port = free_tcp_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(port, out), nprocs=2, join=True)
        out = dict(out)
    g = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 3.0]], dtype=torch.float64)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    mean_losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * 1.5  # the ranks' mean
    for name in ("mgda", "epo"):
        _, info = build_combiner(name, 3).combine(g @ x + mean_losses, x)
        assert out[f"{name}0"] == pytest.approx(out[f"{name}1"], abs=1e-12)
        assert out[f"{name}0"] == pytest.approx(info["weights"], abs=1e-9)


@pytest.fixture(scope="module")
def morec_batch(small_synthetic):
    """One MoRec batch (K+1 = 4 blocks) from the real reader, and the features to score it."""
    from morec_dist.data.features import FeatureBuilder
    from morec_dist.data.reader import Reader

    objectives = [("revenue", "rev_group"), ("fairness", "fair_group"), ("alignment", "align_group")]
    with Reader(small_synthetic, batch_size=128, num_negatives=2, seed=1, objectives=objectives) as reader:
        batch = next(iter(reader))
    assert batch.block_ids.tolist() == sorted(batch.block_ids.tolist()) and int(batch.block_ids.max()) == 3
    return batch, FeatureBuilder(small_synthetic, 500, 300, "ids")


@pytest.mark.parametrize("name", ["static", "mgda", "pareto_mtl", "epo"])
def test_combiners_train_mf_on_morec_sampled_blocks(morec_batch, name):
    """The wiring the method registry will use: a MoRec reader's K+1 blocks, the model's
    scores, ``block_means`` and the combiner instead of the PID; the losses fall."""
    from morec_dist.config import ModelConfig
    from morec_dist.coordinator.combined_loss import block_means
    from morec_dist.model import build_model
    from morec_dist.model.loss import bpr_loss

    batch, features = morec_batch
    torch.manual_seed(0)
    model = build_model("mf", features, ModelConfig(name="mf", embedding_dim=8))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.2)
    combiner = build_combiner(name, 4, {"preference_id": 3} if name == "pareto_mtl" else None)
    history = []
    for _ in range(30):  # fit one MoRec batch: on it every method must make progress
        scores = model(batch)
        means = block_means(bpr_loss(scores), batch.block_ids, 4)
        loss, info = combiner.combine(means, scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(means.detach().numpy())
        assert np.isfinite(info["weights"]).all()
    first, last = np.mean(history[:5], axis=0), np.mean(history[-5:], axis=0)
    # the total falls; single blocks may rise only where the method trades them on purpose
    assert last.sum() < first.sum() - 0.05, (name, first, last)
    if name in ("static", "mgda"):
        assert (last < first).all(), (name, first, last)
    assert combiner.state_dict()["steps"] == 30
