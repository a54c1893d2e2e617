"""``morec train``: accuracy-only pretraining (MF-BPR or two-tower), the base MoRec starts from.

Streams uniform batches, validates every epoch on the valid split with early stopping on
NDCG at ``eval.ks[0]`` (``runner.select_metric``), keeps the best checkpoint, and records
the best epoch's mean training loss: the target l_hat of MoRec's PID. At the end the best
model is scored on the test split next to the most-popular baseline, and ``metrics.json``
is written.

The skeleton (setup, resume, the epoch loop with its step checkpoints, the final record)
is ``morec_dist.train.runner``'s; this module is the ``PretrainJob``'s hooks. The job's
bookkeeping (history, best epoch, patience) is its ``JobState``; ``checkpoints/best`` stays
the best model.
"""

from __future__ import annotations

from typing import Any

import torch

from morec_dist.config import Config
from morec_dist.data.reader import Reader
from morec_dist.distributed import all_reduce_sum
from morec_dist.eval.evaluator import evaluate_most_popular
from morec_dist.eval.ranking import EvalOptions
from morec_dist.train.checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from morec_dist.train.loop import progress
from morec_dist.train.run_dir import provenance
from morec_dist.train.runner import (
    JobParts,
    JobRun,
    evaluated_metrics,
    evaluation,
    make_reader,
    report_k,
    run_job,
    select_metric,
)
from morec_dist.train.strategies import AccuracyOnly
from morec_dist.train.trainer import EpochStats, Trainer

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


class PretrainJob:
    kind = "pretrain"
    tag = "[pretrain]"

    def __init__(self, config: Config):
        self.config = config
        self.best_path = checkpoint_root(config.run.out_dir, config.checkpoint.dir) / "best"
        self.probe: Reader | None = None  # the fixed stream l_hat is measured on
        self.k = report_k(config)

    def epochs(self, config: Config) -> int:
        return config.train.epochs

    def build(self, run: JobRun) -> JobParts:
        c = run.config
        reader = make_reader(c, run.trainer)
        self.probe = make_reader(c, run.trainer, seed=c.run.seed + 1)
        return JobParts(reader, AccuracyOnly(), extra_readers=[self.probe])

    def before_training(self, run: JobRun) -> None:
        pass

    def end_epoch(self, run: JobRun, epoch: int, stats: EpochStats, valid: dict[str, float]) -> None:
        c, ctx, state, trainer = run.config, run.ctx, run.state, run.trainer
        metric, k = select_metric(c), report_k(c)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": stats.mean_loss,
            "rows_per_s": stats.rows_per_s,
            "seconds": stats.seconds,
            "valid": valid,
        }
        state.history.append(row)
        progress(
            ctx.rank,
            f"{self.tag} epoch {epoch} loss {stats.mean_loss:.4f} valid {metric} {valid[metric]:.4f} "
            f"hit@{k} {valid[f'hit@{k}']:.4f} ({stats.rows_per_s:,.0f} rows/s, {stats.seconds:.1f}s)",
        )
        if not state.best or valid[metric] > state.best["valid"][metric]:
            assert self.probe is not None
            row["final_train_loss"] = measure_train_loss(trainer, self.probe)
            state.best, state.stale = row, 0
            meta = {
                "model": trainer.model_identity(),
                "epoch": epoch,
                "step": trainer.step,
                "train_loss": row["final_train_loss"],
                "epoch_mean_train_loss": stats.mean_loss,
                "valid": valid,
                **provenance(c, ctx.world_size),
            }
            save_checkpoint(self.best_path, trainer.model_state(), meta)
        else:
            state.stale += 1
            if state.stale >= c.train.early_stopping_patience:
                progress(ctx.rank, f"{self.tag} early stop: no {metric} gain for {state.stale} epochs")
                state.stopped = True

    def finish(self, run: JobRun) -> dict[str, Any]:
        c, ctx, trainer, best = run.config, run.ctx, run.trainer, run.state.best
        load_checkpoint(self.best_path, trainer.model_state())
        test = evaluation(trainer, "test")
        options = EvalOptions(c.eval.batch_users)
        popular = evaluate_most_popular(run.dataset, "test", c.eval.ks, ctx, options, evaluated_metrics()).metrics
        return {
            **test,
            "split": "test",
            "job": self.kind,
            "checkpoint": str(self.best_path),
            "best_epoch": best["epoch"],
            "train_loss": best["final_train_loss"],  # l_hat for MoRec
            "epoch_mean_train_loss": best["train_loss"],
            "valid": best["valid"],
            "baselines": {"most_popular": popular},
            "history": run.state.history,
        }

    def final_line(self, result: dict[str, Any]) -> str:
        k, popular = self.k, result["baselines"]["most_popular"]
        return (
            f"{self.tag} test hit@{k} {result[f'hit@{k}']:.4f} ndcg@{k} {result[f'ndcg@{k}']:.4f} "
            f"(most popular {popular[f'hit@{k}']:.4f} / {popular[f'ndcg@{k}']:.4f})"
        )


def run_pretrain(config: Config, resume: bool | None = None) -> dict[str, Any]:
    return run_job(config, PretrainJob(config), resume)
