"""Loss weights of the Pareto baselines from a Gram matrix and a loss vector (numpy, float64).

Every solver here sees only ``gram = G G^T`` (m x m, G the per-objective gradients) and the
loss vector ``l`` (m), so its cost does not depend on the model size and ranks holding
disjoint rows can sum their local Gram matrices first.

- ``pareto_mtl_weights``: ParetoMTL (Lin, Zhen, Li, Zhang, Kwong, "Pareto Multi-Task
  Learning", NeurIPS 2019). With preference vectors u_1..u_P and the chosen one u_i, the
  sub-problem is ``min F(x)`` subject to ``(u_j - u_i)^T F(x) / |F(x)| <= 0`` for all j (x stays
  in u_i's sub-region). Initial phase: descend on the active constraints alone until the
  point is feasible. Main phase: the min-norm element of the objective gradients together
  with the active constraints' gradients (``(u_j - u_i)^T G``); the loss weights are
  ``sol[:m] + sol[m:] @ W_active``, normalised to unit absolute sum (they may be negative),
  as in the authors' code and in microsoft/UniRec ``ParetoMTLSolver``.
- ``epo_weights``: EPO search (Mahapatra & Rajan, "Multi-Task Learning with User
  Preferences: Gradient Descent with Controlled Ascent in Pareto Optimization", ICML 2020).
  With ``rl = r * l`` and ``l_hat = rl / sum(rl)``, the non-uniformity is
  ``mu = KL(l_hat || 1/m)``. If ``mu > eps`` the "balance" LP moves toward the preference ray
  ``r * l = const``; otherwise the "dominance" LP descends every objective. Both are LPs over
  the simplex in m variables, solved exactly by vertex enumeration (``simplex_lp``); no LP
  library is needed. UniRec's ``EPOSolver`` squares the Gram matrix once more (it passes
  ``G G^T`` where the original code expects G): here ``C = G G^T`` as in the paper.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from morec_dist.coordinator.mgda import min_norm_weights

# The authors' preference sets (microsoft/UniRec ParetoMTLSolver._generate_fixed_pref_vectors)
UNIREC_PREFERENCES = {
    2: [[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]],
    3: [
        [0.8, 0.1, 0.1],
        [0.6, 0.2, 0.2],
        [0.4, 0.3, 0.3],
        [0.3, 0.4, 0.3],
        [0.3, 0.3, 0.4],
        [0.2, 0.6, 0.2],
        [0.2, 0.2, 0.6],
        [0.1, 0.8, 0.1],
        [0.1, 0.1, 0.8],
    ],
}


# The augmented min-norm problems of ParetoMTL are degenerate (more vectors than dimensions
# once the point is on the Pareto set), where Frank-Wolfe converges sublinearly: cap it as the
# authors' solver does (MinNormSolver.MAX_ITER = 250) at a gap well below the steps' noise.
MIN_NORM_MAX_ITER, MIN_NORM_TOL = 250, 1e-8


def _min_norm(gram: np.ndarray) -> np.ndarray:
    return min_norm_weights(gram, max_iter=MIN_NORM_MAX_ITER, tol=MIN_NORM_TOL)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm: ParetoMTL's sub-regions are cones of directions.

    Why: the constraint ``(u_j - u_i)^T F <= 0`` says u_i is the preference that maximises
    ``u^T F``. For unit vectors that is the one at the smallest angle to F, a proper cone per
    vector (Lin et al.). For vectors on the simplex, as in UniRec's fixed sets, ``u^T F`` is
    linear along the simplex, so in 2-D only the two end vectors get a region with interior
    and every middle one is confined to the line l_1 = l_2 (found by this module's tests).
    """
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms <= 0).any():
        raise ValueError("ParetoMTL: a preference vector is all zeros")
    return vectors / norms


def preference_vectors(m: int) -> np.ndarray:
    """Default ParetoMTL preference set for m objectives: unit vectors in the positive orthant.

    m = 2: 5 directions evenly spread over the quarter circle (Lin et al. 2019; UniRec's
    ``_generate_pref_vectors_2_task``). m = 3: the authors' fixed set, scaled to unit norm.
    Otherwise (UniRec raises there) the interior points of the Das-Dennis lattice with m + 2
    divisions (every entry >= 1 / (m + 2), so no vector ignores an objective), unit norm.
    """
    if m < 2:
        raise ValueError(f"ParetoMTL: needs at least 2 objectives, got {m}")
    if m == 2:
        angles = np.linspace(0.0, np.pi / 2, 5)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if m in UNIREC_PREFERENCES:
        return unit_rows(np.asarray(UNIREC_PREFERENCES[m], dtype=np.float64))
    h = m + 2
    points = [c for c in itertools.product(range(1, h), repeat=m) if sum(c) == h]
    return unit_rows(np.asarray(points, dtype=np.float64))


def _check(gram: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gram, dtype=np.float64)
    v = np.asarray(losses, dtype=np.float64)
    m = v.shape[0] if v.ndim == 1 else -1
    if g.shape != (m, m):
        raise ValueError(f"expected a loss vector [m] and a Gram matrix [m, m], got {v.shape} and {g.shape}")
    if not (np.isfinite(g).all() and np.isfinite(v).all()):
        raise ValueError("non-finite losses or gradients")
    return g, v


def pareto_mtl_constraints(losses: np.ndarray, preferences: np.ndarray, pref_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(W = u_j - u_i for all j, active mask ``W l / |l| > 0``): the sub-region's constraints."""
    w = preferences - preferences[pref_id]
    norm = float(np.linalg.norm(losses))
    gx = w @ (losses / norm) if norm > 0 else np.zeros(len(w))
    return w, gx > 0


def pareto_mtl_weights(
    gram: np.ndarray, losses: np.ndarray, preferences: np.ndarray, pref_id: int, *, initial: bool
) -> tuple[np.ndarray, bool]:
    """(loss weights [m], feasible): one ParetoMTL step. ``initial``: the feasibility phase.

    In the initial phase a feasible point (no active constraint) returns ``feasible = True``
    and the main-phase weights, so no step is wasted (the authors' code returns zero weights
    there, skipping one step).
    """
    g, v = _check(gram, losses)
    m = len(v)
    if preferences.shape[1] != m or not 0 <= pref_id < len(preferences):
        raise ValueError(f"ParetoMTL: preferences {preferences.shape} / pref_id {pref_id} do not fit {m} objectives")
    w, active = pareto_mtl_constraints(v, preferences, pref_id)
    wa = w[active]
    if initial and active.any():
        sol = np.ones(1) if len(wa) == 1 else _min_norm(wa @ g @ wa.T)
        return sol @ wa, False
    if not active.any():
        return _min_norm(g), True
    a = np.vstack([np.eye(m), wa])  # the m objective gradients, then the active constraints'
    sol = _min_norm(a @ g @ a.T)
    weights = sol[:m] + sol[m:] @ wa
    return weights / (np.abs(weights).sum() + 1e-12), True


# ------------------------------------------------------------------------------ EPO


def simplex_lp(
    c: np.ndarray, a_ge: np.ndarray | None = None, b_ge: np.ndarray | None = None
) -> tuple[np.ndarray, float] | None:
    """max c^T x over {x >= 0, sum x = 1, a_ge x >= b_ge}, exactly; None if infeasible.

    Vertex enumeration: a vertex has m linearly independent active constraints, the equality
    and m - 1 of the inequalities. For the m <= 8 objectives here that is a few hundred tiny
    solves; ties go to the first vertex found, so the answer is deterministic.
    """
    m = len(c)
    rows = [np.eye(m)] + ([np.asarray(a_ge, dtype=np.float64)] if a_ge is not None and len(a_ge) else [])
    rhs = [np.zeros(m)] + ([np.asarray(b_ge, dtype=np.float64)] if b_ge is not None and len(b_ge) else [])
    a_all, b_all = np.vstack(rows), np.concatenate(rhs)
    finite = np.isfinite(b_all)  # -inf: no constraint
    a_all, b_all = a_all[finite], b_all[finite]
    scale = max(1.0, float(np.abs(a_all).max(initial=0.0)))
    tol = 1e-9 * scale
    best: tuple[np.ndarray, float] | None = None
    for subset in itertools.combinations(range(len(a_all)), m - 1):
        system = np.vstack([np.ones((1, m)), a_all[list(subset)]])
        if abs(np.linalg.det(system)) < 1e-12:
            continue
        x = np.linalg.solve(system, np.concatenate([[1.0], b_all[list(subset)]]))
        if (a_all @ x < b_all - tol).any():
            continue
        value = float(c @ x)
        if best is None or value > best[1] + 1e-12:
            best = (np.maximum(x, 0.0) / max(np.maximum(x, 0.0).sum(), 1e-300), value)
    return best


def non_uniformity(rl: np.ndarray) -> float:
    """mu(rl) = KL(l_hat || uniform), l_hat = rl / sum(rl)."""
    if (rl < 0).any():
        raise ValueError(f"EPO: r * l must be >= 0, got {rl}")
    l_hat = rl / rl.sum()
    l_hat = l_hat[l_hat > np.finfo(np.float64).eps]
    return float(np.sum(l_hat * np.log(l_hat * len(rl))))


def epo_weights(
    gram: np.ndarray, losses: np.ndarray, preference: np.ndarray, *, eps: float = 1e-4
) -> tuple[np.ndarray, str]:
    """(loss weights [m], summing to m; the move: "bal" or "dom"): one EPO search step.

    Losses must be > 0 (the ray r * l = const is defined for positive losses); the weights
    are the simplex solution alpha times m, as in the authors' code. If an LP is infeasible
    (only from rounding at a degenerate point) the normalised preference is used, as in UniRec.
    """
    g, v = _check(gram, losses)
    r = np.asarray(preference, dtype=np.float64)
    m = len(v)
    if r.shape != (m,) or (r <= 0).any():
        raise ValueError(f"EPO: the preference must be {m} positive numbers, got {preference}")
    v = np.maximum(v, 1e-12)
    rl = r * v
    mu = non_uniformity(rl)
    l_hat = rl / rl.sum()
    adjust = r * (np.log(l_hat * m) - mu)  # the direction that balances r * l
    ca = g @ adjust
    if mu > eps:
        move = "bal"
        rhs = ca.copy()
        positive = ca > 0
        if positive.any():
            rhs[positive] = -np.inf  # objectives the balancing direction already decreases
            rhs[rl == rl.max()] = 0.0  # the worst objective relative to r must not increase
        else:
            rhs[:] = 0.0
        solution = simplex_lp(ca, g, rhs)
    else:
        move = "dom"
        solution = simplex_lp(
            g.sum(axis=0), np.vstack([ca[None, :], g]), np.concatenate([[min(ca.max(), 0.0)], np.zeros(m)])
        )
    if solution is None:
        return r / r.sum() * m, move + "-fallback"
    return solution[0] * m, move


def is_close_to_ray(losses: np.ndarray, preference: np.ndarray, tol: float) -> bool:
    """Whether r * l is uniform to within a relative ``tol`` (the EPO target)."""
    rl = np.asarray(preference, dtype=np.float64) * np.asarray(losses, dtype=np.float64)
    return bool((rl.max() - rl.min()) <= tol * rl.mean()) and math.isfinite(rl.sum())
