"""A job's run directory: its config, its provenance, its results, its checkpoints.

Every output records the config, the seed and the versions of the stack, so any number can
be traced to what produced it. Only rank 0 writes; JSON files are written atomically.

``run.out_dir`` is a local directory or a filesystem URI (``s3://bucket/runs/r1/pretrain?...``,
data/storage.py): ``run_path`` gives either. Locally a JSON file is written aside and
renamed; at a URI it is one upload, which an object store makes visible whole or not at all
(S3, GCS: an object appears when its upload completes), so a reader never sees half a
``metrics.json``. That is what lets a stage's ``metrics.json``, written last, be the marker
the next stage waits for (launch/wait_for.sh, docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from morec_dist import __version__
from morec_dist.config import Config
from morec_dist.data import storage
from morec_dist.data.storage import Location, StoragePath


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


def run_path(out_dir: str | Path | Location) -> StoragePath:
    """``run.out_dir`` (or a file's path) as given: a ``Path`` for a local one (not resolved,
    so messages keep the config's form), a ``Location`` for a URI (its query kept, so
    ``run_path(uri) / "metrics.json"`` reaches the same store)."""
    if isinstance(out_dir, Location) or storage.is_uri(str(out_dir)):
        return storage.location(out_dir)
    return Path(out_dir)


def write_json_atomic(
    path: str | Path | Location, payload: dict[str, Any], default: Callable[[Any], Any] = float
) -> StoragePath:
    """``payload`` as JSON at ``path``, whole or not at all; ``default`` converts what JSON
    cannot hold (numpy / torch scalars by default)."""
    where = run_path(path)
    if isinstance(where, Location):
        text = json.dumps(payload, indent=1, sort_keys=True, default=default)
        with where.fs.open_output_stream(where.path) as out:  # one upload: visible whole or not at all
            out.write(text.encode("utf-8"))
        return where
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, where)
    return where


def read_json(path: str | Path | Location) -> dict[str, Any]:
    return json.loads(storage.read_text(run_path(path)))
