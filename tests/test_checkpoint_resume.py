"""Step checkpoints and resume, with real torchrun jobs on a tiny synthetic dataset.

- A MoRec finetune (2 ranks, CPU, a real Ray coordinator) is killed with SIGKILL (the whole
  process tree: parent, embedded Ray head, torchrun, ranks) as soon as its first step
  checkpoint exists, then re-run: it resumes from the latest complete checkpoint and ends
  with every tensor of its last step checkpoint (model, optimizer, counters) and of its
  final model, and the coordinator's trace, state and sampler updates, identical to an
  uninterrupted run with the same seed.
- Resharding: that 2-rank checkpoint resumes on 1 rank, and a 1-rank checkpoint of that run
  resumes on 2; what each loads, before any step, equals its source checkpoint tensor for
  tensor, and both finish with finite metrics (an exact trajectory is only promised for the
  same world size).
- Pretraining killed the same way and resumed ends with the same best model and l_hat.
- Checkpoint directories: a half-written ``.tmp`` is never taken; ``keep_last`` prunes.

The helpers here (shared data, pretrained model, uninterrupted reference run) are cached
under pytest's base temp dir, so tests/test_faults.py reuses them in the same session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from morec_dist.train.checkpoint import complete_checkpoints, latest_checkpoint, prune_checkpoints
from tests.conftest import REPO
from tests.e2e_fixtures import CONFIG, on_ray, quoted, shared_data, shared_finetune, shared_pretrained
from tests.procs import run_job

EVERY = "checkpoint.every_steps=10"
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ shared helpers


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def morec(*args: str, timeout: int = 600, expect: int = 0, **env_extra: str) -> subprocess.CompletedProcess:
    proc = run_job([sys.executable, "-m", "morec_dist.cli", *args], timeout, env=cli_env(**env_extra), cwd=REPO)
    if proc.returncode != expect:
        raise AssertionError(
            f"morec {' '.join(args)} exited {proc.returncode} (expected {expect}):\n{proc.stderr[-4000:]}"
        )
    return proc


def finetune_args(tmp_path_factory, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--from",
        str(shared_pretrained(tmp_path_factory)),
        "--config",
        CONFIG,
        quoted("data.path", shared_data(tmp_path_factory)),
        quoted("run.out_dir", out),
        EVERY,
        *extra,
    ]


def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted MoRec finetune with step checkpoints every 10 steps (shared)."""
    return shared_finetune(tmp_path_factory)


def tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, flattened to dotted names."""
    target = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", torch.load(target, weights_only=True))
    return flat


def assert_same_tensors(a: Path, b: Path, tmp: Path) -> int:
    ta, tb = tensors(a, tmp), tensors(b, tmp)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs between {a} and {b}"
    return len(ta)


def start_job(args: list[str], log: Path) -> subprocess.Popen:
    """``morec <args>`` in its own process group (so the whole job can be killed at once).

    These jobs are SIGKILLed on purpose, so the launcher's temporary directory
    (morec-launch-*) is never removed: TMPDIR puts it in the test's tmp folder, which pytest
    prunes. Ray keeps its own temporary root (RAY_TMPDIR; it would follow TMPDIR otherwise,
    and its socket paths must stay under the 107-byte Unix limit)."""
    job_tmp = log.parent / "job-tmp"
    job_tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "morec_dist.cli", *args],
        cwd=REPO,
        env=cli_env(TMPDIR=str(job_tmp), RAY_TMPDIR=os.environ.get("RAY_TMPDIR", "/tmp")),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )


def wait_for_checkpoint(job: subprocess.Popen, root: Path, log: Path, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = complete_checkpoints(root)
        if found:
            return found[-1][0]
        if job.poll() is not None:
            raise AssertionError(
                f"the job ended (rc {job.returncode}) before any checkpoint:\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after {timeout} s:\n{log.read_text()[-4000:]}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the job's whole process tree: the parent, its Ray head, torchrun and the
    ranks (torchrun starts each rank in a session of its own, so killpg alone misses them)."""
    victims = [job.pid, *descendants(job.pid)]  # before any dies: orphans are re-parented
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)
    for pid in victims:  # gone, not merely signalled
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) and time.time() < deadline:
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_same_coordinator(a: dict, b: dict) -> None:
    ca, cb = a["coordinator"], b["coordinator"]
    assert ca["trace"] == cb["trace"]
    assert ca["state"] == cb["state"]
    assert ca["history"] == cb["history"]
    assert ca["sampler_updates"] == cb["sampler_updates"]
    assert len(ca["trace"]["beta"]) == 40


# ------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, int, Path]:
    """A MoRec finetune SIGKILLed (whole process group) right after its first checkpoint;
    a copy of its checkpoints as they were at the kill is kept for the resharding tests."""
    out = tmp_path_factory.mktemp("killed")
    log = out / "job.log"
    reference_run(tmp_path_factory)  # warm caches first: the kill must land mid-run
    job = start_job(finetune_args(tmp_path_factory, out), log)
    try:
        step = wait_for_checkpoint(job, out / "checkpoints", log)
    finally:
        kill_job(job)
    assert not (out / "metrics.json").exists(), "the job finished before it was killed"
    snapshot = tmp_path_factory.mktemp("killed-snapshot")
    shutil.copytree(out / "checkpoints", snapshot / "checkpoints", ignore=shutil.ignore_patterns("*.tmp", "*.old"))
    return out, step, snapshot


def test_sigkill_then_resume_is_bit_identical(killed, tmp_path_factory, tmp_path):
    out, killed_at, _ = killed
    reference = reference_run(tmp_path_factory)
    resumed_from = latest_checkpoint(out / "checkpoints")
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < 40
    proc = morec(*finetune_args(tmp_path_factory, out))
    assert f"resuming from {resumed_from}" in proc.stderr and "(exact)" in proc.stderr
    a, b = metrics(reference), metrics(out)
    assert b["resumed_from"] == str(resumed_from)
    # the last step checkpoint holds the whole trainer: model, optimizer state, counters
    n = assert_same_tensors(reference / "checkpoints" / "step-40", out / "checkpoints" / "step-40", tmp_path)
    assert n >= 4
    assert_same_tensors(reference / "checkpoints" / "final", out / "checkpoints" / "final", tmp_path)
    assert_same_coordinator(a, b)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["valid_before"] == b["valid_before"] and a["hit@10"] == b["hit@10"]


def assert_loads_as_saved(tmp_path_factory, source: Path, out: Path, nproc: int, tmp: Path, ray: str) -> None:
    """Resume ``source`` on ``nproc`` ranks and stop before any step: with train.max_steps at
    the checkpoint's step (a trajectory key, so --resume-changed) the job restores the
    checkpoint, takes no step and writes its model as checkpoints/final. Every tensor of that
    model, as the other world size loaded it, equals the source checkpoint's."""
    step = int(source.name.split("-")[1])
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, out / "checkpoints" / source.name)
    # the flags before the overrides: the launcher appends an override of its own (the Ray address)
    command, *rest = finetune_args(tmp_path_factory, out, f"train.max_steps={step}", *on_ray(ray, out.name))
    proc = morec(command, "--resume-changed", "--nproc", str(nproc), *rest, RAY_AUTH_MODE="token")
    assert f"resuming from {out / 'checkpoints' / source.name} at step {step}" in proc.stderr
    assert metrics(out)["world_size"] == nproc
    loaded, saved = tensors(out / "checkpoints" / "final", tmp), tensors(source, tmp)
    assert loaded and loaded.keys() <= saved.keys(), sorted(loaded.keys() ^ saved.keys())[:10]
    assert any(key.startswith("model.") and value.numel() > 1000 for key, value in loaded.items())  # the tables
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), f"{key}: loaded on {nproc} rank(s) differs from {source}"


def test_two_rank_checkpoint_resumes_on_one_rank_and_back(killed, tmp_path_factory, tmp_path, shared_ray_head):
    # each job coordinates on the session's Ray head, in a namespace of its own (a resumed job
    # restores its coordinator from the checkpoint, as it does on a fresh embedded head)
    _, _, snapshot = killed
    source = latest_checkpoint(snapshot / "checkpoints")
    assert tensors(source, tmp_path)["counters"].tolist()[0] == int(source.name.split("-")[1])
    # the state a resharded resume loads, before any step: the source checkpoint's
    assert_loads_as_saved(tmp_path_factory, source, tmp_path / "loaded-on-one", 1, tmp_path, shared_ray_head)
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, one / "checkpoints" / source.name)
    proc = morec(
        *finetune_args(tmp_path_factory, one, "checkpoint.every_steps=5", "checkpoint.keep_last=3"),
        *on_ray(shared_ray_head, "one"), "--nproc", "1", RAY_AUTH_MODE="token",
    )  # fmt: skip
    assert "resharded from 2 ranks" in proc.stderr
    m1 = metrics(one)
    assert m1["world_size"] == 1 and all(math.isfinite(m1[k]) for k in ("hit@10", "ndcg@10", "r_hit@10"))
    assert len(m1["coordinator"]["trace"]["beta"]) == 40
    # a mid-epoch checkpoint written by the 1-rank run, resumed by 2 ranks
    mid = [path for step, path in complete_checkpoints(one / "checkpoints") if step < 40][-1]
    assert_loads_as_saved(tmp_path_factory, mid, tmp_path / "loaded-on-two", 2, tmp_path, shared_ray_head)
    two = tmp_path / "two"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, two / "checkpoints" / mid.name)
    proc = morec(*finetune_args(tmp_path_factory, two, *on_ray(shared_ray_head, "two")), RAY_AUTH_MODE="token")
    assert "resharded from 1 ranks" in proc.stderr
    m2 = metrics(two)
    assert m2["world_size"] == 2 and all(math.isfinite(m2[k]) for k in ("hit@10", "ndcg@10", "r_hit@10"))
    trace = m2["coordinator"]["trace"]
    assert trace["step"] == list(range(40)) and all(math.isfinite(b) for b in trace["beta"])


def test_pretraining_killed_and_resumed_ends_identical(tmp_path_factory, tmp_path):
    """Pretraining (2 ranks) SIGKILLed after its first step checkpoint, then re-run: the
    best model, l_hat and the epoch's loss equal the uninterrupted shared pretraining's."""
    reference = shared_pretrained(tmp_path_factory).parent.parent
    out = tmp_path / "pretrain"
    out.mkdir()
    log = tmp_path / "job.log"
    args = [
        "train",
        "--config",
        CONFIG,
        quoted("data.path", shared_data(tmp_path_factory)),
        quoted("run.out_dir", out),
        EVERY,
    ]
    job = start_job(args, log)
    try:
        wait_for_checkpoint(job, out / "checkpoints", log)
    finally:
        kill_job(job)
    assert not (out / "metrics.json").exists(), "the job finished before it was killed"
    # what the SIGKILL left behind is in the test's folder, not the machine's /tmp
    assert list((tmp_path / "job-tmp").glob("morec-launch-*")), "the launcher did not use TMPDIR"
    resumed_from = latest_checkpoint(out / "checkpoints")
    proc = morec(*args)
    assert f"resuming from {resumed_from}" in proc.stderr
    a, b = metrics(reference), metrics(out)
    assert b["resumed_from"] == str(resumed_from)
    assert_same_tensors(reference / "checkpoints" / "best", out / "checkpoints" / "best", tmp_path)
    for key in ("train_loss", "epoch_mean_train_loss", "best_epoch", "valid", "hit@10", "ndcg@10"):
        assert a[key] == b[key], key


def test_half_written_checkpoints_are_never_taken_and_old_ones_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "meta.json").write_text("{}")
    (root / "step-40.tmp").mkdir()
    (root / "step-40.tmp" / "meta.json").write_text("{}")  # rank 0 finished, the rename did not happen
    (root / "step-50").mkdir()  # no meta.json: DCP files only
    assert latest_checkpoint(root) == root / "step-30"
    assert [p.name for p in prune_checkpoints(root, keep_last=2)] == ["step-10"]
    assert [s for s, _ in complete_checkpoints(root)] == [20, 30]
