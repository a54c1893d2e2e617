"""The MoRec coordinator: PID on the global accuracy loss, adaptive group samplers, the
objective registry, the combined loss and MGDA; a Ray-free core, its Ray actor and the
rank-side clients with the bounded-staleness protocol: the global one (losses reduced over
torch.distributed, one actor client, ``collective.py``) and the per-rank baseline
(``client.py``); see docs/coordinator.md."""

# Loaded on first use (PEP 562): importing a submodule such as ``coordinator.service`` (the
# CLI's launcher process does) must not pay for torch, which only the ranks and the actor need.
import importlib
from typing import Any

_EXPORTS = {
    "ACCURACY": "morec_dist.coordinator.objectives",
    "CoordinatorCore": "morec_dist.coordinator.core",
    "CoordinatorError": "morec_dist.coordinator.core",
    "CoordinatorSpec": "morec_dist.coordinator.core",
    "Decision": "morec_dist.coordinator.core",
    "DecisionNotReady": "morec_dist.coordinator.core",
    "GroupStats": "morec_dist.coordinator.sampler",
    "OBJECTIVE_KINDS": "morec_dist.coordinator.objectives",
    "Objective": "morec_dist.coordinator.objectives",
    "ObjectiveError": "morec_dist.coordinator.objectives",
    "ObjectiveKind": "morec_dist.coordinator.objectives",
    "ObjectiveSet": "morec_dist.coordinator.objectives",
    "PIDController": "morec_dist.coordinator.pid",
    "PIDGains": "morec_dist.coordinator.pid",
    "PreferenceChange": "morec_dist.coordinator.core",
    "SamplerState": "morec_dist.coordinator.sampler",
    "SignalRequest": "morec_dist.coordinator.objectives",
    "block_means": "morec_dist.coordinator.combined_loss",
    "block_sums": "morec_dist.coordinator.combined_loss",
    "build_objectives": "morec_dist.coordinator.objectives",
    "build_spec": "morec_dist.coordinator.core",
    "combined_loss": "morec_dist.coordinator.combined_loss",
    "mgda_weights": "morec_dist.coordinator.mgda",
    "min_norm_weights": "morec_dist.coordinator.mgda",
    "register_objective_kind": "morec_dist.coordinator.objectives",
    "sign_gradient_step": "morec_dist.coordinator.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
