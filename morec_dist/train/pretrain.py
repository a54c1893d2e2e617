"""``morec train``: accuracy-only pretraining (MF-BPR or two-tower), the base MoRec starts from.

Streams uniform batches, validates every epoch on the valid split with early stopping on
NDCG@10, keeps the best checkpoint, and records the best epoch's mean training loss: the
target l_hat of MoRec's PID. At the end the best model is scored on the test split next to
the most-popular baseline, and ``metrics.json`` is written.
"""

from __future__ import annotations

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
from morec_dist.train.loop import open_rank_observer, AccuracyOnly, progress, train_epoch
from morec_dist.train.run_dir import provenance, write_json_atomic
from morec_dist.train.trainer import Trainer, all_reduce_sum, build_features

SELECT_METRIC = "ndcg@10"


def open_dataset_for_job(config: Config, ctx: DistContext) -> PreparedDataset:
    # rank 0 verifies checksums and values; the others trust the same files
    full = ctx.rank == 0
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
    result = evaluate(trainer.model, trainer.dataset, split, c.eval.ks, ctx.rank, ctx.world_size, trainer.features, ctx.device, c.eval.batch_users)
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


def run_pretrain(config: Config) -> dict[str, Any]:
    ctx = init_distributed()
    started = time.perf_counter()
    run_dir = Path(config.run.out_dir)
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    reader = make_reader(config, ctx, dataset, trainer)
    probe = make_reader(config, ctx, dataset, trainer, seed=config.run.seed + 1)
    metrics, exporter = open_rank_observer(config, ctx)
    best_path = run_dir / "checkpoints" / "best"
    best: dict[str, Any] = {}
    history, stale = [], 0
    train_seconds, train_rows = 0.0, 0
    for epoch in range(config.train.epochs):
        reader.set_epoch(epoch)
        trainer.epoch = epoch
        stats = train_epoch(trainer, reader, AccuracyOnly(), epoch=epoch, log_every=config.train.log_every, max_steps=config.train.max_steps, metrics=metrics)
        train_seconds += stats.seconds
        train_rows += stats.rows
        valid = evaluation(trainer, "valid")
        row = {"epoch": epoch, "train_loss": stats.mean_loss, "rows_per_s": stats.rows_per_s, "seconds": stats.seconds, "valid": valid}
        history.append(row)
        progress(ctx.rank, f"[pretrain] epoch {epoch} loss {stats.mean_loss:.4f} valid {SELECT_METRIC} {valid[SELECT_METRIC]:.4f} hit@10 {valid['hit@10']:.4f} ({stats.rows_per_s:,.0f} rows/s, {stats.seconds:.1f}s)")
        if not best or valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]:
            row["final_train_loss"] = measure_train_loss(trainer, probe)
            best, stale = row, 0
            meta = {"model": trainer.model_identity(), "epoch": epoch, "step": trainer.step, "train_loss": row["final_train_loss"], "epoch_mean_train_loss": stats.mean_loss, "valid": valid, **provenance(config, ctx.world_size)}
            save_checkpoint(best_path, trainer.model_state(), meta)
        else:
            stale += 1
            if stale >= config.train.early_stopping_patience:
                progress(ctx.rank, f"[pretrain] early stop: no {SELECT_METRIC} gain for {stale} epochs")
                break
        if config.train.max_steps and trainer.step >= config.train.max_steps:
            break
    reader.close()
    probe.close()
    if exporter is not None:
        exporter.stop()
    load_checkpoint(best_path, trainer.model_state())
    test = evaluation(trainer, "test")
    popular = evaluate_most_popular(dataset, "test", config.eval.ks, ctx.rank, ctx.world_size, ctx.device, config.eval.batch_users).metrics
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
        "wall_s": time.perf_counter() - started,
        "train_rows_per_s": train_rows / max(train_seconds, 1e-9),
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        write_json_atomic(run_dir / "metrics.json", result)
        progress(ctx.rank, f"[pretrain] test hit@10 {test['hit@10']:.4f} ndcg@10 {test['ndcg@10']:.4f} (most popular {popular['hit@10']:.4f} / {popular['ndcg@10']:.4f}); wrote {run_dir / 'metrics.json'}")
    return result
