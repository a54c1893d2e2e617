"""What every benchmark shares: machine and version records, JSON output, subprocess and
torchrun launching, Ray for the coordinator, peak memory, and matplotlib (Agg) plotting.

Every result file is one JSON object carrying ``machine`` (CPU, cores, memory, load
average at start and end, git commit), ``versions``, ``seed``, ``mode`` and ``note``:
numbers from a shared, noisy machine say so (``--note`` or ``MOREC_BENCH_NOTE``).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NOTE_ENV = "MOREC_BENCH_NOTE"

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure


# ------------------------------------------------------------------ provenance


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git_commit(),
    }


def versions() -> dict[str, str]:
    from morec_dist.train.run_dir import versions as package_versions

    out = package_versions()
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


def note(cli_note: str | None = None) -> str:
    return cli_note if cli_note is not None else os.environ.get(NOTE_ENV, "")


class Recorder:
    """Collects one benchmark's result: provenance at start, load average at the end."""

    def __init__(self, name: str, *, mode: str, seed: int, config: dict[str, Any], note_text: str = ""):
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {
            "benchmark": name,
            "mode": mode,
            "seed": seed,
            "config": config,
            "note": note_text,
            "machine": machine_info(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def update(self, values: dict[str, Any]) -> None:
        self.result.update(values)

    def write(self, out: Path) -> dict[str, Any]:
        self.result["versions"] = versions()
        self.result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        write_json(out, self.result)
        return self.result


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------ processes


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def torchrun(
    module: str,
    args: Sequence[str],
    *,
    nproc: int = 2,
    log: Path | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> float:
    """Run ``python -m module args`` as ``nproc`` local torchrun ranks; returns wall seconds.

    Raises with the tail of the log when the job fails."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]
    return run_logged(command, log=log, timeout_s=timeout_s, env=env)


def morec_cli(args: Sequence[str], *, log: Path | None = None, timeout_s: float | None = None) -> float:
    """Run ``morec <args>`` as a user would (it starts its own torchrun ranks)."""
    return run_logged([sys.executable, "-m", "morec_dist.cli", *args], log=log, timeout_s=timeout_s)


def run_logged(
    command: Sequence[str],
    *,
    log: Path | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> float:
    started = time.perf_counter()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log is not None else open(os.devnull, "w") as sink:
        proc = subprocess.run(
            list(command), cwd=REPO, env=env or bench_env(), stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s
        )
    if proc.returncode != 0:
        tail = ""
        if log is not None and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(command)}\n{tail}")
    return time.perf_counter() - started


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each phase has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    import numpy as np

    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


# ------------------------------------------------------------------ plotting


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def results_dir(quick: bool) -> Path:
    """Full runs write benchmarks/results/, quick runs benchmarks/results/quick/."""
    return RESULTS / "quick" if quick else RESULTS


def default_out(name: str, quick: bool) -> Path:
    return results_dir(quick) / f"{name}.json"


def bench_parser(doc: str) -> Any:
    """The options every benchmark takes: --quick, --out, --seed, --note."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes that finish in about a minute")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/<name>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="a note recorded with the results")
    return parser
