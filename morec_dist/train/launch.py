"""Starting ranks: run a CLI job under torchrun when it was started as a plain process.

``morec train`` / ``finetune`` / ``evaluate`` are rank programs. Started by hand they re-run
themselves under ``torch.distributed.run --standalone`` with ``run.nproc`` local ranks;
started by torchrun (``launch/train.sh``, ``launch/multinode.sh``, a Kubernetes Job) they
just run. The same code path serves one machine and many.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "morec_dist.cli",
        *argv,
    ]


def without_launcher_flags(argv: list[str]) -> list[str]:
    """Drop ``--nproc N`` (the parent's business; torchrun would take it for its own flag)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``morec <argv>`` as ``nproc`` local ranks and return torchrun's exit code."""
    argv = without_launcher_flags(argv)
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return subprocess.run(torchrun_command(nproc, argv), env=env).returncode
