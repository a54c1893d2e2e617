"""Starting ranks: run a CLI job under torchrun when it was started as a plain process.

``morec train`` / ``finetune`` / ``evaluate`` are rank programs. Started by hand they re-run
themselves under ``torch.distributed.run --standalone`` with ``run.nproc`` local ranks, every
socket of the job listening on loopback (``bind.py``);
started by torchrun (``launch/train.sh``, ``launch/multinode.sh``, a Kubernetes Job) they
just run. The same code path serves one machine and many.

The parent passes ``run.max_restarts`` / ``--max-restarts`` to torchrun (a failed rank
restarts the whole group, which resumes from the last checkpoint), forwards a SIGTERM it
receives to torchrun (the ranks checkpoint and exit 143) instead of dying first, and
gives every rank a file to describe a user error in (``USER_ERROR_ENV``): when the ranks
fail on bad input, the parent prints that one line and exits 2 like any input error; when
they stopped after a SIGTERM checkpoint (``PREEMPTED_ENV``), it exits 143 whatever code
torchrun chose.

Started under torchrun by ``launch/train.sh`` (the multi-node and Kubernetes path), there is
no ``morec`` parent: the script asks ``python -m morec_dist.train.launch settings -- <morec
args>`` for the torchrun settings the config holds (``run.max_restarts``, or the command's
``--max-restarts``), which also validates the config (exit 2, one line) before any rank
starts, and maps the ranks' exit files the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from morec_dist.train.bind import LOOPBACK, single_host_env

USER_ERROR_ENV = "MOREC_USER_ERROR_FILE"
PREEMPTED_ENV = "MOREC_PREEMPTED_FILE"
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # = train.resume.EXIT_PREEMPTED (128 + SIGTERM)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def torchrun_command(nproc: int, argv: list[str], max_restarts: int = 0) -> list[str]:
    # torchrun through train/bind.py: its stores listen on loopback, and the ranks dial
    # MASTER_ADDR = 127.0.0.1 (without --local-addr, the hostname, which may resolve elsewhere)
    return [
        sys.executable,
        "-m",
        "morec_dist.train.bind",
        "--bind",
        LOOPBACK,
        "--standalone",
        f"--local-addr={LOOPBACK}",
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


def report_preempted() -> None:
    """Mark that the ranks stopped after a SIGTERM checkpoint (torchrun reports a failed
    group with its own exit code; the launcher turns this mark into 143)."""
    path = os.environ.get(PREEMPTED_ENV)
    if path:
        try:
            Path(path).touch()
        except OSError:
            pass


# What every rank's environment holds unless the user set it: Ray's usage report off, and
# torchrun's own default thread count for several local ranks (set, it skips its banner).
RANK_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def rank_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``RANK_ENV_DEFAULTS`` where it does not set them."""
    return {**RANK_ENV_DEFAULTS, **env}


def relaunch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``morec <argv>`` as ``nproc`` local ranks; torchrun's exit code, or 2 (with the
    ranks' one-line message on stderr) when they stopped on a user error."""
    argv = without_launcher_flags(argv)
    env = rank_env(single_host_env(dict(os.environ)))  # gloo / NCCL sockets on loopback
    with tempfile.TemporaryDirectory(prefix="morec-launch-") as tmp:
        error_file = Path(tmp) / "user-error"
        env[USER_ERROR_ENV] = str(error_file)
        env[PREEMPTED_ENV] = str(Path(tmp) / "preempted")
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
        if code != 0 and Path(env[PREEMPTED_ENV]).exists():
            return EXIT_PREEMPTED
        return code


def torchrun_settings(argv: list[str]) -> dict[str, int]:
    """The torchrun settings of ``morec <argv>`` from its config: what launch/train.sh
    passes when it starts the ranks itself. Raises ConfigError on a bad config.

    Only ``--config``, ``--max-restarts`` and the ``SECTION.KEY=VALUE`` overrides matter
    here; the rest of the command line is the ranks' business (parsed there, not here, so
    this module does not import the CLI above it)."""
    import argparse

    from morec_dist.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="morec", add_help=False)
    parser.add_argument("command")
    parser.add_argument("--config", default=None)
    parser.add_argument("--max-restarts", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if not a.startswith("-") and "=" in a.split(".", 1)[-1] and "." in a.split("=", 1)[0]]
    config = load_config(known.config, overrides)
    if known.max_restarts is not None and known.max_restarts < 0:
        raise ConfigError(f"--max-restarts: expected >= 0, got {known.max_restarts}")
    return {"max_restarts": config.run.max_restarts if known.max_restarts is None else known.max_restarts}


def main(argv: list[str]) -> int:
    """``python -m morec_dist.train.launch settings -- <morec args>``: prints KEY=VALUE lines."""
    from morec_dist.config import ConfigError

    if len(argv) < 3 or argv[0] != "settings" or argv[1] != "--":
        print("usage: python -m morec_dist.train.launch settings -- <morec command> [args]", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        settings = torchrun_settings(argv[2:])
    except (ConfigError, OSError) as exc:
        print(f"morec {argv[2]}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for key, value in settings.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
