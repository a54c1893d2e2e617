"""The user side of an export, one function per model kind, and reading it back.

- ``mf``: user vectors to Parquet (``users/``), streamed like the items (``vectors.py``);
- ``two_tower``: the user tower (its embedding tables, sum-pooled like the model's, then its
  MLP) through ``torch.export`` as ``user_tower.pt2``, which loads with torch alone
  (``torch.export.load(f).module()(features)``), and ``user_tower.json``, the inputs it takes.

``USER_SIDE`` maps a model name to its exporter and its reader (the vectors of given users
from the export, for evaluation through the index); it is the one list of what export
supports, and moves into the model's spec when models declare their own export.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from morec_dist.data import schema
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.export.layout import TOWER_FILE, TOWER_SPEC, USERS_DIR, ExportError
from morec_dist.export.vectors import Entity, id_map_of, user_lookup, vector_dim, write_vectors
from morec_dist.model.mf import table_name


@dataclass
class UserSideJob:
    """What a user-side exporter gets: the sharded model and its unwrapped module (weights
    loaded, eval mode), the features, the dataset, this rank, the staging directory."""

    model: nn.Module
    module: Any  # the model kind's own module (its towers are attributes the type system cannot see)
    features: FeatureBuilder
    dataset: PreparedDataset
    ctx: DistContext
    staging: Path
    part_rows: int


# ----------------------------------------------------------------------- mf


def export_user_vectors(job: UserSideJob) -> dict[str, Any]:
    """Collective: every user's vector (``user_vectors``) to ``users/`` parts."""
    entity = Entity("user_id", job.dataset.num_users, id_map_of(job.dataset, schema.ID_MAP_USERS))
    lookup = user_lookup(job.module, job.features, job.ctx.device)
    names = write_vectors(entity, lookup, vector_dim(lookup), job.staging / USERS_DIR, job.ctx, job.part_rows)
    return {
        "kind": "vectors",
        "dir": USERS_DIR,
        "parts": names,
        "count": entity.count,
        "raw_ids": entity.id_map is not None,
    }


def read_user_vectors(
    root: Path, manifest: dict[str, Any], user_ids: np.ndarray, features: FeatureBuilder
) -> np.ndarray:
    """[len(user_ids), d] float32 from ``users/`` (dense ids)."""
    side = manifest["user_side"]
    table = pads.dataset([str(root / side["dir"] / n) for n in side["parts"]], format="parquet").to_table(
        columns=["user_id", "vector"], filter=pads.field("user_id").isin(user_ids.astype(np.int32))
    )
    order = np.argsort(table["user_id"].to_numpy())
    found = table["user_id"].to_numpy()[order]
    if found.size != user_ids.size or np.any(found != np.sort(user_ids)):
        raise ExportError(f"{root / side['dir']}: does not hold a vector for every evaluated user")
    vectors = table["vector"].combine_chunks().values.to_numpy().reshape(found.size, -1)[order]
    return vectors[np.searchsorted(found, user_ids)]


# ---------------------------------------------------------------- two-tower


class ExportedUserTower(nn.Module):
    """The two-tower user side as plain torch: per feature an ``embedding_bag`` (sum, like the
    model's pooled tables) over ``features[name]`` (ids) with ``features[name + "_offsets"]``
    (each user's first position), concatenated in the model's feature order, then the MLP."""

    def __init__(self, tables: Mapping[str, torch.Tensor], tower: nn.Module):
        super().__init__()
        self.names = list(tables)
        self.tables = nn.ParameterDict({n: nn.Parameter(t, requires_grad=False) for n, t in tables.items()})
        self.tower = tower

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [
            F.embedding_bag(features[n], self.tables[n], features[n + "_offsets"], mode="sum") for n in self.names
        ]
        return self.tower(torch.cat(pooled, dim=1))


def tower_inputs(kjt: Any) -> dict[str, torch.Tensor]:
    """A user KJT (``FeatureBuilder.user_kjt``) as the exported tower's inputs."""
    out = {}
    for name, jagged in kjt.to_dict().items():
        lengths = jagged.lengths().to(torch.int64)
        out[name] = jagged.values().to(torch.int64)
        out[name + "_offsets"] = torch.cumsum(lengths, 0) - lengths
    return out


def gather_table(value: Any, shape: list[int], ctx: DistContext) -> torch.Tensor | None:
    """Collective: a table (sharded or replicated) whole on rank 0; None elsewhere."""
    if isinstance(value, ShardedTensor):
        out = torch.empty(shape, dtype=value.dtype) if ctx.rank == 0 else None
        value.gather(dst=0, out=out)
        return out
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone() if ctx.rank == 0 else None
    raise ExportError(f"user table of type {type(value).__name__}: expected a ShardedTensor or a tensor")


def user_tables(job: UserSideJob) -> dict[str, torch.Tensor]:
    """Collective: the user side's tables, feature name -> whole table (on rank 0)."""
    with warnings.catch_warnings():  # torch deprecates ShardedTensor, TorchRec's type (nothing to act on here)
        warnings.filterwarnings("ignore", message=".*DTensor.*", category=FutureWarning)
        return gathered_user_tables(job)


def gathered_user_tables(job: UserSideJob) -> dict[str, torch.Tensor]:
    state = job.model.state_dict()
    tables = {}
    for feature in job.module.user_features:
        suffix = f"user_ebc.embedding_bags.{table_name(feature.name)}.weight"
        keys = [k for k in state if k.endswith(suffix)]
        if len(keys) != 1:
            raise ExportError(f"model state: expected one entry ending in {suffix!r}, found {keys}")
        value = state[keys[0]]
        table = gather_table(value, [feature.num_embeddings, int(value.size(1))], job.ctx)
        if table is not None:
            tables[feature.name] = table
    return tables


def tower_spec(job: UserSideJob, dim: int) -> dict[str, Any]:
    declared = job.dataset.features
    inputs: list[dict[str, Any]] = []
    for feature in job.module.user_features:
        kind = declared[feature.name].kind if feature.name in declared else "single"
        source = (
            "the dataset's dense user_id (id_map/users.parquet maps raw ids)"
            if feature.name == "user_id"
            else (f"users.parquet column {feature.name!r} ({kind}-hot, 0 = missing)")
        )
        inputs.append(
            {"name": feature.name, "dtype": "int64", "shape": ["values"], "kind": kind,
             "vocab_size": feature.num_embeddings, "source": source}
        )  # fmt: skip
        inputs.append({"name": feature.name + "_offsets", "dtype": "int64", "shape": ["batch"],
                       "meaning": f"each user's first position in {feature.name!r}"})  # fmt: skip
    return {
        "format": "torch.export",
        "file": TOWER_FILE,
        "call": "torch.export.load(file).module()(features)  # features: dict of the inputs below",
        "inputs": inputs,
        "output": {
            "dtype": "float32",
            "shape": ["batch", dim],
            "meaning": "user vectors; score = vector . item vector",
        },
    }


def export_user_tower(job: UserSideJob) -> dict[str, Any]:
    """Collective (the table gather); rank 0 traces and writes the tower and its spec."""
    tables = user_tables(job)
    if job.ctx.rank != 0:
        return {"kind": "torch_export", "file": TOWER_FILE, "spec": TOWER_SPEC}
    tower = ExportedUserTower(tables, copy.deepcopy(job.module.user_tower).cpu().eval()).eval()
    example = tower_inputs(job.features.user_kjt(np.arange(1, min(4, job.dataset.num_users) + 1)))
    dynamic = {k: {0: torch.export.Dim.DYNAMIC} for k in example}
    with torch.no_grad():
        program = torch.export.export(tower, (example,), dynamic_shapes=({**dynamic},))
    torch.export.save(program, job.staging / TOWER_FILE)
    dim = int(program.module()(example).shape[1])
    (job.staging / TOWER_SPEC).write_text(json.dumps(tower_spec(job, dim), indent=1, sort_keys=True))
    return {"kind": "torch_export", "file": TOWER_FILE, "spec": TOWER_SPEC}


def read_tower_vectors(
    root: Path, manifest: dict[str, Any], user_ids: np.ndarray, features: FeatureBuilder
) -> np.ndarray:
    """User vectors from the exported tower, its inputs built from the dataset's features."""
    program = torch.export.load(root / manifest["user_side"]["file"]).module()
    out = []
    with torch.no_grad():
        for s in range(0, user_ids.size, 4096):
            out.append(program(tower_inputs(features.user_kjt(user_ids[s : s + 4096]))).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, manifest["dims"]["output"]), np.float32)


@dataclass(frozen=True)
class UserSide:
    export: Callable[[UserSideJob], dict[str, Any]]
    # (export dir, manifest, dense user ids, features) -> [n, d] float32 user vectors; None:
    # evaluation through the index cannot read this side back
    vectors: Callable[[Path, dict[str, Any], np.ndarray, FeatureBuilder], np.ndarray] | None
    files: Callable[[dict[str, Any]], list[str]]  # the files evaluation reads (checksummed)


USER_SIDE: dict[str, UserSide] = {
    "mf": UserSide(
        export_user_vectors, read_user_vectors, lambda m: [f"{USERS_DIR}/{n}" for n in m["user_side"]["parts"]]
    ),
    "two_tower": UserSide(export_user_tower, read_tower_vectors, lambda m: [TOWER_FILE]),
}


def user_side_of(model_name: str) -> UserSide:
    """The model's own export hook (``ModelSpec.export_user_side``, called with a
    ``UserSideJob``) if it declares one, else the exporter here for its kind."""
    from morec_dist.model.registry import MODELS

    hook = MODELS.get(model_name).export_user_side if model_name in MODELS else None
    if hook is not None:
        return UserSide(hook, None, lambda m: [])
    if model_name not in USER_SIDE:
        raise ExportError(
            f"model.name {model_name!r}: export has no user side for it (it exports {sorted(USER_SIDE)}; "
            "a model declares its own with ModelSpec.export_user_side)"
        )
    return USER_SIDE[model_name]
