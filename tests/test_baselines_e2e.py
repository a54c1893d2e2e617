"""``morec finetune --method mgda | epo | mgda_uniform`` end to end, each step replayed in process.

Each method fine-tunes the session's shared pretraining for ``STEPS`` steps as a real 2-rank
torchrun job (mgda and epo with their Ray coordinator, on MoRec's sampled blocks;
mgda_uniform on uniform batches), with a step checkpoint after every step and plain SGD on
the tables (``optim.embedding_optimizer = "sgd"``: an update is ``-lr * gradient``, so one
step's table change is an exact function of the loss it back-propagated).

The test then replays every step here, with none of the job's training code: the two ranks'
batches from readers built for rank 0 and 1 (the job's seed and p_k version 0), the scores as
plain dot products of the checkpointed table rows, the BPR loss, the per-block (or
per-objective) losses and their gradients with respect to the scores, the Gram matrix summed
over both ranks, and the weights from its own solver: the min-norm point of the simplex by
enumerating active sets (MGDA), or ``pareto_solvers.epo_weights`` on the rank-averaged losses
(EPO, the pure function). Two facts are checked per step:

- the weights the job recorded (``<method>_step_weights``, and mgda_uniform's epoch mean
  ``mgda_mean_weights``) equal the replay's: a solver fed the wrong Gram matrix (one rank's
  only moves MGDA's weights by 0.01-0.1 here, the tolerance is 1e-4), EPO given other losses
  or another preference, weights swapped between blocks, or uniform / static weights where
  MGDA or EPO weights were expected all fail here;
- the table change the job made equals ``-lr`` times the gradient of ``sum_k a_k L_k`` (the
  ranks' mean, as TorchRec divides the tables' gradients by the world size) with the replay's
  weights, to 4e-7 (float32 rounding; swapped or uniform weights miss by 5e-5 to 3e-3): a job
  that records one set of weights but back-propagates another (or an unweighted sum) fails
  here even if its record looks right.

Cost: the session's shared Ray head for both coordinated methods (conftest) and ``STEPS`` steps each; the replay itself
takes well under a second per method.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e_fixtures import CONFIG, morec, on_ray, quoted

pytestmark = pytest.mark.slow

STEPS = 3
USERS = "user_ebc.embedding_bags.t_user_id.weight"
ITEMS = "item_ebc.embedding_bags.t_item_id.weight"


# ------------------------------------------------------------------------ the job


def run_method(method: str, pretrained: Path, data: Path, out: Path, ray: str | None = None) -> dict[str, Any]:
    """``STEPS`` steps of ``method`` on 2 ranks, a step checkpoint after each, SGD on the
    tables; ``ray``: the Ray head to coordinate on (its token auth), else the job's own."""
    args = [
        "finetune", "--from", str(pretrained), "--method", method, "--config", CONFIG, quoted("data.path", data),
        quoted("run.out_dir", out), f"train.max_steps={STEPS}", "checkpoint.every_steps=1",
        f"checkpoint.keep_last={STEPS}", 'optim.embedding_optimizer="sgd"',
    ]  # fmt: skip
    if ray:
        morec(*args, *on_ray(ray, f"e2e-{method}"), RAY_AUTH_MODE="token")
    else:
        morec(*args)
    return json.loads((out / "metrics.json").read_text())


def tables(checkpoint: Path, scratch: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(user table, item table) of a DCP checkpoint, as plain float64 tensors."""
    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=True)
    return state["model"][USERS].to(torch.float64), state["model"][ITEMS].to(torch.float64)


def tables_by_step(pretrained: Path, out: Path, scratch: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tables before step 0 .. STEPS - 1, and after the last step."""
    root = out / "checkpoints"
    paths = [pretrained, *(root / f"step-{s}" for s in range(1, STEPS)), root / "final"]
    return [tables(p, scratch) for p in paths]


# ------------------------------------------------------------------ the replay


def rank_batches(config: Any, data: Path, rank: int, sampled: dict[str, Any] | None) -> list[Any]:
    """The first STEPS batches rank ``rank`` of 2 draws (``sampled``: MoRec's K+1 blocks at p_k
    version 0, as {"objectives": [(name, column, row weight column)], "p": {name: p}})."""
    from morec_dist.data.reader import Reader

    extra = {} if sampled is None else {"objectives": sampled["objectives"], "probabilities": sampled["p"]}
    reader = Reader(
        str(data), batch_size=config.data.batch_size, num_negatives=config.data.num_negatives,
        negative_alpha=config.data.negative_alpha, exclude_history_negatives=config.data.negatives_exclude_history,
        history_splits=tuple(config.data.negatives_history_splits), seed=config.run.seed, rank=rank, world_size=2,
        **extra,
    )  # fmt: skip
    reader.set_epoch(0)
    batches = iter(reader)
    try:
        return [next(batches) for _ in range(STEPS)]
    finally:
        batches.close()
        reader.close()


def sampled_blocks(config: Any, data: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The coordinated reader's objectives and its p_k version 0 (the coordinator's record)."""
    from morec_dist.coordinator.objectives import build_objectives
    from morec_dist.coordinator.sampler import GroupStats
    from morec_dist.data.dataset import PreparedDataset

    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    objectives = build_objectives(config.morec.objectives, stats, default_alpha=config.morec.sampler.alpha)
    version0 = result["coordinator"]["state"]["versions"][0][1]
    return {
        "objectives": [(o.name, o.group_column, o.row_weight_column) for o in objectives.objectives],
        "p": version0,
    }


def scores_of(users: torch.Tensor, items: torch.Tensor, batch: Any) -> torch.Tensor:
    """[N, 1 + negatives] dot products of the batch's user rows with its item rows."""
    return torch.einsum("nd,ncd->nc", users[batch.user_ids], items[batch.item_ids])


def bpr(scores: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(scores[:, 1:] - scores[:, :1]).mean(dim=1)


def block_losses(per_row: torch.Tensor, batch: Any, num_blocks: int) -> torch.Tensor:
    """[L_0 .. L_K]: the mean per-row loss of each block of this rank's batch."""
    return torch.stack([per_row[batch.block_ids == k].mean() for k in range(num_blocks)])


def objective_losses(row_weights: list[torch.Tensor]):
    """[L_acc, L_1 .. L_K] of a uniform batch: the mean, and the means importance-weighted
    toward each objective's target (``strategies.objective_row_weights``' tables)."""

    def losses(per_row: torch.Tensor, batch: Any, num_blocks: int) -> torch.Tensor:
        positives = batch.item_ids[:, 0]
        return torch.stack([per_row.mean(), *((per_row * w[positives]).mean() for w in row_weights)])

    return losses


def min_norm(gram: np.ndarray) -> np.ndarray:
    """argmin over the simplex of a^T G a, by enumerating supports: on support S the
    equality-constrained optimum is G_SS^+ 1 / (1^T G_SS^+ 1); it is the answer when it is
    >= 0 and no vertex outside S lowers the norm ((G a)_j >= a^T G a)."""
    k = len(gram)
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            x = np.linalg.pinv(gram[np.ix_(s, s)]) @ np.ones(size)
            if abs(x.sum()) < 1e-300:
                continue
            a = np.zeros(k)
            a[s] = x / x.sum()
            value = a @ gram @ a
            if (a >= -1e-12).all() and (gram @ a >= value * (1 - 1e-9) - 1e-15).all() and value < best_value:
                best, best_value = np.clip(a, 0.0, None), value
    assert best is not None, gram
    return best / best.sum()


def replay_step(before, after, batches, losses_of, num_blocks, solve, lr) -> dict[str, Any]:
    """One step on both ranks' batches from the tables ``before``: the replay's weights and
    the table change its combination predicts, beside the change the job made."""
    users, items = (t.clone().requires_grad_(True) for t in before)
    rank_losses, gram = [], np.zeros((num_blocks, num_blocks))
    for batch in batches:
        scores = scores_of(users, items, batch)
        losses = losses_of(bpr(scores), batch, num_blocks)
        grads = torch.stack([torch.autograd.grad(loss, scores, retain_graph=True)[0].reshape(-1) for loss in losses])
        gram += (grads @ grads.T).numpy()
        rank_losses.append(losses)
    weights = solve(gram, np.mean([loss.detach().numpy() for loss in rank_losses], axis=0))
    # the ranks' mean: TorchRec's collectives divide the tables' gradients by the world size
    total = sum((torch.as_tensor(weights) * losses).sum() for losses in rank_losses) / len(batches)
    grad_users, grad_items = torch.autograd.grad(total, (users, items))
    return {
        "weights": weights,
        "expected": (before[0] - lr * grad_users, before[1] - lr * grad_items),
        "after": after,
    }


def replay(method: str, result: dict[str, Any], pretrained: Path, data: Path, out: Path, scratch: Path):
    """Every step of the job, replayed: a list of ``replay_step`` records."""
    from morec_dist.config import config_from_dict
    from morec_dist.coordinator.pareto_solvers import epo_weights
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.train.methods import combiner_options
    from morec_dist.train.strategies import objective_row_weights

    config = config_from_dict(result["config"])
    num_blocks = len(config.morec.objectives) + 1
    if method == "mgda_uniform":
        dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
        row_weights = [torch.from_numpy(w) for w in objective_row_weights(dataset, config.morec.objectives)]
        losses_of, sampled = objective_losses(row_weights), None
    else:
        losses_of, sampled = block_losses, sampled_blocks(config, data, result)
    if method == "epo":
        preference = np.asarray(combiner_options("epo", config)["preference"])
        solve = lambda gram, losses: epo_weights(gram, losses, preference)[0]  # noqa: E731
    else:
        solve = lambda gram, losses: min_norm(gram)  # noqa: E731
    per_rank = [rank_batches(config, data, rank, sampled) for rank in (0, 1)]
    assert all(b.version == (-1 if sampled is None else 0) for rank in per_rank for b in rank)
    states = tables_by_step(pretrained, out, scratch)
    lr = config.morec.embedding_lr or config.optim.embedding_lr
    return [
        replay_step(states[s], states[s + 1], [per_rank[0][s], per_rank[1][s]], losses_of, num_blocks, solve, lr)
        for s in range(STEPS)
    ]


# ------------------------------------------------------------------ the checks


def check_updates(steps: list[dict[str, Any]]) -> None:
    """Each step's table change is -lr * the gradient of the replay's combination."""
    for s, step in enumerate(steps):
        for name, expected, got in zip(("users", "items"), step["expected"], step["after"], strict=True):
            off = float((got - expected).abs().max())
            assert off <= 4e-7, f"step {s} {name} table: off the replay by {off:.3g}"


def check_not_uniform(steps: list[dict[str, Any]]) -> None:
    """The replayed weights are not the trivial ones, so equal weights could not pass."""
    weights = np.array([step["weights"] for step in steps])
    assert np.abs(weights - 1.0 / weights.shape[1]).max() > 0.01, weights


def test_mgda_uniform_steps_equal_their_replay(pretrained, tiny_data, tmp_path):
    """mgda_uniform (2 ranks, uniform batches, no coordinator): every step's recorded weights,
    the epoch's mean and every step's table change equal an in-process replay with a from-scratch min-norm solve."""
    out = tmp_path / "mgda_uniform"
    result = run_method("mgda_uniform", pretrained, tiny_data, out)
    assert result["job"] == "finetune:mgda_uniform" and result["world_size"] == 2
    steps = replay("mgda_uniform", result, pretrained, tiny_data, out, tmp_path)
    names = ["accuracy"] + [o["name"] for o in result["config"]["morec"]["objectives"]]
    mean = result["history"][0]["mgda_mean_weights"]
    assert sorted(mean) == sorted(names)
    recorded = np.array(result["history"][0]["mgda_step_weights"])
    assert recorded.shape == (STEPS, len(names))
    np.testing.assert_allclose(recorded, [step["weights"] for step in steps], rtol=1e-4, atol=1e-6)
    replayed = np.mean([step["weights"] for step in steps], axis=0)
    np.testing.assert_allclose([mean[n] for n in names], replayed, rtol=1e-4, atol=1e-6)
    check_not_uniform(steps)
    check_updates(steps)


@pytest.mark.parametrize("method", ["mgda", "epo"])
def test_combined_baseline_steps_equal_their_replay(method, pretrained, tiny_data, shared_ray_head, tmp_path):
    """mgda / epo on MoRec's sampled blocks (2 ranks, Ray coordinator): each step's recorded
    weights and table change equal an in-process replay of the same blocks."""
    out = tmp_path / method
    result = run_method(method, pretrained, tiny_data, out, shared_ray_head)
    assert result["job"] == f"finetune:{method}" and result["world_size"] == 2
    steps = replay(method, result, pretrained, tiny_data, out, tmp_path)
    recorded = np.array(result["history"][0][f"{method}_step_weights"])
    assert recorded.shape == (STEPS, 4)
    np.testing.assert_allclose(recorded, [step["weights"] for step in steps], rtol=1e-4, atol=1e-6)
    check_not_uniform(steps)
    check_updates(steps)
