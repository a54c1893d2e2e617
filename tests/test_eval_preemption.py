"""SIGTERM during a long evaluation (a real 2-rank torchrun pretraining job, gloo, CPU).

The catalogue is large (600k items) so that the per-epoch validation takes far longer than
the steps: the job trains 4 steps (a step checkpoint at step 2), then evaluates. SIGTERM to
the ``morec`` parent while the ranks evaluate must end the job within seconds: the ranks
agree on the flag between evaluation batches and exit 143 without a new checkpoint, so
step 2 stays the resume point. Before, they evaluated on until the 25 s grace timer
(``SIGTERM_GRACE_S``) killed them, or wrote an epoch-end checkpoint after the evaluation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morec_dist.data.prepare.synthetic import generate
from morec_dist.train.checkpoint import complete_checkpoints, latest_checkpoint
from morec_dist.train.preemption import SIGTERM_GRACE_S
from tests.conftest import REPO

pytestmark = pytest.mark.slow

CONFIG = """
[run]
seed = 1
nproc = 2
[data]
batch_size = 64
num_negatives = 2
[model]
name = "mf"
embedding_dim = 16
[train]
epochs = 1
max_steps = 4
log_every = 1
[checkpoint]
every_steps = 2
[eval]
batch_users = 16
"""
# well under the grace timer, so that only the collective check can pass the test
WITHIN_S = 12.0


def wait_for_line(job: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        if job.poll() is not None:
            raise AssertionError(f"the job ended (rc {job.returncode}) before {text!r}:\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {text!r} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def test_sigterm_during_evaluation_ends_the_job_within_seconds(tmp_path):
    assert WITHIN_S < SIGTERM_GRACE_S
    data = generate(tmp_path / "data", users=3000, items=600_000, rows=90_000, seed=4)
    config = tmp_path / "job.toml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    args = ["train", "--config", str(config), f'data.path="{data}"', f'run.out_dir="{out}"']
    job = subprocess.Popen(
        [sys.executable, "-m", "morec_dist.cli", *args],
        cwd=REPO,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )
    try:
        wait_for_line(job, log, "step 4/")
        time.sleep(2.0)  # past the step boundary's SIGTERM check: the ranks are evaluating
        assert job.poll() is None and [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2]
        sent = time.monotonic()
        os.kill(job.pid, signal.SIGTERM)
        code = job.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    print(f"exit {code} {took:.1f} s after SIGTERM")
    assert code != 0, text[-3000:]
    assert "SIGTERM during evaluation on valid" in text, text[-3000:]
    assert took < WITHIN_S, f"{took:.1f} s after SIGTERM:\n{text[-3000:]}"
    assert not (out / "metrics.json").exists()
    # no checkpoint after the evaluation: step 2 is what a re-run resumes from
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [2]
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-2"
