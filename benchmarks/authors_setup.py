"""The authors' setup (configs/ml1m_unirec.toml): pretrained MF and MoRec after 30 epochs.

    python -m benchmarks.authors_setup --run-dir runs/ml1m_unirec         # run (resumes), then summarise
    python -m benchmarks.authors_setup --run-dir DIR --summarise-only     # a finished `morec run` directory
    python -m benchmarks.authors_setup --run-dir DIR --out FILE 'data.negatives_history_splits=["train"]'

Runs ``morec run --config configs/ml1m_unirec.toml 'run.methods=["morec"]'`` through the CLI
(which resumes from its checkpoints) unless ``--summarise-only``, then writes
``results/ml1m_unirec.json``: the 7 test metrics of the pretrained model and of MoRec with their
relative change, each stage's run time, the per-epoch validation metrics, the sampler's final p
and the PID's final beta, and the run's config, versions and seed. About 45 minutes on 2 cores
(about 30 pretraining epochs of 26 s, 30 fine-tuning epochs of about 54 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, Recorder, note
from benchmarks.quality import METRICS

CONFIG = REPO / "configs" / "ml1m_unirec.toml"


def run_job(run_dir: Path, data: Path, overrides: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "morec_dist.cli",
        "run",
        "--config",
        str(CONFIG),
        'run.methods=["morec"]',
        f"data.path={json.dumps(str(data))}",
        f"run.out_dir={json.dumps(str(run_dir))}",
        *overrides,
    ]
    subprocess.run(command, cwd=REPO, check=True)


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(record[k]) for k in METRICS}


def summarise(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished run directory (``pretrain/`` and ``morec/`` metrics.json)."""
    try:
        pre = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
        ft = json.loads((run_dir / "morec" / "metrics.json").read_text())
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc.filename}: missing; run without --summarise-only first") from None
    pretrained, morec = _metrics(pre), _metrics(ft)
    state = ft["coordinator"]["state"]
    return {
        "run_dir": str(run_dir),
        "pretrained": pretrained,
        "morec": morec,
        "relative": {k: morec[k] / pretrained[k] - 1.0 for k in METRICS if pretrained[k]},
        "pretrain": {
            "epochs": len(pre["history"]),
            "best_epoch": pre["best_epoch"],
            "epoch_seconds_sum": sum(h["seconds"] for h in pre["history"]),
            "l_hat": pre["train_loss"],
            "valid_at_best": pre["history"][pre["best_epoch"]]["valid"],
        },
        "finetune": {
            "epochs": ft["config"]["morec"]["epochs"],
            "wall_s": ft["wall_s"],
            "target_loss": ft["target_loss"],
            "final_beta": state["pid"]["beta"],
            "final_probabilities": state["sampler"]["probabilities"],
            "sampler_updates": state["sampler"]["version"],
        },
        "config": ft["config"],  # the run's whole config (the recorder's is only the file)
        "config_file": str(CONFIG.relative_to(REPO)),
        "run_versions": ft["versions"],
        "run_seed": ft["seed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "ml1m_unirec")
    parser.add_argument("--data", type=Path, default=REPO / ".data" / "movielens-1m")
    parser.add_argument("--summarise-only", action="store_true", help="only read a finished run directory")
    parser.add_argument("--out", type=Path, default=RESULTS / "ml1m_unirec.json")
    parser.add_argument("--note", default=None)
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides of the run")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    recorder = Recorder(
        "ml1m_unirec", mode="full", seed=0, config={"config": str(CONFIG.relative_to(REPO))}, note_text=note(args.note)
    )
    if not args.summarise_only:
        run_job(run_dir, args.data.resolve(), args.overrides)
    recorder.update({**summarise(run_dir), "overrides": args.overrides})
    recorder.write(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
