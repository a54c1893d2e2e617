"""Overhead of MoRec: plain TorchRec training against MoRec training, same model, same rows per step.

    python -m benchmarks.overhead --quick --out FILE.json   # under a minute
    python -m benchmarks.overhead --out FILE.json           # more and longer windows

Both are real 2-rank torchrun jobs of the project's trainer (``benchmarks/dist_overhead.py``
is the rank program): *plain* is the uniform reader with batch size (K+1)*B and the
accuracy-only loss; *MoRec* is the MoRec reader (K+1 blocks of B) with the coordinator
(a Ray actor on a local head started here, bounded staleness). The two alternate in
windows after a warm-up, in the same job, so they share the machine's load; rows/s are
global rows over the slowest rank's window time, evaluation excluded.

Writes ``ratio`` (MoRec rows/s over plain rows/s; the target is >= 0.97),
``actor_calls_per_step`` (per-step report calls into the actor, all ranks together: 1 with
the global protocol, the world size with ``coordinator.protocol=per_rank``),
``plain_rows_per_s``, ``morec_rows_per_s``, ``coordinator_wait_fraction`` (time the ranks
spent blocked on the coordinator over MoRec's training time), per-window figures, the
cost of one sampler-signal pass and its amortised share at the configured cadence, and
machine / versions / seed / config.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Recorder, bench_env, bench_parser, default_out, note, torchrun

DEFAULT_CONFIG = REPO / "configs" / "quickstart.toml"
DEFAULT_DATA = REPO / ".data" / "movielens-1m"
SYNTHETIC_FALLBACK: dict[str, Any] = {"users": 6040, "items": 3706, "rows": 1_000_000}


def ensure_data(path: Path, seed: int) -> tuple[Path, str]:
    """The prepared dataset at ``path``, or a synthetic one of ML-1M's size if there is none."""
    from morec_dist.data.dataset import DatasetError, PreparedDataset

    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
        return path, "prepared"
    except DatasetError:
        pass
    from morec_dist.data.prepare.synthetic import generate

    synthetic = REPO / ".data" / "bench" / f"synthetic-ml1m-size-seed{seed}"
    try:
        PreparedDataset.open(synthetic, verify_checksums=False, verify_values=False)
    except DatasetError:
        generate(synthetic, seed=seed, overwrite=True, **SYNTHETIC_FALLBACK)
    return synthetic, f"synthetic {SYNTHETIC_FALLBACK} (no dataset at {path})"


def actor_calls_per_step(raw: dict[str, Any]) -> float:
    """Per-step report calls into the actor, all ranks together (rank 0's client counts them
    in the global protocol; in per_rank every rank makes one)."""
    client = raw["client"]
    if client.get("protocol") == "global":
        return client["actor_calls"] / max(client["reports"], 1)
    return float(raw["world_size"])


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    plain, morec = raw["windows"]["plain"], raw["windows"]["morec"]
    plain_rate = sum(w["rows"] for w in plain) / sum(w["seconds"] for w in plain)
    morec_seconds = sum(w["seconds"] for w in morec)
    morec_rate = sum(w["rows"] for w in morec) / morec_seconds
    # ratio of each round's adjacent windows: robust to load that drifts over the run
    per_round = [m["rows_per_s"] / p["rows_per_s"] for p, m in zip(plain, morec, strict=True)]
    morec_steps = sum(w["steps"] for w in morec)
    step_s = morec_seconds / morec_steps
    return {
        "plain_rows_per_s": plain_rate,
        "morec_rows_per_s": morec_rate,
        "ratio": morec_rate / plain_rate,
        "ratio_per_round": per_round,
        "ratio_median_of_rounds": statistics.median(per_round),
        "coordinator_wait_fraction": sum(w["coordinator_wait_s"] for w in morec) / morec_seconds,
        "reader_wait_fraction": {
            "plain": sum(w["reader_wait_s"] for w in plain) / sum(w["seconds"] for w in plain),
            "morec": sum(w["reader_wait_s"] for w in morec) / morec_seconds,
        },
        "morec_step_ms": 1000 * step_s,
        "protocol": raw.get("protocol", "per_rank"),
        "actor_calls_per_step": actor_calls_per_step(raw),
        "sampler_signal_s": raw["sampler_signal_s"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--target-loss", type=float, default=0.25, help="l_hat of the PID (does not change the work per step)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = parser.parse_args(argv)
    warmup, window, rounds = (10, 20, 2) if args.quick else (30, 60, 6)
    out = args.out or default_out("overhead", args.quick)
    data, data_kind = ensure_data(args.data, args.seed)
    overrides = [
        f'data.path="{data}"',
        f"run.seed={args.seed}",
        f"run.nproc={args.nproc}",
        "morec.sampler.update_every_steps=1000000",  # no validation pass inside a window
        *args.overrides,
    ]
    from morec_dist.config import load_config

    config = load_config(args.config, overrides)
    cadence = load_config(args.config, args.overrides).morec.sampler.update_every_steps
    recorder = Recorder(
        "overhead",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={
            "config_file": str(args.config),
            "overrides": overrides,
            "data": str(data),
            "data_kind": data_kind,
            "nproc": args.nproc,
            "warmup_steps": warmup,
            "window_steps": window,
            "rounds": rounds,
            "batch_size_per_block": config.data.batch_size,
            "objectives": [o.name for o in config.morec.objectives],
            "staleness": config.coordinator.staleness,
            "target_loss": args.target_loss,
            "job": config.to_dict(),
        },
        note_text=note(args.note),
    )
    from morec_dist.coordinator.service import start_local_ray

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    address = start_local_ray(config.coordinator.object_store_mb, namespace=namespace)
    with tempfile.TemporaryDirectory(prefix="morec-overhead-") as tmp:
        raw_path = Path(tmp) / "ranks.json"
        wall = torchrun(
            "benchmarks.dist_overhead",
            [
                "--config",
                str(args.config),
                "--warmup-steps",
                str(warmup),
                "--window-steps",
                str(window),
                "--rounds",
                str(rounds),
                "--target-loss",
                str(args.target_loss),
                "--out",
                str(raw_path),
                *overrides,
                f'coordinator.ray_address="{address}"',
                f'coordinator.namespace="{namespace}"',
                f'run.out_dir="{tmp}"',
            ],
            nproc=args.nproc,
            log=out.parent / "logs" / f"{out.stem}-ranks.log",
            env=bench_env(),
        )
        raw = json.loads(raw_path.read_text())
    import ray

    ray.shutdown()
    summary = summarise(raw)
    if cadence:
        summary["sampler_update_every_steps"] = cadence
        summary["sampler_amortised_fraction"] = summary["sampler_signal_s"] / (
            cadence * summary["morec_step_ms"] / 1000
        )
        summary["ratio_with_sampler_updates"] = summary["ratio"] / (1 + summary["sampler_amortised_fraction"])
    recorder.update({**summary, "job_wall_s": wall, "raw": raw})
    result = recorder.write(out)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "ratio",
                    "plain_rows_per_s",
                    "morec_rows_per_s",
                    "coordinator_wait_fraction",
                    "actor_calls_per_step",
                )
            },
            indent=1,
        )
    )
    return result


if __name__ == "__main__":
    main()
