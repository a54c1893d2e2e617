"""The job runner with K from config: a real 1-rank pretraining and a static_uniform fine-tune on a
tiny synthetic dataset with ``eval.ks = [5, 20]``; every record (per-epoch validation,
test, the most-popular baseline, the selected epoch) carries @5 and @20 metrics and no
@10, and selection runs on NDCG@5 (``eval.ks[0]``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "configs" / "tiny.toml")
pytestmark = pytest.mark.slow
KS = ("eval.ks=[5, 20]", "train.max_steps=12", "morec.epochs=1")


def morec(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", *args, "--nproc", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=REPO,
    )
    assert proc.returncode == 0, f"morec {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def has_ks(metrics: dict) -> None:
    for name in ("hit", "ndcg", "r_hit", "r_ndcg", "min_hit", "min_ndcg", "pop_kl"):
        assert f"{name}@5" in metrics and f"{name}@20" in metrics, name
        assert f"{name}@10" not in metrics, name


def test_records_carry_the_configured_ks(tmp_path: Path) -> None:
    from morec_dist.data.prepare.synthetic import generate

    data = generate(tmp_path / "data", users=200, items=150, rows=12_000, seed=5)
    pre = tmp_path / "pretrain"
    proc = morec("train", "--config", CONFIG, f'data.path="{data}"', f'run.out_dir="{pre}"', *KS)
    assert "valid ndcg@5" in proc.stderr and "test hit@5" in proc.stderr
    m = json.loads((pre / "metrics.json").read_text())
    has_ks(m)
    has_ks(m["baselines"]["most_popular"])
    has_ks(m["valid"])
    assert all(set(row["valid"]) == set(m["valid"]) for row in m["history"])
    out = tmp_path / "static"
    proc = morec(
        "finetune",
        "--from",
        str(pre / "checkpoints" / "best"),
        "--method",
        "static_uniform",
        "--config",
        CONFIG,
        f'data.path="{data}"',
        f'run.out_dir="{out}"',
        *KS,
    )
    assert "[static_uniform] test hit@5" in proc.stderr
    f = json.loads((out / "metrics.json").read_text())
    has_ks(f)
    has_ks(f["valid_before"])
    has_ks(f["history"][0]["valid"])
    assert f["job"] == "finetune:static_uniform" and f["checkpoints_written"]
