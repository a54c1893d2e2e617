"""The paper's baselines as loss combiners over the K+1 block losses of a MoRec-sampled batch.

The authors run every baseline on the same data as MoRec: the reader still draws the K+1
blocks (block 0 accuracy, block k objective k) from the adaptive p_k, and only the
coordinator's PID combination ``lam * sum w_k L_k + beta * L_0`` is swapped for one of these
(microsoft/UniRec ``Trainer._objective_control``). A combiner turns the vector
``[L_0 .. L_K]`` (``combined_loss.block_means``) into the step's loss:

- ``static``: fixed weights ``v_0..v_K`` (UniRec ``StaticWeightSolver``);
- ``mgda``: the min-norm weights of the per-block gradients (``mgda.min_norm_weights``);
- ``pareto_mtl``: ParetoMTL with a preference vector (``pareto_solvers.pareto_mtl_weights``);
- ``epo``: EPO search toward the preference ray (``pareto_solvers.epo_weights``).

Gradients are taken with respect to a tensor the caller chooses (``shared``): the batch's
scores (as ``train/strategies.py``'s MGDAStrategy does), or the looked-up embeddings with
``shared_ids`` (the rows' item or user ids), in which case the per-row gradients are summed
by id, which is exactly the gradient with respect to the embedding table's rows. Why the
choice matters: the blocks hold disjoint rows, so with respect to the scores the block
gradients are orthogonal and the Gram matrix is diagonal (MGDA then weights each block by
1 / |g_k|^2); with respect to the table rows, blocks that share items interact, as in UniRec,
which differentiates with respect to all parameters.

Across ranks the local Gram matrices are summed (exact for disjoint rows, e.g. the scores;
an approximation for table rows that two ranks share) and the detached loss vector is
averaged, so every rank solves the same problem and uses the same weights. Every combiner is
a ``Stateful`` (``state_dict`` / ``load_state_dict``) so a resumed job continues where it was.
Its epoch summary gives the mean weights and the weights of every step of the epoch, in step
order (``<name>_step_weights``: what a run's record shows, and what the end-to-end tests
recompute from the same blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from morec_dist.coordinator.mgda import min_norm_weights
from morec_dist.coordinator.pareto_solvers import epo_weights, pareto_mtl_weights, preference_vectors, unit_rows
from morec_dist.registry import Registry


class CombinerError(ValueError):
    """A combiner's options do not fit the number of blocks: names the option and the fix."""


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def block_gradients(
    block_losses: torch.Tensor, shared: torch.Tensor, shared_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[K+1, D] gradients of each block loss with respect to ``shared`` (float64, detached).

    With ``shared_ids`` ([rows], one id per leading row of ``shared``), rows with the same id
    are summed: the gradient with respect to the rows of the table they were looked up from.
    """
    rows = []
    for loss in block_losses:
        if not loss.requires_grad:  # an empty block: a constant 0
            rows.append(torch.zeros_like(shared, dtype=torch.float64).reshape(len(shared), -1))
            continue
        (grad,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        grad = torch.zeros_like(shared) if grad is None else grad
        rows.append(grad.detach().to(torch.float64).reshape(len(shared), -1))
    grads = torch.stack(rows)  # [K+1, rows, width]
    if shared_ids is not None:
        if shared_ids.shape != (len(shared),):
            raise ValueError(f"shared_ids: expected shape ({len(shared)},), got {tuple(shared_ids.shape)}")
        unique, inverse = torch.unique(shared_ids.to(grads.device), return_inverse=True)
        summed = torch.zeros(grads.shape[0], len(unique), grads.shape[2], dtype=torch.float64, device=grads.device)
        grads = summed.index_add_(1, inverse, grads)
    return grads.reshape(grads.shape[0], -1)


def global_gram(grads: torch.Tensor, group: Any = None) -> np.ndarray:
    """G G^T summed over the ranks of ``group``: identical on every rank."""
    gram = grads @ grads.T
    if _distributed(group):
        gram = gram.cpu() if dist.get_backend(group) == "gloo" else gram
        dist.all_reduce(gram, group=group)
    return gram.cpu().numpy()


def global_losses(block_losses: torch.Tensor, group: Any = None) -> np.ndarray:
    """The detached loss vector averaged over the ranks of ``group``."""
    values = block_losses.detach().to(torch.float64)
    if _distributed(group):
        values = values.cpu() if dist.get_backend(group) == "gloo" else values.clone()
        dist.all_reduce(values, group=group)
        values = values / dist.get_world_size(group)
    return values.cpu().numpy()


class Combiner(Stateful):
    """Base: ``combine(block_losses, shared)`` -> (loss, info); running mean weights for summaries."""

    name = "combiner"
    needs_gradients = True

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise CombinerError(f"{self.name}: needs accuracy and at least one objective block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.steps = 0
        self.weight_sums = np.zeros(num_blocks)
        self.step_weights: list[list[float]] = []  # the weights of each step of this epoch

    def weights(self, gram: np.ndarray | None, losses: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def combine(
        self,
        block_losses: torch.Tensor,
        shared: torch.Tensor | None = None,
        *,
        shared_ids: torch.Tensor | None = None,
        group: Any = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's loss ``sum_k a_k L_k`` (weights detached) and {"weights": a, ...}."""
        if block_losses.shape != (self.num_blocks,):
            raise ValueError(f"{self.name}: expected {self.num_blocks} block losses, got {tuple(block_losses.shape)}")
        gram = None
        if self.needs_gradients:
            if shared is None:
                raise ValueError(f"{self.name}: needs the tensor to differentiate by (shared=scores or embeddings)")
            gram = global_gram(block_gradients(block_losses, shared, shared_ids), group)
        a, info = self.weights(gram, global_losses(block_losses, group))
        self.steps += 1
        self.weight_sums += a
        self.step_weights.append([float(x) for x in a])
        weights = torch.as_tensor(a, dtype=block_losses.dtype, device=block_losses.device)
        return (weights * block_losses).sum(), {"weights": a.tolist(), **info}

    def epoch_summary(self) -> dict[str, Any]:
        means = (self.weight_sums / max(self.steps, 1)).tolist()
        per_step = self.step_weights
        self.weight_sums[:] = 0.0
        self.steps = 0
        self.step_weights = []
        return {f"{self.name}_mean_weights": means, f"{self.name}_step_weights": per_step}

    # ----------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "weight_sums": self.weight_sums.tolist(),
            "step_weights": [list(w) for w in self.step_weights],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.weight_sums = np.asarray(state_dict["weight_sums"], dtype=np.float64)
        self.step_weights = [[float(x) for x in w] for w in state_dict["step_weights"]]


class StaticCombiner(Combiner):
    name = "static"
    needs_gradients = False

    def __init__(self, num_blocks: int, weights: Sequence[float] | None = None):
        super().__init__(num_blocks)
        v = np.full(num_blocks, 1.0 / num_blocks) if weights is None else np.asarray(weights, dtype=np.float64)
        if v.shape != (num_blocks,) or not np.isfinite(v).all() or (v < 0).any():
            raise CombinerError(
                f"static.weights: expected {num_blocks} finite weights >= 0 (accuracy first), got {weights}"
            )
        self.fixed = v

    def weights(self, gram, losses):
        return self.fixed, {}


class MGDACombiner(Combiner):
    name = "mgda"

    def weights(self, gram, losses):
        return min_norm_weights(gram), {}


class ParetoMTLCombiner(Combiner):
    """ParetoMTL: ``init_steps`` feasibility steps at most, then constrained min-norm steps."""

    name = "pareto_mtl"

    def __init__(
        self,
        num_blocks: int,
        preference_id: int = 0,
        preferences: Sequence[Sequence[float]] | None = None,
        init_steps: int = 2,
    ):
        super().__init__(num_blocks)
        prefs = preference_vectors(num_blocks) if preferences is None else np.asarray(preferences, dtype=np.float64)
        if prefs.ndim != 2 or prefs.shape[1] != num_blocks or (prefs < 0).any():
            raise CombinerError(
                f"pareto_mtl.preferences: expected rows of {num_blocks} numbers >= 0, got {preferences}"
            )
        if not 0 <= preference_id < len(prefs):
            raise CombinerError(f"pareto_mtl.preference_id: expected 0..{len(prefs) - 1}, got {preference_id}")
        if init_steps < 0:
            raise CombinerError(f"pareto_mtl.init_steps: expected >= 0, got {init_steps}")
        self.preferences = unit_rows(prefs)  # directions: see pareto_solvers.unit_rows
        self.preference_id = preference_id
        self.init_steps = init_steps
        self.init_done = 0  # feasibility steps taken
        self.feasible = False

    def weights(self, gram, losses):
        initial = not self.feasible and self.init_done < self.init_steps
        a, feasible = pareto_mtl_weights(gram, losses, self.preferences, self.preference_id, initial=initial)
        if initial:
            self.init_done += 1
            self.feasible = feasible
        return a, {"phase": "init" if initial and not feasible else "main"}

    def state_dict(self):
        return {**super().state_dict(), "init_done": self.init_done, "feasible": self.feasible}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.init_done = int(state_dict["init_done"])
        self.feasible = bool(state_dict["feasible"])


class EPOCombiner(Combiner):
    """EPO search: the loss weights that move ``r * l`` onto the ray, then descend along it."""

    name = "epo"

    def __init__(self, num_blocks: int, preference: Sequence[float] | None = None, eps: float = 1e-4):
        super().__init__(num_blocks)
        r = np.ones(num_blocks) if preference is None else np.asarray(preference, dtype=np.float64)
        if r.shape != (num_blocks,) or not np.isfinite(r).all() or (r <= 0).any():
            raise CombinerError(f"epo.preference: expected {num_blocks} numbers > 0 (accuracy first), got {preference}")
        if not eps > 0:
            raise CombinerError(f"epo.eps: expected > 0, got {eps}")
        self.preference = r
        self.eps = eps
        self.moves = {"bal": 0, "dom": 0, "bal-fallback": 0, "dom-fallback": 0}

    def weights(self, gram, losses):
        a, move = epo_weights(gram, losses, self.preference, eps=self.eps)
        self.moves[move] += 1
        return a, {"move": move}

    def state_dict(self):
        return {**super().state_dict(), "moves": dict(self.moves)}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.moves = {k: int(v) for k, v in state_dict["moves"].items()}


CombinerFactory = Callable[..., Combiner]
COMBINERS: Registry[CombinerFactory] = Registry("combiner", "finetune.combiner")
for _cls in (StaticCombiner, MGDACombiner, ParetoMTLCombiner, EPOCombiner):
    COMBINERS.register(_cls.name, _cls)


def build_combiner(name: str, num_blocks: int, options: dict[str, Any] | None = None) -> Combiner:
    """The combiner ``name`` for ``num_blocks`` blocks, with its options; errors name the option."""
    factory = COMBINERS.get(name)
    try:
        return factory(num_blocks, **(options or {}))
    except TypeError as exc:
        raise CombinerError(f"{name}: bad options {sorted(options or {})} ({exc})") from None
