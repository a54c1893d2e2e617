"""torchrun rank program of ``benchmarks/pareto.py``: per-user rankings of saved models, so
that any slice of users (the selection slice of validation users, fairness groups) can be
scored afterwards without ranking again.

    python -m torch.distributed.run --nproc_per_node=1 -m benchmarks.dist_pareto_eval --jobs JOBS.json

``JOBS.json``: {"config_from": a checkpoint whose recorded config builds the model, "meta_out":
npz path, "jobs": [{"out": npz, "checkpoint": dir} | {"out": npz, "mix": [pretrained dir,
fine-tuned dir], "alpha": a}]}. A ``mix`` job evaluates the weights (1 - a) x pretrained +
a x fine-tuned (every tensor of the model's state, this rank's shards). Per job one npz with,
for ``valid`` and ``test``: ``<split>_users``, ``<split>_targets`` (held-out items),
``<split>_ranks`` (1-based, the protocol's, ``eval/ranking.py``) and ``<split>_top`` (the
top-K list). ``meta_out`` gets the item columns the metrics read (price, fair_group,
align_group, q_star). A job whose npz exists is skipped (the study resumes); files are
written atomically by rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("valid", "test")


def local_tensors(state: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """This rank's storage of every tensor of a model state dict (shards of a ShardedTensor,
    the local part of a DTensor): views, so writing them writes the model."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: dict[str, list[torch.Tensor]] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out[key] = [s.tensor for s in value.local_shards()]
        elif isinstance(value, DTensor):
            out[key] = [value.to_local()]
        elif isinstance(value, torch.Tensor):
            out[key] = [value]
    return out


def snapshot(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    return {k: [t.detach().clone() for t in ts] for k, ts in local_tensors(model.state_dict()).items()}


@torch.no_grad()
def mix_into(model: torch.nn.Module, a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]], alpha: float):
    """Write (1 - alpha) a + alpha b into the model's tensors in place (floating ones; others from a)."""
    for key, targets in local_tensors(model.state_dict()).items():
        for target, x, y in zip(targets, a[key], b[key], strict=True):
            target.copy_(torch.lerp(x, y, alpha) if target.is_floating_point() else x)


def per_user(trainer: Any, users: dict[str, Any], k: int) -> dict[str, np.ndarray]:
    """Every user's held-out rank and top-k list on each split (the protocol's ranking)."""
    from morec_dist.eval.ranking import EvalOptions, model_scorer, ranked_batches, stop_checker
    from morec_dist.model.sharding import unwrap

    ctx, data, model = trainer.ctx, trainer.dataset, trainer.model
    options = EvalOptions(batch_users=trainer.config.eval.batch_users)
    model.eval()
    out: dict[str, np.ndarray] = {}
    for split, user_set in users.items():
        scorer = model_scorer(unwrap(model), trainer.features, ctx, stop_checker(ctx, options))
        ranks = np.zeros(len(user_set), dtype=np.int64)
        top = np.zeros((len(user_set), k), dtype=np.int32)
        for batch in ranked_batches(scorer, user_set, data.num_items, k, ctx, options):
            ranks[batch.start : batch.stop] = batch.ranks.cpu().numpy()
            top[batch.start : batch.stop] = batch.top_items[:, :k].cpu().numpy()
        out.update(
            {
                f"{split}_users": user_set.user_ids,
                f"{split}_targets": user_set.targets,
                f"{split}_ranks": ranks,
                f"{split}_top": top,
            }
        )
    return out


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    os.replace(tmp, path)


def run(spec: dict[str, Any]) -> None:
    from morec_dist.data import storage
    from morec_dist.distributed import shutdown_distributed
    from morec_dist.eval.evaluator import ItemMeta, load_users
    from morec_dist.plugins import prepare
    from morec_dist.train.checkpoint_meta import checkpoint_config
    from morec_dist.train.runner import load_pretrained, setup_job

    config = prepare(checkpoint_config(spec["config_from"]))
    ctx, dataset, trainer = setup_job(config)
    k = max(config.eval.ks)
    if ctx.rank == 0 and not Path(spec["meta_out"]).exists():
        meta = ItemMeta.from_dataset(dataset)
        save_npz(
            Path(spec["meta_out"]),
            {
                "price": meta.price,
                "fair_group": meta.fair_group,
                "align_group": meta.align_group,
                "q_star": meta.q_star,
            },
        )
    users = {split: load_users(dataset, split, ctx) for split in SPLITS}
    snapshots: dict[str, dict[str, list[torch.Tensor]]] = {}

    def weights_of(path: str) -> dict[str, list[torch.Tensor]]:
        if path not in snapshots:
            load_pretrained(trainer, storage.location(path))
            snapshots[path] = snapshot(trainer.model)
        return snapshots[path]

    for job in spec["jobs"]:
        out = Path(job["out"])
        if out.exists():
            continue
        if "mix" in job:
            a, b = (weights_of(p) for p in job["mix"])
            mix_into(trainer.model, a, b, float(job["alpha"]))
        else:
            load_pretrained(trainer, storage.location(job["checkpoint"]))
        arrays = per_user(trainer, users, k)
        if ctx.rank == 0:
            save_npz(out, arrays)
            print(f"evaluated {out.name}", flush=True)
    shutdown_distributed(exit_code=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=Path, required=True)
    args = parser.parse_args()
    run(json.loads(args.jobs.read_text()))


if __name__ == "__main__":
    main()
