"""What a step checkpoint holds of a job, without starting ranks: the job's ``JobState`` and
every strategy round-trip through JSON exactly as ``resume.py`` writes them, a missing or
unknown key is an error (a renamed field can never silently drop out of checkpoints), a
resharded resume restarts only the rank-local running sums, ``prune_checkpoints`` removes
crash leftovers, and the method registry is the one list of method names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from morec_dist.coordinator.client import RankClient
from morec_dist.train.checkpoint import CheckpointError, complete_checkpoints, prune_checkpoints
from morec_dist.train.job_state import JobState
from morec_dist.train.methods import METHODS, Method, check_methods
from morec_dist.train.resume import strategy_state_for
from morec_dist.train.strategies import AccuracyOnly, CombinerStrategy, MGDAStrategy, MorecStrategy, StaticWeighting
from tests.conftest import REPO

# a strategy's state round trip never calls its coordinator client
NO_CLIENT = cast(RankClient, None)

METHOD_NAMES = ["morec", "static", "mgda", "pareto_mtl", "epo", "static_uniform", "mgda_uniform"]


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_job_state_round_trips_and_refuses_other_keys() -> None:
    state = JobState(next_epoch=3, history=[{"epoch": 0, "valid": {"ndcg@5": 0.1}}], stale=1, train_rows=640)
    state.best = state.history[0]
    state.train_seconds = 2.5
    back = JobState()
    back.load_state_dict(through_json(state.state_dict()))
    assert back == state
    saved = state.state_dict()
    renamed = {("patience" if k == "stale" else k): v for k, v in saved.items()}
    with pytest.raises(CheckpointError, match=r"missing keys \['stale'\], unknown keys \['patience'\]"):
        JobState().load_state_dict(renamed)
    with pytest.raises(CheckpointError, match="missing keys"):
        JobState().load_state_dict({k: v for k, v in saved.items() if k != "before"})


@pytest.fixture(scope="module")
def objectives():
    from morec_dist.config import Config

    return Config().morec.objectives


def trained_static(dataset, objectives) -> StaticWeighting:
    s = StaticWeighting(dataset, objectives, [1.0, 0.5, 0.25, 0.25])
    s.sums += torch.tensor([0.7, 0.1, 0.2, 0.3], dtype=torch.float64)
    s.steps = 4
    return s


def test_strategies_round_trip_and_refuse_other_keys(small_synthetic, objectives) -> None:
    from morec_dist.data.dataset import PreparedDataset

    dataset = PreparedDataset.open(small_synthetic, verify_checksums=False, verify_values=False)
    static = trained_static(dataset, objectives)
    back = StaticWeighting(dataset, objectives, [1.0, 0.5, 0.25, 0.25])
    back.load_state_dict(through_json(static.state_dict()))
    assert torch.equal(back.sums, static.sums) and back.steps == 4
    mgda = MGDAStrategy(dataset, objectives)
    mgda.alpha_sums += 0.25
    mgda.steps = 2
    mgda.step_weights = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]
    back_mgda = MGDAStrategy(dataset, objectives)
    back_mgda.load_state_dict(through_json(mgda.state_dict()))
    assert torch.equal(back_mgda.alpha_sums, mgda.alpha_sums) and back_mgda.steps == 2
    assert back_mgda.step_weights == mgda.step_weights
    morec = MorecStrategy(NO_CLIENT, SimpleNamespace(objectives=[]), 1, 0, None, submits=True)
    morec.trace = [(0, 1.0, 0), (1, 0.9375, 1)]
    morec.sampler_updates = [{"after_step": 1, "version": 1, "signals": {"revenue": [0.5, 0.5]}}]
    back_morec = MorecStrategy(NO_CLIENT, SimpleNamespace(objectives=[]), 1, 0, None, submits=True)
    back_morec.load_state_dict(through_json(morec.state_dict()))
    assert back_morec.trace == morec.trace and back_morec.sampler_updates == morec.sampler_updates
    AccuracyOnly().load_state_dict({})
    for strategy in (static, mgda, morec, AccuracyOnly()):
        state = strategy.state_dict()
        with pytest.raises(CheckpointError, match="unknown keys"):
            strategy.load_state_dict({**state, "renamed_field": 0})
        for key in state:
            with pytest.raises(CheckpointError, match=f"missing keys \\['{key}'\\]"):
                strategy.load_state_dict({k: v for k, v in state.items() if k != key})


def drive(combiner, steps: int, seed: int) -> list[list[float]]:
    """``steps`` real combine steps on random block losses of shared scores: the weights used."""
    g = torch.Generator().manual_seed(seed)
    used = []
    for _ in range(steps):
        scores = torch.randn(12, 3, generator=g, requires_grad=True)
        blocks = torch.arange(12) % combiner.num_blocks
        per_row = torch.nn.functional.softplus(scores[:, 1:] - scores[:, :1]).mean(1) * (1 + blocks)
        means = torch.stack([per_row[blocks == b].mean() for b in range(combiner.num_blocks)])
        used.append(combiner.combine(means, scores)[1]["weights"])
    return used


@pytest.mark.parametrize("name", ["static", "mgda", "pareto_mtl", "epo"])
def test_combiner_strategies_resume_exactly(name) -> None:
    """A baseline on MoRec's blocks (``CombinerStrategy``): its state (the coordinator's lists
    and the combiner's: phases, move counts, running weight sums) round-trips through JSON, and
    the restored strategy continues with exactly the weights the uninterrupted one uses."""
    from morec_dist.config import Config
    from morec_dist.coordinator.baselines import build_combiner
    from morec_dist.train.methods import combiner_options

    config = Config()

    def strategy() -> CombinerStrategy:
        combiner = build_combiner(name, 4, combiner_options(name, config))
        return CombinerStrategy(combiner, None, SimpleNamespace(objectives=[]), 4, 0, None, submits=True)

    first = strategy()
    drive(first.combiner, 3, seed=1)
    first.trace = [(0, 0.125, 0), (1, 0.125, 1)]
    first.sampler_updates = [{"after_step": -1, "version": 0, "signals": {"revenue": [0.5, 0.5]}}]
    saved = through_json(first.state_dict())
    back = strategy()
    back.load_state_dict(saved)
    assert back.state_dict() == first.state_dict()
    assert drive(back.combiner, 3, seed=2) == drive(first.combiner, 3, seed=2)
    assert back.state_dict() == first.state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys \['combiner'\]"):
        strategy().load_state_dict({k: v for k, v in saved.items() if k != "combiner"})


def test_static_weights_are_morec_at_beta_one() -> None:
    from morec_dist.config import Config
    from morec_dist.train.methods import combiner_options

    c = Config()
    assert combiner_options("static", c) == {"weights": [1.0, 0.2 * 0.6, 0.2 * 0.2, 0.2 * 0.2]}
    assert combiner_options("epo", c)["preference"] == [1.0, 0.2 * 0.6, 0.2 * 0.2, 0.2 * 0.2]
    pmtl = combiner_options("pareto_mtl", c)
    assert pmtl["preference_id"] == 0 and pmtl["preferences"][0] == [1.0, 0.2 * 0.6, 0.2 * 0.2, 0.2 * 0.2]


def test_resharded_resume_restarts_only_rank_local_sums(small_synthetic, objectives) -> None:
    from morec_dist.data.dataset import PreparedDataset

    dataset = PreparedDataset.open(small_synthetic, verify_checksums=False, verify_values=False)
    saved = trained_static(dataset, objectives).state_dict()
    fresh = StaticWeighting(dataset, objectives, [1.0, 0.5, 0.25, 0.25])
    assert strategy_state_for(saved, fresh, same_world=True) == saved
    assert strategy_state_for(saved, fresh, same_world=False) == {"sums": [0.0] * 4, "steps": 0}
    morec = MorecStrategy(NO_CLIENT, SimpleNamespace(objectives=[]), 1, 0, None, submits=True)
    kept = {"sampler_updates": [{"after_step": 9}], "trace": [[0, 1.0, 0]]}
    assert strategy_state_for(kept, morec, same_world=False) == kept  # rank 0's lists are the job's


def test_prune_removes_crash_leftovers_of_older_steps(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-10", "step-20", "step-30"):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text("{}")
    for name in ("step-15.tmp", "step-20.old", "step-40.tmp"):
        (root / name).mkdir()
    gone = prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in gone) == ["step-10", "step-15.tmp", "step-20.old"]
    assert sorted(p.name for p in root.iterdir()) == ["step-20", "step-30", "step-40.tmp"]
    assert [s for s, _ in complete_checkpoints(root)] == [20, 30]


def test_method_registry_is_the_one_list_of_names() -> None:
    from morec_dist.cli import build_parser

    assert METHODS.names() == METHOD_NAMES
    assert METHODS.get("morec").coordinated and METHODS.get("static").coordinated
    assert not METHODS.get("static_uniform").coordinated
    check_methods(["static", "mgda", "pareto_mtl", "epo", "static_uniform", "mgda_uniform"])
    names = re.escape(str(METHOD_NAMES))
    with pytest.raises(ValueError, match=f"run.methods: 'pareto' is not one of {names}"):
        check_methods(["morec", "pareto"])
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("static", Method(METHODS.get("static").build))
    parser: Any = build_parser()  # argparse keeps subparsers in private, loosely typed fields
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    method = next(a for a in finetune._actions if a.dest == "method")
    assert list(method.choices) == METHODS.names()


def test_unknown_methods_exit_2_with_one_line(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", "run", 'run.methods=["morec", "pareto"]', f'run.out_dir="{tmp_path}"'],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (f"morec run: error: run.methods: 'pareto' is not one of {METHOD_NAMES}"), run.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_update_at_start_is_one_sampler_step_as_version_zero(small_synthetic) -> None:
    """``morec.sampler.update_at_start``: version 0 of the coordinator is exactly the
    distribution its first regular update would make from the same signals; the cadence
    after it is unchanged (per epoch: due after the epoch's last step)."""
    import numpy as np

    from morec_dist.config import Config
    from morec_dist.coordinator.core import CoordinatorCore, build_spec
    from morec_dist.coordinator.sampler import GroupStats
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.train.coordinator_session import start_probabilities

    dataset = PreparedDataset.open(small_synthetic, verify_checksums=False, verify_values=False)
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    spec = build_spec(Config(), stats, world_size=1, target_loss=0.3, steps_per_epoch=25, law="paper")
    rng = np.random.default_rng(0)
    signals = {r.objective: rng.random(r.num_groups).tolist() for r in spec.objectives.signal_requests()}
    assert signals, "the reference objectives have adaptive ones"
    regular = CoordinatorCore(spec)
    assert regular.next_due == 24  # update_every_steps = 0: after the last step of each epoch
    regular.submit_signals(24, signals)
    started = CoordinatorCore(start_probabilities(spec, signals))
    for name, p in regular.versions[1][1].items():  # the core renormalises an initial p: last-bit differences
        np.testing.assert_allclose(started.versions[0][1][name], p, rtol=1e-12, atol=0)
    assert started.versions[0][1] != regular.versions[0][1]
    assert started.next_due == 24 and len(started.versions) == 1
