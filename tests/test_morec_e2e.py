"""MoRec end to end: real torchrun ranks, a real Ray coordinator, real Parquet data.

A tiny MF model is pretrained on a small synthetic dataset, then fine-tuned with MoRec:
two runs with the same seed must agree bit for bit (beta sequence and weights), an extra
objective given only in config must train, and a preference change sent from the CLI to
the live coordinator must take effect at exactly the stated step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import REPO
from tests.e2e_fixtures import CONFIG, finetune, morec, on_ray, quoted, shared_finetune

pytestmark = pytest.mark.slow


def weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    target = tmp / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=True)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def test_same_seed_same_betas_and_weights(pretrained, tiny_data, tmp_path_factory, tmp_path, shared_ray_head):
    # a: the session's shared fine-tuning (step checkpoints every 10 steps, its own embedded Ray
    # head); b: a run of its own, no step checkpoints, its coordinator on the session's head
    shared = shared_finetune(tmp_path_factory)
    a = json.loads((shared / "metrics.json").read_text())
    b = finetune(pretrained, tiny_data, tmp_path / "b", ray=shared_ray_head)
    trace_a, trace_b = a["coordinator"]["trace"], b["coordinator"]["trace"]
    assert len(trace_a["beta"]) == 40
    assert trace_a["beta"] == trace_b["beta"]
    assert trace_a["losses"] == trace_b["losses"]
    assert len(a["coordinator"]["sampler_updates"]) == 4  # every 10 steps
    wa, wb = (
        weights(shared / "checkpoints" / "final", tmp_path),
        weights(tmp_path / "b" / "checkpoints" / "final", tmp_path),
    )
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # the model moved away from the pretrained weights
    w0 = weights(pretrained, tmp_path)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)
    # every rank reported every step: the aggregated row counts are world_size * B per block
    assert all(c == [128] * 4 for c in trace_a["counts"])


def test_fifth_objective_from_config_only_trains(pretrained, tiny_data, tmp_path, shared_ray_head):
    extra = (
        "morec.objectives=["
        '{name="revenue", kind="revenue", group_column="rev_group", weight=0.5},'
        '{name="fairness", kind="fairness", group_column="fair_group", weight=0.2},'
        '{name="alignment", kind="alignment", group_column="align_group", weight=0.2},'
        '{name="price_mix", kind="target_share", group_column="rev_group", weight=0.1, options={k=20}}]'
    )
    result = finetune(pretrained, tiny_data, tmp_path / "five", extra, ray=shared_ray_head)
    trace = result["coordinator"]["trace"]
    assert all(len(row) == 5 for row in trace["losses"])  # accuracy + 4 auxiliary blocks
    updates = result["coordinator"]["sampler_updates"]
    assert updates and "price_mix" in updates[0]["signals"] and len(updates[0]["signals"]["price_mix"]) == 10


def test_preference_change_from_the_cli_applies_at_the_stated_step(pretrained, tiny_data, tmp_path, ray_head):
    out = tmp_path / "prefs"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "morec_dist.cli",
            "finetune",
            "--from",
            str(pretrained),
            "--config",
            CONFIG,
            quoted("data.path", tiny_data),
            quoted("run.out_dir", out),
            quoted("coordinator.ray_address", ray_head),
            "train.max_steps=1300",
            "morec.epochs=3",
            "data.batch_size=16",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "job.log", "w"),
    )
    try:
        status = {}
        deadline = time.time() + 300
        while time.time() < deadline:
            probe = subprocess.run(
                [sys.executable, "-m", "morec_dist.cli", "coordinator", "status", "--address", ray_head],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
                timeout=120,
            )
            if job.poll() is not None:
                break
            if probe.returncode == 0 and '"aggregated_through"' in probe.stdout:
                status = json.loads(probe.stdout)
                if status["aggregated_through"] >= 0:
                    break
            time.sleep(0.5)
        assert status, f"the coordinator never came up:\n{(tmp_path / 'job.log').read_text()[-4000:]}"
        # An ordering fact, not a race: the coordinator refuses a step it may already have
        # decided ("may already be decided (aggregated through N", exit 2), so a refused change
        # is retried ahead of the N it names. The global protocol runs this job at ~100 steps/s
        # here and a CLI call takes seconds: 800 steps ahead is normally accepted at once.
        at_step = min(status["aggregated_through"] + 800, 1200)
        for _ in range(3):
            change = subprocess.run(
                [
                    sys.executable, "-m", "morec_dist.cli", "coordinator", "set-preferences", "--address", ray_head,
                    "--target-loss", "0.05", "--weight", "revenue=0.1", "--at-step", str(at_step),
                ],
                capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
            )  # fmt: skip
            refused = re.search(r"may already be decided \(aggregated through (\d+)", change.stderr)
            if change.returncode == 0 or refused is None:
                break
            at_step = min(int(refused.group(1)) + 800, 1200)
        assert change.returncode == 0, change.stderr[-3000:]
        job.wait(timeout=600)
        assert job.returncode == 0, (tmp_path / "job.log").read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
    result = json.loads((out / "metrics.json").read_text())
    trace = result["coordinator"]["trace"]
    targets = dict(zip(trace["step"], trace["target_loss"], strict=True))
    assert targets[at_step - 1] == pytest.approx(result["target_loss"])
    assert all(targets[s] == 0.05 for s in trace["step"] if s >= at_step)
    assert all(targets[s] == pytest.approx(result["target_loss"]) for s in trace["step"] if s < at_step)
    changes = [h for h in result["coordinator"]["history"] if h.get("effective_step") == at_step]
    assert changes and changes[0]["weights"]["revenue"] == 0.1


def test_objective_kind_from_a_plugin_module_trains_in_every_rank(pretrained, tiny_data, tmp_path):
    """run.plugins imports tests/plugins/long_tail_plugin.py (a new kind + its new signal) in
    the launcher, both torchrun ranks and, through the pickled objective set, the Ray actor."""
    import importlib

    import numpy as np

    from morec_dist.coordinator.objectives import OBJECTIVE_KINDS, Objective
    from morec_dist.coordinator.sampler import sign_gradient_step
    from morec_dist.data.dataset import PreparedDataset

    objectives = (
        "morec.objectives=["
        '{name="revenue", kind="revenue", group_column="rev_group", weight=0.5},'
        '{name="tail_lift", kind="long_tail", group_column="align_group", weight=0.5}]'
    )
    plugins_dir = str(REPO / "tests" / "plugins")
    path = os.pathsep.join([plugins_dir, *filter(None, [os.environ.get("PYTHONPATH")])])
    out = tmp_path / "plugin"
    morec(
        "finetune", "--from", str(pretrained), "--config", CONFIG, quoted("data.path", tiny_data),
        quoted("run.out_dir", out), 'run.plugins=["long_tail_plugin"]', objectives, PYTHONPATH=path,
    )  # fmt: skip
    result = json.loads((out / "metrics.json").read_text())
    assert result["config"]["run"]["plugins"] == ["long_tail_plugin"]
    assert [o["kind"] for o in result["config"]["morec"]["objectives"]] == ["revenue", "long_tail"]
    # the kind's own test metric is evaluated (the test split and every epoch's valid), not only trained
    assert 0.0 <= result["tail_hit@10"] <= 1.0 and all("tail_hit@10" in e["valid"] for e in result["history"])
    coordinator = result["coordinator"]
    updates = coordinator["sampler_updates"]
    assert [u["after_step"] for u in updates] == [9, 19, 29, 39]
    assert all(set(u["signals"]) == {"tail_lift"} and len(u["signals"]["tail_lift"]) == 10 for u in updates)
    # the coordinator's p of tail_lift is exactly the plugin's sign rule applied to the
    # measured heldout_rank signals, from the train share of align_group
    sys.path.insert(0, plugins_dir)
    try:
        importlib.import_module("long_tail_plugin")  # registers long_tail here, as in the ranks
    finally:
        sys.path.remove(plugins_dir)
    kind = OBJECTIVE_KINDS.get("long_tail")
    share = np.asarray(PreparedDataset.open(tiny_data).manifest["groups"]["align_group"]["train_counts"], float)
    p = share / share.sum()
    objective = Objective("tail_lift", "long_tail", 2, "align_group", 10, 0.5, 0.1, {}, tuple(p), True, None)
    for u in updates:
        p = sign_gradient_step(p, kind.sign(objective, np.asarray(u["signals"]["tail_lift"], float)), 0.1)
    final = coordinator["state"]["sampler"]
    assert final["version"] == 4
    np.testing.assert_allclose(final["probabilities"]["tail_lift"], p, rtol=0, atol=1e-12)
    assert np.abs(p - share / share.sum()).max() > 0.05  # the sampler moved it
    assert all(len(row) == 3 for row in coordinator["trace"]["losses"])  # accuracy, revenue, tail_lift


def test_baseline_on_morec_blocks_with_the_authors_tempo(pretrained, tiny_data, tmp_path, shared_ray_head):
    """``--method pareto_mtl`` on 2 ranks: MoRec's sampled blocks and sampler with the combiner
    in place of beta (its weights from the Gram matrix summed over the ranks), the first p
    update before step 0 (``update_at_start``), per-epoch cadence, history-excluding negatives."""
    import numpy as np

    from morec_dist.data.dataset import PreparedDataset

    out = tmp_path / "pareto_mtl"
    morec(
        "finetune", "--from", str(pretrained), "--method", "pareto_mtl", "--config", CONFIG,
        quoted("data.path", tiny_data), quoted("run.out_dir", out), "morec.sampler.update_every_steps=0",
        "morec.sampler.update_at_start=true", "data.negatives_exclude_history=true",
        *on_ray(shared_ray_head, "pareto_mtl"), RAY_AUTH_MODE="token",
    )  # fmt: skip
    result = json.loads((out / "metrics.json").read_text())
    assert result["job"] == "finetune:pareto_mtl" and result["world_size"] == 2
    updates = result["coordinator"]["sampler_updates"]
    assert updates[0]["after_step"] == -1 and updates[0]["version"] == 0
    assert all(u["after_step"] >= 39 for u in updates[1:])  # per epoch: none inside the 40 steps
    # version 0 is already one step away from the initial p (the train share of the groups)
    share = np.asarray(PreparedDataset.open(tiny_data).manifest["groups"]["fair_group"]["train_counts"], float)
    version0 = np.asarray(result["coordinator"]["state"]["versions"][0][1]["fairness"])
    assert np.abs(version0 - share / share.sum()).max() > 1e-3
    weights = result["history"][-1]["pareto_mtl_mean_weights"]
    assert len(weights) == 4 and np.isfinite(weights).all()
    assert 0 < np.abs(weights).sum() <= 1 + 1e-9  # the mean of weights of unit absolute sum
