"""``morec finetune``: continue a pretrained model with MoRec, or with a baseline.

Methods (``--method``):
- ``morec``: MoRec batches (a uniform accuracy block + one block per auxiliary objective,
  drawn from the coordinator's p_k), the combined loss with the coordinator's beta,
  per-block loss sums reduced over the ranks and reported by rank 0 to the central Ray
  actor (``coordinator.protocol = "global"``; ``"per_rank"``: every rank reports, the
  benchmark baseline), sampler updates from validation signals on the configured cadence;
- ``static``: uniform batches, fixed weights over the four objective losses;
- ``mgda``: uniform batches, MGDA's min-norm weights every step.
Every method evaluates on valid after each epoch and on test at the end, writing
``metrics.json`` (for MoRec with the beta / loss trace and the coordinator's history).

Step checkpoints (``checkpoints/step-<N>``: every ``checkpoint.every_steps``, each epoch's
end, SIGTERM) and resume from the latest one are ``morec_dist.train.resume``'s; for MoRec
they include the coordinator's state, which a resumed job configures the actor with.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from morec_dist.config import Config, ConfigError, check_per_rank_fits
from morec_dist.coordinator.client import CoordinatorClient
from morec_dist.coordinator.collective import GlobalCoordinatorClient, new_groups
from morec_dist.coordinator.core import CoordinatorError, build_spec
from morec_dist.coordinator.objectives import ObjectiveError
from morec_dist.coordinator.sampler import GroupStats, SamplerError
from morec_dist.coordinator.service import connect_ray, open_coordinator
from morec_dist.data.reader import batch_sizes
from morec_dist.eval.signals import compute_signals
from morec_dist.model.sharding import init_distributed
from morec_dist.train.checkpoint import check_compatible, load_checkpoint, read_meta, save_checkpoint
from morec_dist.train.loop import open_rank_observer, progress
from morec_dist.train.pretrain import evaluation, make_reader, open_dataset_for_job
from morec_dist.train.resume import (
    Checkpointing,
    ResumePoint,
    checkpointed_epoch,
    coordinator_state_for,
    join_restarted_group,
)
from morec_dist.train.run_dir import provenance, write_json_atomic
from morec_dist.train.strategies import MGDAStrategy, MorecStrategy, StaticWeighting
from morec_dist.train.trainer import Trainer, all_reduce_sum, build_features

METHODS = ("morec", "static", "mgda")


def load_pretrained(trainer: Trainer, checkpoint: Path) -> dict[str, Any]:
    meta = read_meta(checkpoint)
    check_compatible(meta, trainer.model_identity(), checkpoint)
    load_checkpoint(checkpoint, trainer.model_state())
    return meta


def static_weights(config: Config) -> list[float]:
    """Matching weights for the baseline: accuracy 1, objective k lambda * w_k."""
    return [1.0] + [config.morec.lam * o.weight for o in config.morec.objectives]


def steps_per_epoch(config: Config, trainer: Trainer) -> int:
    """Batches per epoch on each rank (the same on every rank), without opening a reader."""
    rows = trainer.dataset.split_rows("train")
    return len(batch_sizes(rows, config.data.batch_size, trainer.ctx.world_size, trainer.ctx.rank))


def build_morec(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
    ctx, dataset = trainer.ctx, trainer.dataset
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    per_rank = config.coordinator.protocol == "per_rank"
    if per_rank:
        check_per_rank_fits(ctx.world_size, config.coordinator.staleness)
    # the global protocol's core has one reporter (rank 0, with the reduced sums)
    reporters = ctx.world_size if per_rank else 1
    try:
        spec = build_spec(
            config,
            stats,
            world_size=reporters,
            target_loss=target_loss,
            steps_per_epoch=steps_per_epoch(config, trainer),
        )
    except (ObjectiveError, SamplerError) as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None
    # the reader's version 0 is the coordinator's version 0 (its initial p_k)
    initial = {name: p.tolist() for name, p in spec.objectives.initial_probabilities().items()}
    try:
        reader = make_reader(
            config,
            ctx,
            dataset,
            trainer,
            objectives=[(o.name, o.group_column, o.row_weight_column) for o in spec.objectives.objectives],
            probabilities=initial,
        )
    except ValueError as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}:{Path(config.run.out_dir).resolve()}:restart{restart}"
    state, first_step = None, 0
    if resume is not None and resume.coordinator is not None:
        first_step = resume.step
        if per_rank or ctx.rank == 0:
            state = coordinator_state_for(resume.coordinator, reporters)
    if per_rank:
        connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
        client: CoordinatorClient | GlobalCoordinatorClient = open_coordinator(
            config.coordinator, spec, run_id=run_id, rank=ctx.rank, state=state, first_step=first_step
        )
    else:
        client = open_global_coordinator(config, spec, ctx, run_id=run_id, state=state, first_step=first_step)
    requests = spec.objectives.signal_requests()

    def measure(step: int) -> dict[str, list[float]]:
        return compute_signals(
            requests,
            trainer.model,
            dataset,
            trainer.features,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
            num_negatives=config.data.num_negatives,
            negative_alpha=config.data.negative_alpha,
            seed=config.run.seed,
            batch_users=config.eval.batch_users,
        )

    strategy = MorecStrategy(
        client,
        reader,
        spec.objectives.num_blocks,
        spec.sampler_every if requests else 0,
        measure,
        submits=ctx.rank == 0,
    )
    return reader, strategy, client


def open_global_coordinator(
    config: Config, spec: Any, ctx: Any, *, run_id: str, state: Any, first_step: int
) -> GlobalCoordinatorClient:
    """The global protocol: gloo groups on every rank (a collective); only rank 0 joins Ray."""
    groups = new_groups()
    inner = None
    if ctx.rank == 0:
        connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
        inner = open_coordinator(config.coordinator, spec, run_id=run_id, rank=0, state=state, first_step=first_step)
    client = GlobalCoordinatorClient(
        rank=ctx.rank,
        world_size=ctx.world_size,
        staleness=spec.staleness,
        num_blocks=spec.objectives.num_blocks,
        weight_names=list(spec.objectives.weights()),
        prob_sizes={name: len(p) for name, p in spec.objectives.initial_probabilities().items()},
        inner=inner,
        groups=groups,
    )
    client.start(first_step)
    return client


COORDINATOR_CHECKPOINT_TRIES = 3


def coordinator_checkpoint(client: Any, trainer: Trainer) -> dict[str, Any] | None:
    """Every rank's reports recorded (flush + barrier), then the coordinator's state: it
    holds every step < trainer.step. Each client keeps it as the base of a recovery.

    A coordinator that died and was restored by one rank inside this window may lack
    another rank's reports; the ranks check that the state is complete (every step < N
    aggregated, nothing pending), and otherwise each replays its log and they retry."""
    ctx = trainer.ctx
    fetches = client.holds_state
    for _ in range(COORDINATOR_CHECKPOINT_TRIES):
        client.flush()
        if dist.is_initialized():
            dist.barrier(group=ctx.pg)
        state = client.state_dict() if fetches else None
        complete = state is None or (state["aggregated_through"] == trainer.step - 1 and not state["pending"])
        if all_reduce_sum([0.0 if complete else 1.0], ctx)[0] == 0:  # also the barrier before step N
            client.mark_checkpoint(state, trainer.step)
            return state
        client.resync()
    raise CoordinatorError(
        f"step {trainer.step}: the coordinator state stayed incomplete after {COORDINATOR_CHECKPOINT_TRIES} tries"
    )


def run_finetune(
    config: Config, from_checkpoint: str | Path, method: str = "morec", resume: bool | None = None
) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {METHODS}")
    if config.morec.embedding_lr:
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, embedding_lr=config.morec.embedding_lr)
        )
    join_restarted_group()
    ctx = init_distributed()
    started = time.perf_counter()
    run_dir = Path(config.run.out_dir)
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    checkpoints = Checkpointing(config, trainer, f"finetune:{method}")
    point = checkpoints.resume_point(config.run.resume if resume is None else resume)
    meta = load_pretrained(trainer, Path(from_checkpoint))
    target_loss = config.morec.pid.target_loss or float(meta["train_loss"])
    client = None
    if method == "morec":
        reader, strategy, client = build_morec(config, trainer, target_loss, point)
        checkpoints.preemption.install()  # ray.init replaced the SIGTERM handler with its own
    else:
        reader = make_reader(config, ctx, dataset, trainer)
        objectives = config.morec.objectives
        strategy = (
            StaticWeighting(dataset, objectives, static_weights(config))
            if method == "static"
            else MGDAStrategy(dataset, objectives)
        )
    metrics, exporter = open_rank_observer(config, ctx)
    job: dict[str, Any] = {"history": [], "train_seconds": 0.0, "train_rows": 0}
    resumed_progress = None
    if point is not None:
        checkpoints.restore(point, reader, strategy)
        job.update({k: v for k, v in point.job.items() if k != "next_epoch"})
        resumed_progress = point.epoch_progress
    else:
        job["before"] = evaluation(trainer, "valid")
    start_epoch = point.next_epoch if point is not None else 0
    coordinator = (lambda: coordinator_checkpoint(client, trainer)) if client is not None else None
    max_steps = config.train.max_steps
    for epoch in range(start_epoch, config.morec.epochs):
        if max_steps and trainer.step >= max_steps:
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
            save_extra={"strategy": strategy, "coordinator": coordinator},
        )
        valid = evaluation(trainer, "valid")
        job["history"].append(
            {
                "epoch": epoch,
                "train_loss": stats.mean_loss,
                "rows_per_s": stats.rows_per_s,
                "valid": valid,
                **stats.extra,
            }
        )
        progress(
            ctx.rank,
            f"[{method}] epoch {epoch} loss {stats.mean_loss:.4f} valid hit@10 {valid['hit@10']:.4f} r_hit@10 "
            f"{valid['r_hit@10']:.3f} min_hit@10 {valid['min_hit@10']:.4f} pop_kl@10 {valid['pop_kl@10']:.3f}",
        )
        checkpoints.save(reader=reader, next_epoch=epoch + 1, job_state=job, strategy=strategy, coordinator=coordinator)
        if checkpoints.preemption.agreed(ctx.pg, ctx.world_size):
            checkpoints.exit_preempted()
    reader.close()
    if exporter is not None:
        exporter.stop()
    coordinator_out: dict[str, Any] = {}
    if client is not None:
        client.close()
        coordinator_out = coordinator_record(client, strategy) if client.holds_state else {"client": client.stats()}
    final = run_dir / "checkpoints" / "final"
    save_checkpoint(
        final,
        trainer.model_state(),
        {
            "model": trainer.model_identity(),
            "step": trainer.step,
            "method": method,
            "from": str(from_checkpoint),
            **provenance(config, ctx.world_size),
        },
    )
    test = evaluation(trainer, "test")
    result = {
        **test,
        "split": "test",
        "job": f"finetune:{method}",
        "from_checkpoint": str(from_checkpoint),
        "target_loss": target_loss,
        "valid_before": job["before"],
        "history": job["history"],
        "coordinator": coordinator_out,
        "resumed_from": str(point.path) if point is not None else None,
        "checkpoints_written": checkpoints.saved,
        "wall_s": time.perf_counter() - started,
        "train_rows_per_s": job["train_rows"] / max(job["train_seconds"], 1e-9),
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        write_json_atomic(run_dir / "metrics.json", result)
        progress(
            ctx.rank,
            f"[{method}] test hit@10 {test['hit@10']:.4f} r_hit@10 {test['r_hit@10']:.3f} min_hit@10 "
            f"{test['min_hit@10']:.4f} pop_kl@10 {test['pop_kl@10']:.3f}; wrote {run_dir / 'metrics.json'}",
        )
    return result


def coordinator_record(client: Any, strategy: MorecStrategy) -> dict[str, Any]:
    """The coordinator's trace (beta, global losses per step), history, and this rank's waits."""
    return {
        "trace": client.trace(),
        "history": client.history(),
        "state": client.state_dict(),
        "client": client.stats(),
        "sampler_updates": strategy.sampler_updates,
    }
