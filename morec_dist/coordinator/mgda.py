"""The MGDA baseline: the min-norm point of the convex hull of per-objective gradients.

MGDA (Désidéri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018) steps along d = sum_k a_k g_k with

    a = argmin_{a in simplex} || sum_k a_k g_k ||^2,

a common descent direction of every objective (or 0 at a Pareto-stationary point). The
solver works on the Gram matrix M = G G^T only (K x K), so it is cheap for any model size:

- K = 1: a = [1];  K = 2: the closed form a_1 = clip(((g2 - g1) . g2) / ||g1 - g2||^2, 0, 1);
- K >= 3: Frank-Wolfe as in Sener & Koltun (Algorithm 2: start uniform, move toward the
  vertex e_t minimising (M a)_t with an exact line search), plus *away steps*
  (Lacoste-Julien & Jaggi 2015: move weight off the worst vertex in use), which makes it
  converge linearly on the simplex instead of zig-zagging; it stops when the Frank-Wolfe
  duality gap a^T M a - min_t (M a)_t <= tol * max_t M_tt.

All arithmetic in float64. The trainer supplies the per-objective gradients (flattened over
the parameters it chooses: the dense parameters, or the shared representation as in
MGDA-UB) and applies ``sum_k a_k L_k``.
"""

from __future__ import annotations

import numpy as np
import torch


def line_min_norm(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2 given a.a, a.b, b.b; and that norm^2."""
    if v12 >= v11:  # a is the minimiser: moving toward b cannot shorten it
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    denom = v11 + v22 - 2.0 * v12
    gamma = (v22 - v12) / denom
    cost = v22 + gamma * (v12 - v22)
    return gamma, cost


def min_norm_weights(gram: np.ndarray | torch.Tensor, *, max_iter: int = 2000, tol: float = 1e-12) -> np.ndarray:
    """The simplex weights of the min-norm element, from the Gram matrix of the gradients."""
    m = np.asarray(gram.detach().cpu() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"MGDA: expected a non-empty square Gram matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("MGDA: the Gram matrix has non-finite entries (a gradient overflowed?)")
    k = m.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        gamma, _ = line_min_norm(m[0, 0], m[0, 1], m[1, 1])
        return np.array([gamma, 1.0 - gamma])
    a = np.full(k, 1.0 / k)
    scale = max(float(np.max(np.abs(np.diag(m)))), 1e-300)
    for _ in range(max_iter):
        ma = m @ a
        value = float(a @ ma)
        toward = int(np.argmin(ma))  # Frank-Wolfe vertex
        gap = value - float(ma[toward])  # Frank-Wolfe duality gap, >= 0
        if gap <= tol * scale:
            break
        support = np.flatnonzero(a > 0)
        away = int(support[np.argmax(ma[support])])
        if gap >= float(ma[away]) - value or a[away] >= 1.0:
            direction = -a.copy()
            direction[toward] += 1.0
            step_max = 1.0
        else:  # move weight off the worst vertex in use
            direction = a.copy()
            direction[away] -= 1.0
            step_max = a[away] / (1.0 - a[away])
        curvature = float(direction @ m @ direction)
        slope = float(direction @ ma)
        step = step_max if curvature <= 0 else min(max(-slope / curvature, 0.0), step_max)
        if step <= 0:
            break
        a = a + step * direction
        a[np.abs(a) < 1e-18] = 0.0
        a = np.maximum(a, 0.0)
        a /= a.sum()
    return a


def mgda_weights(grads: torch.Tensor, *, max_iter: int = 2000, tol: float = 1e-12) -> torch.Tensor:
    """Weights a (shape [K]) from per-objective gradients stacked as [K, D]."""
    if grads.dim() != 2:
        raise ValueError(f"MGDA: expected gradients of shape [K, D], got {tuple(grads.shape)}")
    g = grads.detach().to(torch.float64)
    a = min_norm_weights((g @ g.T).cpu().numpy(), max_iter=max_iter, tol=tol)
    return torch.as_tensor(a, dtype=grads.dtype, device=grads.device)
