"""Starting ranks: run a CLI job under torchrun when it was started as a plain process.

``morec train`` / ``finetune`` / ``evaluate`` are rank programs. Started by hand they re-run
themselves under ``torch.distributed.run --standalone`` with ``run.nproc`` local ranks;
started by torchrun (``launch/train.sh``, ``launch/multinode.sh``, a Kubernetes Job) they
just run. The same code path serves one machine and many.

The parent passes ``run.max_restarts`` / ``--max-restarts`` to torchrun (a failed rank
restarts the whole group, which resumes from the last checkpoint), forwards a SIGTERM it
receives to torchrun (the ranks checkpoint and exit 143) instead of dying first, and
gives every rank a file to describe a user error in (``USER_ERROR_ENV``): when the ranks
fail on bad input, the parent prints that one line and exits 2 like any input error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

USER_ERROR_ENV = "MOREC_USER_ERROR_FILE"
EXIT_USER_ERROR = 2


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def torchrun_command(nproc: int, argv: list[str], max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "morec_dist.cli",
        *argv,
    ]


def without_launcher_flags(argv: list[str]) -> list[str]:
    """Drop ``--nproc N`` / ``--max-restarts N`` (the parent's business; torchrun would
    take them for its own flags)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            out.append(arg)
    return out


def report_user_error(message: str) -> None:
    """A rank's one-line description of bad input, for the parent (first writer wins)."""
    path = os.environ.get(USER_ERROR_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(message.strip().splitlines()[0] if message.strip() else message)


def relaunch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``morec <argv>`` as ``nproc`` local ranks; torchrun's exit code, or 2 (with the
    ranks' one-line message on stderr) when they stopped on a user error."""
    argv = without_launcher_flags(argv)
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="morec-launch-") as tmp:
        error_file = Path(tmp) / "user-error"
        env[USER_ERROR_ENV] = str(error_file)
        child = subprocess.Popen(torchrun_command(nproc, argv, max_restarts), env=env)

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if code != 0 and error_file.exists():
            print(f"morec: error: {error_file.read_text().strip()}", file=sys.stderr)
            return EXIT_USER_ERROR
        return code
