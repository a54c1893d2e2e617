"""The tiny end-to-end fixtures shared by the MoRec test modules (loaded by conftest.py).

``tiny_data`` is a small synthetic dataset and ``pretrained`` the best checkpoint of a real
``morec train`` on it; ``morec``, ``quoted`` and ``finetune`` drive the CLI as a user would.
Both are made once per session (``shared_data`` / ``shared_pretrained``, under the session's
base temp dir), as is the default fine-tuning of that checkpoint (``shared_finetune``), and
read by every module: the tests copy before they change anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.procs import run_job

CONFIG = str(REPO / "tests" / "configs" / "tiny.toml")


def morec(*args: str, timeout: int = 600, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env_extra}
    proc = run_job([sys.executable, "-m", "morec_dist.cli", *args], timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"morec {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def quoted(key: str, value: object) -> str:
    return f'{key}="{value}"'


def on_ray(address: str, namespace: str) -> list[str]:
    """Overrides that coordinate a job on the Ray head at ``address`` (conftest's
    ``shared_ray_head``) in a namespace of its own; run it with ``RAY_AUTH_MODE="token"``."""
    return [quoted("coordinator.ray_address", address), quoted("coordinator.namespace", namespace)]


def shared_dir(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / f"shared-{name}"


def shared_data(tmp_path_factory) -> Path:
    from morec_dist.data.prepare.synthetic import generate

    path = shared_dir(tmp_path_factory, "data")
    if not (path / "manifest.json").exists():
        generate(path, users=400, items=300, rows=40_000, seed=11, overwrite=True)
    return path


def shared_pretrained(tmp_path_factory) -> Path:
    """The best checkpoint of a plain ``morec train`` of the tiny config on the shared data.

    It logs every 20 steps (an operational key) and keeps what it printed, stdout then
    stderr, in ``shared_pretrain_output``: test_quiet reads its progress lines and the
    absence of library noise there. Library warnings are filtered as a user's run filters
    them (whatever the session's ``MOREC_LIBRARY_WARNINGS`` or ``PYTHONWARNINGS`` say);
    ``OMP_NUM_THREADS`` stays as the session has it, as in the runs other tests compare
    with this one bit for bit (test_quiet's unfiltered run checks the launcher's default)."""
    data = shared_data(tmp_path_factory)
    out = shared_dir(tmp_path_factory, "pretrain")
    printed = shared_pretrain_output(tmp_path_factory)
    if not ((out / "metrics.json").exists() and printed.exists()):
        shutil.rmtree(out, ignore_errors=True)
        proc = morec(
            "train",
            "--config",
            CONFIG,
            quoted("data.path", data),
            quoted("run.out_dir", out),
            "train.log_every=20",
            MOREC_LIBRARY_WARNINGS="",  # observe.quiet.SHOW_ALL_ENV, off
            PYTHONWARNINGS="",
        )
        printed.write_text(proc.stdout + proc.stderr)
    return out / "checkpoints" / "best"


def shared_pretrain_output(tmp_path_factory) -> Path:
    """What the shared pretraining printed (beside its run directory, not in it: tests copy it)."""
    return shared_dir(tmp_path_factory, "pretrain-output.txt")


def shared_finetune(tmp_path_factory) -> Path:
    """The default MoRec fine-tuning of the shared pretraining (2 ranks), made once per
    session: the uninterrupted reference of the resume, fault and multi-host tests and one of
    the same-seed pair. It checkpoints every 10 steps, an operational key: the trajectory is
    the default run's (test_morec_e2e compares it with a run that writes none)."""
    out = shared_dir(tmp_path_factory, "reference")
    if not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        finetune(shared_pretrained(tmp_path_factory), shared_data(tmp_path_factory), out, "checkpoint.every_steps=10")
    return out


PLANTED_CONFIG = str(REPO / "tests" / "configs" / "planted.toml")


def shared_planted(tmp_path_factory) -> tuple[Path, Path]:
    """Taste clusters that span every price and popularity band (data/prepare/synthetic.py)
    and a real ``morec train`` of them, made once per session: the data and pretraining of
    the method-moves and budget tests (test_morec_moves.py, test_budget_holds.py)."""
    from morec_dist.data.prepare.synthetic import generate

    data, out = shared_dir(tmp_path_factory, "planted-data"), shared_dir(tmp_path_factory, "planted-pretrain")
    if not (data / "manifest.json").exists():
        generate(data, users=800, items=1500, rows=60_000, seed=5, planted_clusters=8, overwrite=True)
    if not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        morec("train", "--config", PLANTED_CONFIG, quoted("data.path", data), quoted("run.out_dir", out))
    return data, out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return shared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    best = shared_pretrained(tmp_path_factory)
    metrics = json.loads((best.parent.parent / "metrics.json").read_text())
    assert metrics["train_loss"] > 0 and set(metrics) >= {
        "hit@10",
        "ndcg@10",
        "r_hit@10",
        "r_ndcg@10",
        "min_hit@10",
        "min_ndcg@10",
        "pop_kl@10",
    }
    return best


def finetune(pretrained: Path, data: Path, out: Path, *overrides: str, ray: str | None = None) -> dict:
    """``morec finetune`` of the tiny config; ``ray``: coordinate on that head (``on_ray``,
    namespace = the run's folder name), else the job's own embedded head."""
    on_head = on_ray(ray, out.name) if ray else []
    env: dict[str, Any] = {"RAY_AUTH_MODE": "token"} if ray else {}
    morec(
        "finetune", "--from", str(pretrained), "--config", CONFIG, quoted("data.path", data),
        quoted("run.out_dir", out), *overrides, *on_head, **env,
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())
