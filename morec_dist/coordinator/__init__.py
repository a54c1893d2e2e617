"""The MoRec coordinator: PID on the global accuracy loss, adaptive group samplers, the
objective registry, the combined loss and MGDA; a Ray-free core, its Ray actor and the
rank-side clients with the bounded-staleness protocol: the global one (losses reduced over
torch.distributed, one actor client, ``collective.py``) and the per-rank baseline
(``client.py``); see docs/coordinator.md."""

from morec_dist.coordinator.combined_loss import block_means, block_sums, combined_loss
from morec_dist.coordinator.core import (
    CoordinatorCore,
    CoordinatorError,
    CoordinatorSpec,
    Decision,
    DecisionNotReady,
    PreferenceChange,
    build_spec,
)
from morec_dist.coordinator.mgda import mgda_weights, min_norm_weights
from morec_dist.coordinator.objectives import (
    ACCURACY,
    OBJECTIVE_KINDS,
    Objective,
    ObjectiveError,
    ObjectiveKind,
    ObjectiveSet,
    SignalRequest,
    build_objectives,
    register_objective_kind,
)
from morec_dist.coordinator.pid import PIDController, PIDGains
from morec_dist.coordinator.sampler import GroupStats, SamplerState, sign_gradient_step

__all__ = [
    "ACCURACY",
    "CoordinatorCore",
    "CoordinatorError",
    "CoordinatorSpec",
    "Decision",
    "DecisionNotReady",
    "GroupStats",
    "Objective",
    "OBJECTIVE_KINDS",
    "ObjectiveError",
    "ObjectiveKind",
    "ObjectiveSet",
    "PIDController",
    "PIDGains",
    "PreferenceChange",
    "SamplerState",
    "SignalRequest",
    "block_means",
    "block_sums",
    "build_objectives",
    "build_spec",
    "combined_loss",
    "mgda_weights",
    "register_objective_kind",
    "min_norm_weights",
    "sign_gradient_step",
]
