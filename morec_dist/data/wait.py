"""Wait until files or objects exist: how the object-store pipeline's stages are chained.

Owns ``python -m morec_dist.data.wait [--timeout S] [--every S] TARGET...``, which
launch/wait_for.sh runs when a target is a filesystem URI (``s3://...``; local paths it checks
itself). The init containers of k8s/components/object-store wait here for the previous
stage's marker on the store (its ``metrics.json``, written last and by one upload:
train/run_dir.py), and launch/ray_head.sh ``--until`` for the pipeline's last output. A
target is there when it is a non-empty file (``test -s``), read through data/storage.py, so
the URI's options and the credentials (the environment, never the URI) are the trainers'.

The store's errors (unreachable, access denied, throttled) are printed once per distinct
message and retried: an init container that failed on a passing outage during hours of
pretraining would count against its Job's backoff, and a wrong credential shows in the
container's log. A target that can never be read (a URI carrying credentials, an unknown
scheme) exits 2 at once.

Exit status: 0 every target exists, 1 ``--timeout`` passed first, 2 bad usage or target,
143 on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import typing
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from morec_dist.data import storage

PROG = "launch/wait_for.sh"  # what users run; this module is its URI half


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{PROG}: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def shown(target: str) -> str:
    """A target for messages: a URI without its query and without a ``user:secret@`` (which
    storage refuses, and which must not reach a log either)."""
    if not storage.is_uri(target):
        return target
    parts = urllib.parse.urlsplit(target)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


def present(target: str) -> bool:
    """True when ``target`` is a non-empty file. Raises StorageError / ValueError for a
    target that can never be read, OSError for the store's (retryable) errors."""
    where = storage.location(target)
    if isinstance(where, Path):
        return where.is_file() and where.stat().st_size > 0
    info = where.fs.get_file_info(where.path)
    return bool(info.type == pafs.FileType.File and (info.size or 0) > 0)


def wait_for(targets: list[str], timeout: float = 0.0, every: float = 5.0) -> int:
    """Polls the targets in order until each exists; returns the exit status (module doc)."""
    start = time.monotonic()
    last_error: dict[str, str] = {}
    for target in targets:
        print(f"{PROG}: waiting for {shown(target)}", file=sys.stderr, flush=True)
        while True:
            try:
                if present(target):
                    break
            except (storage.StorageError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                print(f"{PROG}: {shown(target)}: {exc}", file=sys.stderr, flush=True)
                return 2
            except OSError as exc:  # the store's: printed when it changes, retried
                if last_error.get(target) != str(exc):
                    last_error[target] = str(exc)
                    print(f"{PROG}: {shown(target)}: {exc} (retrying)", file=sys.stderr, flush=True)
            if timeout > 0 and time.monotonic() - start >= timeout:
                print(f"{PROG}: {shown(target)} did not appear within {timeout:g} s", file=sys.stderr, flush=True)
                return 1
            time.sleep(every)
    print(f"{PROG}: found {' '.join(shown(t) for t in targets)}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="wait until every TARGET (a path or a filesystem URI) is a non-empty file")
    parser.add_argument("--timeout", type=_seconds, default=0.0, help="give up after this long, exit 1 (0: never)")
    parser.add_argument("--every", type=_seconds, default=5.0, help="seconds between looks (default 5)")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return wait_for(args.targets, args.timeout, args.every)


if __name__ == "__main__":
    sys.exit(main())
