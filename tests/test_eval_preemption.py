"""SIGTERM during a long evaluation (a real 2-rank torchrun pretraining job, gloo, CPU).

The catalogue is large (600k items) so that the per-epoch validation takes far longer than
the steps: the job trains one epoch of a few steps (a step checkpoint every 2), then evaluates. SIGTERM to
the ``morec`` parent while the ranks evaluate must end the job within seconds: the ranks
agree on the flag between evaluation batches, checkpoint the epoch's last step and exit 143
(before, they exited with the last periodic checkpoint as the resume point, so a resume
trained the steps after it again, with ``checkpoint.every_steps = 0`` the whole epoch; and
before that they evaluated on until the 25 s grace timer killed them). The same command then
resumes at that step, trains no step, evaluates and finishes with that step's weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morec_dist.data.prepare.synthetic import generate
from morec_dist.train.checkpoint import complete_checkpoints, latest_checkpoint
from morec_dist.train.preemption import EXIT_PREEMPTED, SIGTERM_GRACE_S
from tests.conftest import REPO
from tests.test_checkpoint_resume import assert_same_tensors

pytestmark = pytest.mark.slow

CONFIG = """
[run]
seed = 1
nproc = 2
[data]
batch_size = 4096
num_negatives = 2
[model]
name = "mf"
embedding_dim = 16
[train]
epochs = 1
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
    data = generate(tmp_path / "data", users=1000, items=600_000, rows=30_000, seed=4)
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
        wait_for_line(job, log, "step 1/")
        last = int(re.search(r"step 1/(\d+) ", log.read_text()).group(1))  # the epoch's steps
        wait_for_line(job, log, f"step {last}/{last} ")
        time.sleep(2.0)  # past the last step's SIGTERM check: the ranks are evaluating
        periodic = list(range(2, last, 2))  # checkpoint.every_steps = 2; none at the epoch's end yet
        assert job.poll() is None and [s for s, _ in complete_checkpoints(out / "checkpoints")] == periodic
        sent = time.monotonic()
        os.kill(job.pid, signal.SIGTERM)
        code = job.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    print(f"exit {code} {took:.1f} s after SIGTERM")
    assert code == EXIT_PREEMPTED, text[-3000:]
    assert f"SIGTERM during the epoch-end evaluation: checkpointing step {last}" in text, text[-3000:]
    assert f"preempted: checkpoint at step {last} written; exiting {EXIT_PREEMPTED}" in text, text[-3000:]
    assert took < WITHIN_S, f"{took:.1f} s after SIGTERM:\n{text[-3000:]}"
    assert not (out / "metrics.json").exists()
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [*periodic, last][-2:]  # keep_last 2
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / f"step-{last}"
    stopped = tmp_path / "at-the-stop"
    shutil.copytree(out / "checkpoints" / f"step-{last}", stopped)  # the epoch-end checkpoint replaces it

    t_rerun = time.monotonic()
    rerun = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", *args],
        cwd=REPO,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"rerun {time.monotonic() - t_rerun:.1f} s")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {last}, epoch 0 (exact)" in rerun.stderr, rerun.stderr[-3000:]
    assert "step 1/" not in rerun.stderr, "the resumed job trained the finished epoch again"
    result = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0] and result["resumed_from"].endswith(f"step-{last}")
    assert_same_tensors(stopped, out / "checkpoints" / f"step-{last}", tmp_path)
