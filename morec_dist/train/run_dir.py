"""A job's run directory: its config, its provenance, its results, its checkpoints.

Every output records the config, the seed and the versions of the stack, so any number can
be traced to what produced it. Only rank 0 writes; JSON files are written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

from morec_dist import __version__
from morec_dist.config import Config


def versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import ray
    import torch
    import torchrec

    return {
        "morec_dist": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "unknown"),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
    }


def provenance(config: Config, world_size: int) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "seed": config.run.seed,
        "world_size": world_size,
        "versions": versions(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "hostname": socket.gethostname()},
    }


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
