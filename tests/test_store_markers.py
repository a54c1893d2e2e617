"""A stage's outputs at a URI and the markers that chain the object-store pipeline.

``run.out_dir`` and ``morec evaluate --out`` may be filesystem URIs: metrics.json is then one
upload (train/run_dir.py), checkpoints default to ``<run.out_dir>/checkpoints`` on the same
store, and an output URI carrying credentials is refused before any work (exit 2, the flag
named, the secret never printed). ``launch/wait_for.sh`` with a URI (``python -m
morec_dist.data.wait``) blocks until the object is there and not empty, retries the
store's errors, and times out or refuses as documented. Against the loopback S3 server of
tests/s3_loopback.py; the whole pipeline is tests/test_object_store_pipeline.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from morec_dist.config import ConfigError, load_config
from morec_dist.data import storage
from morec_dist.train.checkpoint import checkpoint_root
from morec_dist.train.evaluate import _default_out
from morec_dist.train.run_dir import read_json, run_path, write_json_atomic
from tests.conftest import REPO
from tests.s3_loopback import moto_s3

WAIT_FOR = str(REPO / "launch" / "wait_for.sh")


def test_run_outputs_at_a_uri_go_to_the_store_with_its_options():
    with moto_s3() as s3:
        out = s3.uri("runs/r1/pretrain")
        written = write_json_atomic(run_path(out) / "metrics.json", {"hit@10": 0.25, "step": 40})
        assert isinstance(written, storage.Location) and str(written) == "s3://data/runs/r1/pretrain/metrics.json"
        assert read_json(storage.uri_of(written)) == {"hit@10": 0.25, "step": 40}
        assert storage.exists(storage.location(s3.uri("runs/r1/pretrain/metrics.json")))

        root = checkpoint_root(out)  # checkpoint.dir unset: below run.out_dir, on the store, query kept
        assert isinstance(root, storage.Location)
        assert storage.uri_of(root) == s3.uri("runs/r1/pretrain/checkpoints")
        config = load_config(None, [f'run.out_dir="{s3.uri("runs/r1/morec")}"'])
        target = _default_out(config, s3.uri("runs/r1/morec/checkpoints/final"), "test")
        assert storage.uri_of(target) == s3.uri("runs/r1/morec/metrics-test.json")
    assert checkpoint_root("runs/local") == run_path("runs/local") / "checkpoints"  # a path stays as given


def test_morec_run_refuses_a_uri_out_dir_before_any_stage():
    from morec_dist.train.pipeline import run_pipeline

    config = load_config(None, ['run.out_dir="s3://bucket/runs/r1"', 'data.path="/nonexistent/dataset"'])
    with pytest.raises(ConfigError, match=r"run\.out_dir: `morec run` writes its results table to a local"):
        run_pipeline(None, [], config)


@pytest.mark.slow  # a `morec` process each (torch's import: 5-20 s on a loaded machine)
@pytest.mark.parametrize(
    "args, flag",
    [
        (
            ["train", "--config", "tests/configs/tiny.toml", 'run.out_dir="s3://AKIAXX:hunter2@bucket/runs/r1"'],
            "run.out_dir",
        ),
        (["evaluate", "--checkpoint", "/nonexistent/final", "--out", "s3://bucket/m.json?secret_key=hunter2"], "--out"),
    ],
    ids=["train-out-dir", "evaluate-out"],
)
def test_an_output_uri_with_credentials_is_refused_at_once(args, flag):
    proc = subprocess.run(
        [sys.executable, "-m", "morec_dist.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: {flag}: s3://bucket/" in proc.stderr and "carries credentials" in proc.stderr
    assert "hunter2" not in proc.stderr


@pytest.mark.slow
def test_wait_for_a_uri_passes_only_once_the_marker_is_written_whole():
    with moto_s3() as s3:
        # a key of its own: moto's state is per process, not per server
        marker = s3.uri("runs/r-wait/pretrain/metrics.json")
        wait = subprocess.Popen(
            [WAIT_FOR, "--every", "0.2", marker], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            time.sleep(1.5)
            assert wait.poll() is None, "passed before the marker existed"
            where = storage.location(marker)
            with where.fs.open_output_stream(where.path):
                pass  # an empty object (a store's placeholder) is not a written marker
            time.sleep(1.0)
            assert wait.poll() is None, "passed on an empty object"
            write_json_atomic(marker, {"done": True})
            assert wait.wait(timeout=30) == 0
        finally:
            wait.kill()
        err = wait.stderr.read() if wait.stderr else ""
        assert "waiting for s3://data/runs/r-wait/pretrain/metrics.json" in err and "found" in err
        assert "endpoint_override" not in err  # messages print a URI without its query


@pytest.mark.slow
def test_wait_for_a_uri_retries_the_stores_errors_then_times_out():
    unreachable = "s3://bucket/runs/r1/pretrain/metrics.json?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    started = time.monotonic()
    proc = subprocess.run(
        [WAIT_FOR, "--timeout", "3", "--every", "0.5", unreachable],
        cwd=REPO,
        env={**env, "AWS_EC2_METADATA_DISABLED": "true", "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "(retrying)" in proc.stderr and proc.stderr.count("(retrying)") == 1  # printed once, not per look
    assert "did not appear within 3 s" in proc.stderr and time.monotonic() - started < 90


def test_wait_for_refuses_a_uri_with_credentials_without_printing_them():
    proc = subprocess.run(
        [WAIT_FOR, "--timeout", "5", "s3://AKIAXX:hunter2@bucket/runs/r1/metrics.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "carries credentials" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr and "AKIAXX" not in proc.stderr
    bad = subprocess.run([WAIT_FOR, "--every", "x", "s3://bucket/m"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--every" in bad.stderr


@pytest.mark.slow  # starts a Ray head
def test_ray_head_until_a_uri_that_can_never_be_read_stops_the_head_with_exit_2(tmp_path):
    from tests.conftest import free_tcp_port
    from tests.procs import run_job

    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "RAY_AUTH_TOKEN": "0" * 32,
        "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp"),
    }
    head = [str(REPO / "launch" / "ray_head.sh"), "--foreground", "--port", str(free_tcp_port())]
    head += ["--num-cpus", "0", "--object-store-mb", "80", "--until", "s3://AKIAXX:hunter2@bucket/runs/r1/m.json"]
    proc = run_job(head, 180, env=env, cwd=REPO)  # ends the head's processes whatever happens
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "failed (2); stopping the head" in proc.stderr and "carries credentials" in proc.stderr
    assert "hunter2" not in proc.stderr and "AKIAXX" not in proc.stderr
