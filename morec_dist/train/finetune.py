"""``morec finetune``: continue a pretrained model with MoRec, or with a baseline.

Methods (``--method``):
- ``morec``: MoRec batches (a uniform accuracy block + one block per auxiliary objective,
  drawn from the coordinator's p_k), the combined loss with the coordinator's beta,
  per-block losses reported to the central Ray actor, sampler updates from validation
  signals on the configured cadence;
- ``static``: uniform batches, fixed weights over the four objective losses;
- ``mgda``: uniform batches, MGDA's min-norm weights every step.
Every method evaluates on valid after each epoch and on test at the end, writing
``metrics.json`` (for MoRec with the beta / loss trace and the coordinator's history).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from morec_dist.config import Config
from morec_dist.coordinator.core import build_spec
from morec_dist.coordinator.sampler import GroupStats
from morec_dist.coordinator.service import connect_ray, open_coordinator
from morec_dist.eval.signals import compute_signals
from morec_dist.model.sharding import init_distributed
from morec_dist.train.checkpoint import check_compatible, load_checkpoint, read_meta, save_checkpoint
from morec_dist.train.loop import open_rank_observer, progress, train_epoch
from morec_dist.train.pretrain import evaluation, make_reader, open_dataset_for_job
from morec_dist.train.run_dir import provenance, write_json_atomic
from morec_dist.train.strategies import MGDAStrategy, MorecStrategy, StaticWeighting
from morec_dist.train.trainer import Trainer, build_features

METHODS = ("morec", "static", "mgda")


def load_pretrained(trainer: Trainer, checkpoint: Path) -> dict[str, Any]:
    meta = read_meta(checkpoint)
    check_compatible(meta, trainer.model_identity(), checkpoint)
    load_checkpoint(checkpoint, trainer.model_state())
    return meta


def static_weights(config: Config) -> list[float]:
    """Matching weights for the baseline: accuracy 1, objective k lambda * w_k."""
    return [1.0] + [config.morec.lam * o.weight for o in config.morec.objectives]


def build_morec(config: Config, trainer: Trainer, target_loss: float):
    ctx, dataset = trainer.ctx, trainer.dataset
    objectives = config.morec.objectives
    reader = make_reader(config, ctx, dataset, trainer, objectives=[(o.name, o.group_column) for o in objectives])
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    spec = build_spec(config, stats, world_size=ctx.world_size, target_loss=target_loss, steps_per_epoch=reader.num_batches)
    connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}:{Path(config.run.out_dir).resolve()}"
    client = open_coordinator(config.coordinator, spec, run_id=run_id, rank=ctx.rank)
    requests = spec.objectives.signal_requests()

    def measure(step: int) -> dict[str, list[float]]:
        return compute_signals(
            requests, trainer.model, dataset, trainer.features,
            rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
            num_negatives=config.data.num_negatives, negative_alpha=config.data.negative_alpha,
            seed=config.run.seed, batch_users=config.eval.batch_users,
        )

    strategy = MorecStrategy(client, reader, spec.objectives.num_blocks, spec.sampler_every if requests else 0, measure, submits=ctx.rank == 0)
    return reader, strategy, client


def run_finetune(config: Config, from_checkpoint: str | Path, method: str = "morec") -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {METHODS}")
    if config.morec.embedding_lr:
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, embedding_lr=config.morec.embedding_lr))
    ctx = init_distributed()
    started = time.perf_counter()
    run_dir = Path(config.run.out_dir)
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    meta = load_pretrained(trainer, Path(from_checkpoint))
    target_loss = config.morec.pid.target_loss or float(meta["train_loss"])
    client = None
    if method == "morec":
        reader, strategy, client = build_morec(config, trainer, target_loss)
    else:
        reader = make_reader(config, ctx, dataset, trainer)
        objectives = config.morec.objectives
        strategy = StaticWeighting(dataset, objectives, static_weights(config)) if method == "static" else MGDAStrategy(dataset, objectives)
    metrics, exporter = open_rank_observer(config, ctx)
    before = evaluation(trainer, "valid")
    history = []
    train_seconds, train_rows = 0.0, 0
    for epoch in range(config.morec.epochs):
        reader.set_epoch(epoch)
        trainer.epoch = epoch
        stats = train_epoch(trainer, reader, strategy, epoch=epoch, log_every=config.train.log_every, max_steps=config.train.max_steps, metrics=metrics)
        train_seconds += stats.seconds
        train_rows += stats.rows
        valid = evaluation(trainer, "valid")
        history.append({"epoch": epoch, "train_loss": stats.mean_loss, "rows_per_s": stats.rows_per_s, "valid": valid, **stats.extra})
        progress(ctx.rank, f"[{method}] epoch {epoch} loss {stats.mean_loss:.4f} valid hit@10 {valid['hit@10']:.4f} r_hit@10 {valid['r_hit@10']:.3f} min_hit@10 {valid['min_hit@10']:.4f} pop_kl@10 {valid['pop_kl@10']:.3f}")
        if config.train.max_steps and trainer.step >= config.train.max_steps:
            break
    reader.close()
    if exporter is not None:
        exporter.stop()
    coordinator: dict[str, Any] = {}
    if client is not None:
        client.flush()
        coordinator = coordinator_record(client, strategy)
    final = run_dir / "checkpoints" / "final"
    save_checkpoint(final, trainer.model_state(), {"model": trainer.model_identity(), "step": trainer.step, "method": method, "from": str(from_checkpoint), **provenance(config, ctx.world_size)})
    test = evaluation(trainer, "test")
    result = {
        **test,
        "split": "test",
        "job": f"finetune:{method}",
        "from_checkpoint": str(from_checkpoint),
        "target_loss": target_loss,
        "valid_before": before,
        "history": history,
        "coordinator": coordinator,
        "wall_s": time.perf_counter() - started,
        "train_rows_per_s": train_rows / max(train_seconds, 1e-9),
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        write_json_atomic(run_dir / "metrics.json", result)
        progress(ctx.rank, f"[{method}] test hit@10 {test['hit@10']:.4f} r_hit@10 {test['r_hit@10']:.3f} min_hit@10 {test['min_hit@10']:.4f} pop_kl@10 {test['pop_kl@10']:.3f}; wrote {run_dir / 'metrics.json'}")
    return result


def coordinator_record(client: Any, strategy: MorecStrategy) -> dict[str, Any]:
    """The coordinator's trace (beta, global losses per step), history, and this rank's waits."""
    import ray

    return {
        "trace": ray.get(client.actor.trace.remote()),
        "history": ray.get(client.actor.history.remote()),
        "client": client.stats(),
        "sampler_updates": strategy.sampler_updates,
    }
