"""``morec evaluate``: score a saved checkpoint under the protocol of docs/data.md.

The model is rebuilt from the config recorded in the checkpoint (overrides may change the
data path, ranks or K list, not the model), loaded (DCP reshards, so any number of ranks
works), evaluated on the split, and ``metrics.json`` is written next to the result. The
checkpoint and ``--out`` may be filesystem URIs (s3://...): the result is then one upload,
visible whole or not at all (train/run_dir.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morec_dist.config import Config
from morec_dist.data import storage
from morec_dist.data.storage import StoragePath
from morec_dist.eval.evaluator import evaluate_most_popular
from morec_dist.eval.ranking import EvalOptions
from morec_dist.train.run_dir import provenance, run_path, write_json_atomic
from morec_dist.train.runner import evaluated_metrics, evaluation, load_pretrained, setup_job


def _default_out(config: Config, checkpoint: str | Path, split: str) -> StoragePath:
    """Beside the checkpoints' run directory; for a checkpoint at a URI, in run.out_dir
    (itself a path or a URI)."""
    if storage.is_uri(str(checkpoint)):
        return run_path(config.run.out_dir) / f"metrics-{split}.json"
    return Path(checkpoint).parent.parent / f"metrics-{split}.json"


def run_evaluate(
    config: Config, checkpoint: str | Path, split: str = "test", out: str | Path | None = None
) -> dict[str, Any]:
    ctx, dataset, trainer = setup_job(config)  # the runner's setup; evaluation has no epochs
    load_pretrained(trainer, storage.location(checkpoint))
    metrics = evaluation(trainer, split)
    popular = evaluate_most_popular(
        dataset, split, config.eval.ks, ctx, EvalOptions(config.eval.batch_users), evaluated_metrics()
    )
    payload = {
        **metrics,
        "split": split,
        "job": "evaluate",
        "checkpoint": str(checkpoint),
        "baselines": {"most_popular": popular.metrics},
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        path = write_json_atomic(run_path(out) if out else _default_out(config, checkpoint, split), payload)
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "@" in k), flush=True)
        print(f"wrote {path}", flush=True)
    return payload
