"""A resume continues only the configuration it was written under (train/fingerprint.py).

Real ``morec train`` jobs on the shared tiny dataset: a finished run resumed with another
learning rate stops before training with one line naming the key and the ways out; an
operational change (logging cadence, exporters) resumes; ``--resume-changed`` continues
and records both configurations and the step at which the second took over, in the new
checkpoints and in metrics.json, and its progress line does not say "exact".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from morec_dist.config import load_config
from morec_dist.train.fingerprint import OPERATIONAL, changed_keys, describe, fingerprint
from tests.conftest import REPO
from tests.e2e_fixtures import CONFIG, quoted, shared_pretrained


def test_only_trajectory_keys_count():
    base = load_config(CONFIG).to_dict()
    operational = load_config(
        CONFIG,
        ["run.out_dir=elsewhere", "train.log_every=7", "metrics.enabled=true", 'coordinator.ray_address="h:1"'],
    ).to_dict()
    assert fingerprint(operational) == fingerprint(base) and changed_keys(base, operational) == {}
    changed = load_config(CONFIG, ["morec.lam=0.9", "morec.epochs=3", "morec.pid.kp=0.5"]).to_dict()
    assert fingerprint(changed) != fingerprint(base)
    changes = changed_keys(base, changed)
    assert changes == {"morec.epochs": [1, 3], "morec.lam": [0.2, 0.9], "morec.pid.kp": [0.05, 0.5]}
    assert describe(changes) == "morec.epochs 1 -> 3, morec.lam 0.2 -> 0.9, morec.pid.kp 0.05 -> 0.5"
    # a key only one side knows (a config of another version) differs too
    older = {**base, "run": {k: v for k, v in base["run"].items() if k != "seed"}}
    assert changed_keys(older, base) == {"run.seed": [None, 3]}


def test_every_operational_key_exists():
    flat = load_config(CONFIG).to_dict()
    for key in OPERATIONAL:
        section, _, name = key.partition(".")
        assert section in flat and (not name or name in flat[section]), key


def train(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = ["train", "--config", CONFIG, quoted("data.path", data), quoted("run.out_dir", out), *args]
    return subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", *command],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_a_changed_configuration_is_refused_unless_told_and_then_recorded(tiny_data, tmp_path, tmp_path_factory):
    # the finished first run: the session's shared pretraining is this very `train` (the
    # same config and data), copied; its recorded paths (metrics.json's checkpoint and
    # config.run.out_dir) name the shared directory, but run.out_dir is operational and a
    # resume finds its checkpoints and writes its outputs under the out_dir it is given
    out = tmp_path / "run"
    shutil.copytree(shared_pretrained(tmp_path_factory).parent.parent, out)
    written = json.loads((out / "metrics.json").read_text())
    this_run = load_config(CONFIG, [quoted("data.path", tiny_data)]).to_dict()
    assert fingerprint(written["config"]) == fingerprint(this_run)
    step = int(checkpoints(out)[-1].split("-")[1])
    assert written["config_history"] == [] and written["config_fingerprint"] == fingerprint(written["config"])

    # another learning rate (and an operational key beside it): refused before training, one line
    refused = train(tiny_data, out, "optim.embedding_lr=0.05", "train.log_every=7")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [ln for ln in refused.stderr.splitlines() if ln.startswith("morec: error:")]
    assert "written under another configuration (optim.embedding_lr 0.1 -> 0.05)" in line, line
    assert "--no-resume" in line and "run.out_dir" in line and "log_every" not in line, line
    assert json.loads((out / "metrics.json").read_text()) == written and checkpoints(out) == [f"step-{step}"]

    # an operational change alone resumes as before (the finished run redoes its final evaluation)
    same = train(tiny_data, out, "train.log_every=7")
    assert same.returncode == 0 and f"at step {step}, epoch 1 (exact)" in same.stderr, same.stderr[-3000:]

    # told: one more epoch under the new rate, recorded
    more = ["optim.embedding_lr=0.05", "train.epochs=2", "train.max_steps=80"]
    changed = train(tiny_data, out, *more, "--resume-changed")
    assert changed.returncode == 0, changed.stderr[-3000:]
    (resumed,) = [ln for ln in changed.stderr.splitlines() if "resuming from" in ln]
    assert "exact" not in resumed and "optim.embedding_lr 0.1 -> 0.05" in resumed, resumed
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["optim"]["embedding_lr"] == 0.05
    (earlier,) = record["config_history"]
    assert earlier["replaced_at_step"] == step and earlier["config"] == written["config"]
    assert earlier["changed"]["optim.embedding_lr"] == [0.1, 0.05]
    assert record["config_fingerprint"] == fingerprint(record["config"]) != earlier["fingerprint"]
    latest = out / "checkpoints" / checkpoints(out)[-1]
    meta = json.loads((latest / "meta.json").read_text())
    assert int(meta["step"]) > step and meta["config_history"] == record["config_history"]

    # resumed again under the new configuration: no refusal, the history stays
    again = train(tiny_data, out, *more)
    assert again.returncode == 0 and "(exact)" in again.stderr, again.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["config_history"] == record["config_history"]
