"""A rank's cost of the sampler's signal update and of the budget law's control measurement
(eval/ranking.py) at MovieLens-1M's size, against eval/ranking.py at another commit.

    python -m benchmarks.signal_pass --quick --baseline-commit REV   # about a minute
    python -m benchmarks.signal_pass --baseline-commit REV --out FILE.json

What rank 0 of a 2-rank job runs, in one process with one torch thread (torchrun's default
per rank): a **signal update** (``compute_signals``: every validation user, top-100 lists,
the held-out item and 10 negatives picked, batches of ``eval.batch_users`` = 1,024, then the
signals' per-batch work: the top-k histogram, Hit@10, the BPR loss of the picked scores) and a
**control measurement** (``HeldoutSlice.hit``: the control slice, ranks only, one batch),
both through ``ranked_batches`` on the dataset's users, held-out items and histories of
rank 0's item range. The scorer is a fixed random matrix factorisation (float32 user vectors
@ the range's item vectors, dim 64): no embedding lookup is timed. The 2-rank all_gather is
rank 0's payload stacked twice (the merge sees 2k candidates per user), all_reduce the
identity; so the figures leave out the collectives' waits and the sharded lookups.

The baseline is eval/ranking.py at ``--baseline-commit`` (``git show``), loaded next to the
working tree's as a second module (the rest of morec_dist is the working tree's, for both).
The two alternate pass by pass in the same process (which goes first alternates too), so
both see the same load; each pass is timed in wall seconds and in the process's CPU seconds
(less sensitive to a loaded machine's time slicing), medians over every pass. One untimed
pass of each hashes every held-out rank, top-k list and signal value: the two hashes must be
equal, or the benchmark fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import REPO, Recorder, bench_parser, default_out, note

DEFAULT_DATA = REPO / ".data" / "movielens-1m"
WORLD = 2
SIGNAL_K, NEGATIVES, HIT_K, BATCH_USERS, GROUPS = 100, 10, 10, 1024, 5
PASSES = ("signal_update", "control_measurement")
VARIANTS = ("baseline", "current")


def baseline_module(commit: str, tmp: Path) -> ModuleType:
    """eval/ranking.py at ``commit`` as a module of its own (its imports: the working tree's)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:morec_dist/eval/ranking.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = tmp / "ranking_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ranking_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_passes(data: Path, seed: int, module: ModuleType) -> tuple[dict[str, Callable[[Any], None]], dict[str, Any]]:
    """The two passes through ``module``'s ``ranked_batches``: {name: run(digest or None)}."""
    import numpy as np
    import torch

    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.distributed.context import DistContext
    from morec_dist.eval.evaluator import load_users
    from morec_dist.eval.slices import HeldoutSlice

    setattr(module, "all_gather_stack", lambda t, ctx: torch.stack([t] * WORLD))  # noqa: B010 - rank 0's payload, twice
    ds = PreparedDataset.open(data)
    ctx = DistContext(0, WORLD, 0, torch.device("cpu"), "gloo", None)  # no process group
    users = load_users(ds, "valid", ctx)
    control = HeldoutSlice.load(ds, ctx, "control", seed, 0.5).users
    lo, hi = module.item_range(ds.num_items, ctx)
    g = torch.Generator().manual_seed(seed)
    user_vectors = torch.randn(ds.num_users + 1, 64, generator=g) * 0.3
    items_t = (torch.randn(ds.num_items + 1, 64, generator=g) * 0.3)[lo:hi].t()
    rng = np.random.default_rng([seed, 7919])
    negatives = rng.integers(1, ds.num_items + 1, (len(users), NEGATIVES))
    groups = torch.from_numpy(rng.integers(1, GROUPS + 1, ds.num_items + 1))

    def scorer(ids: np.ndarray) -> torch.Tensor:
        return user_vectors[torch.from_numpy(ids)] @ items_t

    def signal_update(digest: Any) -> None:
        options = module.EvalOptions(batch_users=BATCH_USERS)
        for b in module.ranked_batches(scorer, users, ds.num_items, SIGNAL_K, ctx, options, negatives):
            histogram = module.band_counts(b.top_items, SIGNAL_K, groups, GROUPS)
            hits = (b.ranks <= HIT_K).to(torch.float64)
            picked = b.picked.to(b.score_dtype)
            loss = -torch.nn.functional.logsigmoid(picked[:, :1] - picked[:, 1:]).mean(dim=1)
            if digest is not None:
                for t in (b.ranks, b.top_items, histogram, hits, loss):
                    digest.update(t.numpy().tobytes())

    def control_measurement(digest: Any) -> None:
        per_batch = module.ranks_only_batch_users(BATCH_USERS, ds.num_items, WORLD)
        options = module.EvalOptions(batch_users=per_batch)
        for b in module.ranked_batches(scorer, control, ds.num_items, 0, ctx, options):
            if digest is not None:
                digest.update(b.ranks.numpy().tobytes())

    sizes = {"signal_users": len(users), "control_users": len(control), "item_range": [lo, hi]}
    return {"signal_update": signal_update, "control_measurement": control_measurement}, sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--baseline-commit", default="HEAD", help="the commit whose eval/ranking.py is the baseline")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--reps", type=int, default=None, help="timed passes of each (default 6 quick, 30 full)")
    args = parser.parse_args(argv)
    reps = args.reps or (6 if args.quick else 30)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline_commit], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    recorder = Recorder(
        "signal_pass",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={"data": str(args.data), "reps": reps, "world": WORLD, "baseline_commit": commit, "torch_threads": 1},
        note_text=note(args.note),
    )
    import torch

    from morec_dist.eval import ranking

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="signal_pass-") as tmp:
        modules = {"baseline": baseline_module(commit, Path(tmp)), "current": ranking}
    passes, sizes = {}, {}
    for name, module in modules.items():
        passes[name], sizes[name] = make_passes(args.data, args.seed, module)
    digests: dict[str, dict[str, str]] = {}
    for name in VARIANTS:  # warm-up, hashed
        digests[name] = {}
        for p in PASSES:
            digest = hashlib.sha256()
            passes[name][p](digest)
            digests[name][p] = digest.hexdigest()
    if digests["baseline"] != digests["current"]:
        raise RuntimeError(f"the ranks, top-k lists or signals differ: {digests}")
    wall: dict[str, dict[str, list[float]]] = {p: {v: [] for v in VARIANTS} for p in PASSES}
    cpu: dict[str, dict[str, list[float]]] = {p: {v: [] for v in VARIANTS} for p in PASSES}
    for rep in range(reps):
        for p in PASSES:
            for name in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                started, cpu_started = time.perf_counter(), time.process_time()
                passes[name][p](None)
                wall[p][name].append(time.perf_counter() - started)
                cpu[p][name].append(time.process_time() - cpu_started)
    summary: dict[str, Any] = {}
    for p in PASSES:
        for unit, times in (("s", wall), ("cpu_s", cpu)):
            medians = {v: statistics.median(times[p][v]) for v in VARIANTS}
            summary[f"{p}_{unit}"] = {**medians, "speedup": medians["baseline"] / medians["current"]}
    recorder.update(
        {"summary": summary, "wall_s": wall, "cpu_s": cpu, "identical_results": digests, "sizes": sizes["current"]}
    )
    out = args.out or default_out("signal_pass", args.quick)
    result = recorder.write(out)
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
