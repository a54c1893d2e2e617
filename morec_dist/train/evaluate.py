"""``morec evaluate``: score a saved checkpoint under the protocol of docs/data.md.

The model is rebuilt from the config recorded in the checkpoint (overrides may change the
data path, ranks or K list, not the model), loaded (DCP reshards, so any number of ranks
works), evaluated on the split, and ``metrics.json`` is written next to the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morec_dist.config import Config, config_from_dict
from morec_dist.eval.evaluator import evaluate, evaluate_most_popular
from morec_dist.model.sharding import init_distributed
from morec_dist.train.checkpoint import read_meta
from morec_dist.train.finetune import load_pretrained
from morec_dist.train.pretrain import open_dataset_for_job
from morec_dist.train.run_dir import provenance, write_json_atomic
from morec_dist.train.trainer import Trainer, build_features


def checkpoint_config(checkpoint: str | Path, overrides: Config | None = None) -> Config:
    """The config a checkpoint was trained with; data/eval/run sections may be replaced."""
    recorded = read_meta(checkpoint)["config"]
    if overrides is not None:
        fresh = overrides.to_dict()
        for section in ("data", "eval", "run"):
            recorded[section] = fresh[section]
    return config_from_dict(recorded)


def run_evaluate(
    config: Config, checkpoint: str | Path, split: str = "test", out: str | Path | None = None
) -> dict[str, Any]:
    ctx = init_distributed()
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    load_pretrained(trainer, Path(checkpoint))
    result = evaluate(
        trainer.model,
        dataset,
        split,
        config.eval.ks,
        ctx.rank,
        ctx.world_size,
        trainer.features,
        ctx.device,
        config.eval.batch_users,
    )
    popular = evaluate_most_popular(
        dataset, split, config.eval.ks, ctx.rank, ctx.world_size, ctx.device, config.eval.batch_users
    )
    payload = {
        **result.metrics,
        "split": split,
        "job": "evaluate",
        "checkpoint": str(checkpoint),
        "baselines": {"most_popular": popular.metrics},
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        path = Path(out) if out else Path(checkpoint).parent.parent / f"metrics-{split}.json"
        write_json_atomic(path, payload)
        print(" ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if "@" in k), flush=True)
        print(f"wrote {path}", flush=True)
    return payload
