"""Training straight from object storage, against an S3-compatible server on loopback
(tests/s3_loopback.py): 2 ranks pretrain from an s3:// dataset with step checkpoints written
in the background to s3://; the job is SIGKILLed while a step checkpoint's shards are being
uploaded (the server holds them), so the previous checkpoint stays the latest; the re-run
resumes from it and ends bit-identical to the uninterrupted local run (the shared
pretraining, tests/e2e_fixtures.py); `morec evaluate` of the best checkpoint on s3:// gives
that run's test metrics."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from morec_dist.data import storage
from morec_dist.train.checkpoint import META, complete_checkpoints
from tests.e2e_fixtures import CONFIG, quoted, shared_data, shared_pretrained
from tests.s3_loopback import moto_s3
from tests.test_checkpoint_resume import assert_same_tensors, kill_job, metrics, morec, start_job

pytestmark = pytest.mark.slow


def test_pretrain_from_s3_killed_mid_async_save_resumes_bit_exact(tmp_path_factory, tmp_path):
    data = shared_data(tmp_path_factory)
    reference = shared_pretrained(tmp_path_factory).parent.parent
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    with moto_s3() as s3:
        data_uri = s3.upload(data, "ds")
        root_uri = s3.uri("run/checkpoints")
        args = [
            "train",
            "--config",
            CONFIG,
            quoted("data.path", data_uri),
            quoted("run.out_dir", out),
            quoted("checkpoint.dir", root_uri),
            "checkpoint.every_steps=10",
            "checkpoint.async_save=true",
        ]
        with s3.hold(r"/run/checkpoints/step-20/__\d+_\d+\.distcp$") as uploading:
            job = start_job(args, log)
            try:
                assert uploading.wait(300), f"step 20's shards never reached the store:\n{log.read_text()[-3000:]}"
            finally:
                kill_job(job)
        root = storage.location(root_uri)
        assert not (out / "metrics.json").exists(), "the job finished before it was killed"
        assert [step for step, _ in complete_checkpoints(root)] == [10]
        assert storage.exists(root / "step-20" / "rank-0.json") and not storage.exists(root / "step-20" / META)

        proc = morec(*args)
        assert "resuming from s3://data/run/checkpoints/step-10 at step 10" in proc.stderr and "(exact)" in proc.stderr
        a, b = metrics(reference), metrics(out)
        assert b["resumed_from"] == "s3://data/run/checkpoints/step-10"
        for key in ("train_loss", "epoch_mean_train_loss", "best_epoch", "valid", "hit@10", "ndcg@10"):
            assert a[key] == b[key], key
        assert [step for step, _ in complete_checkpoints(root)] == [30, 40]  # keep_last = 2: 10 and 20 pruned
        best = tmp_path / "best"
        best.mkdir()
        pafs.copy_files((root / "best").path, str(best), source_filesystem=root.fs)
        assert_same_tensors(reference / "checkpoints" / "best", best, tmp_path)

        morec(
            "evaluate",
            "--checkpoint",
            s3.uri("run/checkpoints/best"),
            quoted("data.path", data_uri),
            quoted("run.out_dir", tmp_path / "eval"),
        )
        evaluated = json.loads((tmp_path / "eval" / "metrics-test.json").read_text())
        for key in ("hit@10", "ndcg@10", "r_hit@10", "min_hit@10", "pop_kl@10"):
            assert evaluated[key] == a[key], key
