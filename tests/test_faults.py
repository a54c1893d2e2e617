"""Faults during a real MoRec finetune (2 torchrun ranks, a real Ray coordinator, CPU).

- Worker failure: with ``--max-restarts 1``, rank 1 is SIGKILLed as soon as the first step
  checkpoint exists; torchrun restarts the group, which resumes from the last checkpoint
  and finishes with weights, optimizer state and coordinator trace identical to the
  uninterrupted reference run (tests/test_checkpoint_resume.py's, shared in the session).
- Coordinator failure: the job uses a separate Ray head; the coordinator actor is killed
  (``ray.kill``, Ray restarts it) as soon as the first step checkpoint exists; the ranks
  restore it from that checkpoint's coordinator state plus their reports since, and the
  job finishes with the reference run's coordinator trace and weights.
- SIGTERM: the ``morec`` parent gets SIGTERM right after the first step checkpoint; the
  ranks agree on a step, checkpoint there, exit 143; a re-run resumes from that step and
  matches the reference run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from morec_dist.train.checkpoint import complete_checkpoints
from morec_dist.train.preemption import EXIT_PREEMPTED
from tests.conftest import REPO
from tests.procs import run_job
from tests.test_checkpoint_resume import (
    assert_same_coordinator,
    assert_same_tensors,
    children,
    finetune_args,
    metrics,
    quoted,
    reference_run,
    start_job,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.slow


def worker_pid(job_pid: int, local_rank: int) -> int | None:
    """The rank process with LOCAL_RANK=local_rank under the job's torchrun."""
    for torchrun in children(job_pid):
        for pid in children(torchrun):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LOCAL_RANK={local_rank}".encode() in env:
                return pid
    return None


def finish(job: subprocess.Popen, log: Path, timeout: float = 400) -> int:
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not finish:\n{log.read_text()[-4000:]}") from None


def test_killed_rank_restarts_the_group_which_resumes_and_finishes(tmp_path_factory, tmp_path):
    reference = reference_run(tmp_path_factory)
    out = tmp_path / "worker-kill"
    out.mkdir()
    log = tmp_path / "job.log"
    job = start_job([*finetune_args(tmp_path_factory, out), "--max-restarts", "1"], log)
    try:
        step = wait_for_checkpoint(job, out / "checkpoints", log)
        victim = worker_pid(job.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        assert finish(job, log) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert "resuming from" in text and "(exact)" in text, text[-3000:]
    result = metrics(out)
    assert result["resumed_from"] is not None and int(Path(result["resumed_from"]).name.split("-")[1]) >= step
    assert_same_tensors(reference / "checkpoints" / "step-40", out / "checkpoints" / "step-40", tmp_path)
    assert_same_tensors(reference / "checkpoints" / "final", out / "checkpoints" / "final", tmp_path)
    assert_same_coordinator(metrics(reference), result)


KILL_ACTOR = """
import sys, time, os, ray
from pathlib import Path
from morec_dist.coordinator.service import connect_ray
from morec_dist.train.checkpoint import complete_checkpoints
address, root = sys.argv[1], Path(sys.argv[2])
connect_ray(address, "morec")
deadline = time.time() + 300
while not complete_checkpoints(root):
    assert time.time() < deadline, "no checkpoint"
    time.sleep(0.05)
actor = ray.get_actor("morec-coordinator", namespace="morec")
ray.kill(actor, no_restart=False)
print("killed after checkpoint", complete_checkpoints(root)[-1][0], flush=True)
"""


def test_killed_coordinator_is_restored_and_the_trace_is_unchanged(tmp_path_factory, tmp_path, ray_head):
    reference = reference_run(tmp_path_factory)
    out = tmp_path / "actor-kill"
    (out / "checkpoints").mkdir(parents=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    killer = subprocess.Popen(
        [sys.executable, "-c", KILL_ACTOR, ray_head, str(out / "checkpoints")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "job.log"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "morec_dist.cli",
            *finetune_args(tmp_path_factory, out, quoted("coordinator.ray_address", ray_head)),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )
    try:
        stdout, stderr = killer.communicate(timeout=400)
        assert killer.returncode == 0, stderr[-3000:]
        assert finish(job, log) == 0, log.read_text()[-4000:]
    finally:
        for proc in (killer, job):
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "the coordinator actor is gone" in text and "coordinator restored" in text, text[-3000:]
    result = metrics(out)
    assert result["resumed_from"] is None  # the ranks never restarted
    assert_same_coordinator(metrics(reference), result)
    assert_same_tensors(reference / "checkpoints" / "final", out / "checkpoints" / "final", tmp_path)


def test_sigterm_checkpoints_at_a_step_boundary_and_the_rerun_matches(tmp_path_factory, tmp_path):
    """SIGTERM to the ``morec`` parent only (as a container runtime sends it to PID 1): it
    forwards it to torchrun, which passes it to the ranks; they agree on a step, write a
    checkpoint there and exit 143. keep_last is large, so every checkpoint stays visible."""
    reference = reference_run(tmp_path_factory)
    out = tmp_path / "sigterm"
    out.mkdir()
    log = tmp_path / "job.log"
    args = [*finetune_args(tmp_path_factory, out), "checkpoint.keep_last=10"]
    job = start_job(args, log)
    try:
        first = wait_for_checkpoint(job, out / "checkpoints", log)
        os.kill(job.pid, signal.SIGTERM)
        code = finish(job, log)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0 and "preempted: checkpoint at step" in text, text[-3000:]
    assert not (out / "metrics.json").exists()
    steps = [s for s, _ in complete_checkpoints(out / "checkpoints")]
    stopped = steps[-1]
    assert first in steps and first <= stopped <= 40, steps  # 40: a stop at the last step saves it too
    assert f"preempted: checkpoint at step {stopped} written; exiting {EXIT_PREEMPTED}" in text
    proc = run_job(
        [sys.executable, "-m", "morec_dist.cli", *args],
        600,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped}, epoch 0 (exact)" in proc.stderr
    assert_same_tensors(reference / "checkpoints" / "step-40", out / "checkpoints" / "step-40", tmp_path)
    assert_same_tensors(reference / "checkpoints" / "final", out / "checkpoints" / "final", tmp_path)
    assert_same_coordinator(metrics(reference), metrics(out))
