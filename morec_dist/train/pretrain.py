"""``morec train``: accuracy-only pretraining (MF-BPR or two-tower), the base MoRec starts from.

Streams uniform batches, validates every epoch on the valid split with early stopping on
NDCG@10, keeps the best checkpoint, and records the best epoch's mean training loss: the
target l_hat of MoRec's PID. At the end the best model is scored on the test split next to
the most-popular baseline, and ``metrics.json`` is written.

Step checkpoints (every ``checkpoint.every_steps``, each epoch's end, SIGTERM) and resume
from the latest one are ``morec_dist.train.resume``'s; the job's bookkeeping (history,
best epoch, patience) travels in them, ``checkpoints/best`` stays the best model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.reader import Reader
from morec_dist.eval.evaluator import evaluate, evaluate_most_popular
from morec_dist.model.sharding import DistContext, init_distributed
from morec_dist.train.checkpoint import load_checkpoint, save_checkpoint
from morec_dist.train.loop import AccuracyOnly, open_rank_observer, progress
from morec_dist.train.resume import Checkpointing, checkpointed_epoch, join_restarted_group
from morec_dist.train.run_dir import provenance, write_json_atomic
from morec_dist.train.trainer import Trainer, all_reduce_sum, build_features

SELECT_METRIC = "ndcg@10"


VERIFIED_ENV = "MOREC_DATASET_VERIFIED"  # set by the `morec` parent that verified this path


def open_dataset_for_job(config: Config, ctx: DistContext) -> PreparedDataset:
    # rank 0 verifies checksums and values (unless the parent just did); the others trust the same files
    verified = os.environ.get(VERIFIED_ENV) == str(Path(config.data.path).resolve())
    full = ctx.rank == 0 and not verified
    return PreparedDataset.open(config.data.path, verify_checksums=full, verify_values=full)


def make_reader(config: Config, ctx: DistContext, dataset: PreparedDataset, trainer: Trainer, **kwargs: Any) -> Reader:
    return Reader(
        dataset,
        batch_size=config.data.batch_size,
        num_negatives=config.data.num_negatives,
        negative_alpha=config.data.negative_alpha,
        seed=kwargs.pop("seed", config.run.seed),
        rank=ctx.rank,
        world_size=ctx.world_size,
        features=trainer.features,
        prefetch_batches=config.data.prefetch_batches,
        **kwargs,
    )


def evaluation(trainer: Trainer, split: str) -> dict[str, float]:
    c, ctx = trainer.config, trainer.ctx
    result = evaluate(
        trainer.model,
        trainer.dataset,
        split,
        c.eval.ks,
        ctx.rank,
        ctx.world_size,
        trainer.features,
        ctx.device,
        c.eval.batch_users,
    )
    return result.metrics


L_HAT_BATCHES = 64


@torch.no_grad()
def measure_train_loss(trainer: Trainer, reader: Reader, batches: int = L_HAT_BATCHES) -> float:
    """The model's mean training loss *now*, over the first ``batches`` uniform batches of a
    fixed stream: MoRec's l_hat is the loss the pretrained model ends at, not the mean over
    an epoch in which it was still learning."""
    ctx = trainer.ctx
    was_training = trainer.model.training
    trainer.model.eval()
    reader.set_epoch(0)
    loss_sum, rows = 0.0, 0
    for i, batch in enumerate(reader):
        if i == batches:
            break
        per_row = trainer.loss_fn(trainer.model(batch.to(ctx.device)))
        loss_sum += float(per_row.sum())
        rows += batch.num_rows
    trainer.model.train(was_training)
    total, count = all_reduce_sum([loss_sum, float(rows)], ctx)
    return total / max(count, 1.0)


def run_pretrain(config: Config, resume: bool | None = None) -> dict[str, Any]:
    join_restarted_group()
    ctx = init_distributed()
    started = time.perf_counter()
    run_dir = Path(config.run.out_dir)
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    checkpoints = Checkpointing(config, trainer, "pretrain")
    point = checkpoints.resume_point(config.run.resume if resume is None else resume)
    reader = make_reader(config, ctx, dataset, trainer)
    probe = make_reader(config, ctx, dataset, trainer, seed=config.run.seed + 1)
    metrics, exporter = open_rank_observer(config, ctx)
    best_path = run_dir / "checkpoints" / "best"
    job: dict[str, Any] = {
        "best": {},
        "history": [],
        "stale": 0,
        "train_seconds": 0.0,
        "train_rows": 0,
        "stopped": False,
    }
    resumed_progress = None
    strategy = AccuracyOnly()
    if point is not None:
        checkpoints.restore(point, reader)
        job.update({k: v for k, v in point.job.items() if k != "next_epoch"})
        resumed_progress = point.epoch_progress
    start_epoch = point.next_epoch if point is not None else 0
    max_steps = config.train.max_steps
    for epoch in range(start_epoch, config.train.epochs):
        if job["stopped"] or (max_steps and trainer.step >= max_steps):
            break
        stats = checkpointed_epoch(
            trainer,
            reader,
            strategy,
            checkpoints,
            job,
            epoch=epoch,
            metrics=metrics,
            resumed=resumed_progress if epoch == start_epoch else None,
        )
        valid = evaluation(trainer, "valid")
        row = {
            "epoch": epoch,
            "train_loss": stats.mean_loss,
            "rows_per_s": stats.rows_per_s,
            "seconds": stats.seconds,
            "valid": valid,
        }
        job["history"].append(row)
        progress(
            ctx.rank,
            f"[pretrain] epoch {epoch} loss {stats.mean_loss:.4f} valid {SELECT_METRIC} {valid[SELECT_METRIC]:.4f} "
            f"hit@10 {valid['hit@10']:.4f} ({stats.rows_per_s:,.0f} rows/s, {stats.seconds:.1f}s)",
        )
        best = job["best"]
        if not best or valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]:
            row["final_train_loss"] = measure_train_loss(trainer, probe)
            job["best"], job["stale"] = row, 0
            meta = {
                "model": trainer.model_identity(),
                "epoch": epoch,
                "step": trainer.step,
                "train_loss": row["final_train_loss"],
                "epoch_mean_train_loss": stats.mean_loss,
                "valid": valid,
                **provenance(config, ctx.world_size),
            }
            save_checkpoint(best_path, trainer.model_state(), meta)
        else:
            job["stale"] += 1
            if job["stale"] >= config.train.early_stopping_patience:
                progress(ctx.rank, f"[pretrain] early stop: no {SELECT_METRIC} gain for {job['stale']} epochs")
                job["stopped"] = True
        checkpoints.save(reader=reader, next_epoch=epoch + 1, job_state=job)
        if checkpoints.preemption.agreed(ctx.pg, ctx.world_size):
            checkpoints.exit_preempted()
    best = job["best"]
    history, train_seconds, train_rows = job["history"], job["train_seconds"], job["train_rows"]
    reader.close()
    probe.close()
    if exporter is not None:
        exporter.stop()
    load_checkpoint(best_path, trainer.model_state())
    test = evaluation(trainer, "test")
    popular = evaluate_most_popular(
        dataset, "test", config.eval.ks, ctx.rank, ctx.world_size, ctx.device, config.eval.batch_users
    ).metrics
    result = {
        **test,
        "split": "test",
        "job": "pretrain",
        "checkpoint": str(best_path),
        "best_epoch": best["epoch"],
        "train_loss": best["final_train_loss"],  # l_hat for MoRec
        "epoch_mean_train_loss": best["train_loss"],
        "valid": best["valid"],
        "baselines": {"most_popular": popular},
        "history": history,
        "resumed_from": str(point.path) if point is not None else None,
        "checkpoints_written": checkpoints.saved,
        "wall_s": time.perf_counter() - started,
        "train_rows_per_s": train_rows / max(train_seconds, 1e-9),
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        write_json_atomic(run_dir / "metrics.json", result)
        progress(
            ctx.rank,
            f"[pretrain] test hit@10 {test['hit@10']:.4f} ndcg@10 {test['ndcg@10']:.4f} (most popular "
            f"{popular['hit@10']:.4f} / {popular['ndcg@10']:.4f}); wrote {run_dir / 'metrics.json'}",
        )
    return result
