"""Why test min-Hit@10 moves or not: per fairness group, validation against test, for checkpoints.

    python -m benchmarks.fairness_groups --checkpoint runs/.../checkpoints/best [--checkpoint ...]

For each checkpoint, per ``fair_group`` of the held-out item: the users of the valid and the
test split, their Hit@10 and hit counts, and the fairness signals the sampler reads on
validation (``group_loss``, ``group_hit``; eval/signals.py). It also says which group is the
worst by each, so one sees whether the group the sampler lifts is the one test measures
(docs/coordinator.md, "Why test min-Hit@10 does not move"). One rank, the model rebuilt
from the config recorded in the checkpoint; writes ``benchmarks/results/fairness_groups.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, Recorder, bench_parser, note, torchrun

K = 10


def measure(checkpoint: Path) -> dict[str, Any]:
    """This process is one torchrun rank (world size 1): the per-group figures of one checkpoint."""
    import numpy as np

    from morec_dist.coordinator.objectives import SIGNAL_GROUP_HIT, SIGNAL_GROUP_LOSS, SignalRequest
    from morec_dist.eval.evaluator import ItemMeta, evaluate, heldout_rows
    from morec_dist.eval.signals import SignalOptions, compute_signals
    from morec_dist.train.checkpoint_meta import checkpoint_config
    from morec_dist.train.runner import load_pretrained, setup_job

    config = checkpoint_config(checkpoint)
    ctx, dataset, trainer = setup_job(config)
    load_pretrained(trainer, checkpoint)
    meta = ItemMeta.from_dataset(dataset)
    groups = int(meta.fair_group.max())
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "seed": config.run.seed, "groups": groups}
    for split in ("valid", "test"):
        result = evaluate(trainer.model, dataset, split, [K], trainer.features, ctx)
        group = meta.fair_group[heldout_rows(dataset, split)[1]]  # sorted by user: the result's order
        hits = (result.ranks <= K).astype(np.float64)
        n = np.bincount(group, minlength=groups + 1)[1:]
        h = np.bincount(group, weights=hits, minlength=groups + 1)[1:]
        out[split] = {"users": n.tolist(), "hits": h.tolist(), f"min_hit@{K}": result.metrics[f"min_hit@{K}"]}
        out[split]["worst_by_hit"] = int(np.argmin(h / np.maximum(n, 1))) + 1
    requests = [
        SignalRequest("loss", SIGNAL_GROUP_LOSS, "fair_group", groups),
        SignalRequest("hit", SIGNAL_GROUP_HIT, "fair_group", groups, K),
    ]
    options = SignalOptions(
        config.data.num_negatives, config.data.negative_alpha, config.run.seed, loss_fn=trainer.loss_fn
    )
    signals = compute_signals(requests, trainer.model, dataset, trainer.features, ctx, options)
    loss = np.asarray(signals["loss"])
    out["valid_group_loss"] = loss.tolist()
    out["valid_worst_by_loss"] = [int(g) + 1 for g in np.argsort(-loss, kind="stable")]
    return out


def worker(checkpoint: str, out: str) -> None:
    Path(out).write_text(json.dumps(measure(Path(checkpoint))))


def table(entry: dict[str, Any]) -> list[str]:
    v, t = entry["valid"], entry["test"]
    lines = [
        f"{entry['checkpoint']} (seed {entry['seed']})",
        "group | valid users | valid hit | valid loss | test users | test hit",
    ]
    for g in range(entry["groups"]):
        vh, vn, th, tn = v["hits"][g], v["users"][g], t["hits"][g], t["users"][g]
        lines.append(
            f"{g + 1} | {vn} | {vh / max(vn, 1):.3f} ({vh:.0f}) | {entry['valid_group_loss'][g]:.3f} | {tn} | "
            f"{th / max(tn, 1):.3f} ({th:.0f})"
        )
    lines.append(
        f"worst: valid by loss {entry['valid_worst_by_loss'][0]}, valid by hit {v['worst_by_hit']}, "
        f"test by hit {t['worst_by_hit']}"
    )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    args = parser.parse_args(argv)
    out = args.out or RESULTS / "fairness_groups.json"
    recorder = Recorder(
        "fairness_groups",
        mode="full",
        seed=args.seed,
        config={"checkpoints": [str(c) for c in args.checkpoint], "k": K},
        note_text=note(args.note),
    )
    entries: list[dict[str, Any]] = []
    for checkpoint in args.checkpoint:
        part = out.with_name(f".{out.stem}-{len(entries)}.json")
        torchrun("benchmarks.fairness_groups", ["--worker", str(checkpoint), str(part)], nproc=1)
        entries.append(json.loads(part.read_text()))
        part.unlink()
        print("\n".join(table(entries[-1])), flush=True)
    recorder.update({"checkpoints": entries})
    return recorder.write(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
