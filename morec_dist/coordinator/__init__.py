"""The MoRec coordinator: PID on the global accuracy loss, adaptive group samplers, the
objective registry, the combined loss and MGDA; a Ray-free core, its Ray actor and the
rank-side clients with the bounded-staleness protocol: the global one (losses reduced over
torch.distributed, one actor client, ``collective.py``) and the per-rank baseline
(``client.py``); see docs/coordinator.md."""

from morec_dist.lazy import lazy_exports

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

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)  # loaded on first use: see morec_dist/lazy.py
