"""``morec export``: a checkpoint to serving artefacts, on as many ranks as trained it (any
number works: DCP reshards).

The parent checks what it can before any rank starts (``check_inputs``: the output directory,
the checkpoint against the dataset, the id map, that the model has a user side). Then every
rank rebuilds the sharded model from the checkpoint's config (the runner's ``setup_job``),
loads the checkpoint, writes its item parts and its share of the user side into one staging
directory, and drops the model; rank 0 builds the index (``--index``), writes
``manifest.json`` last and publishes the staging directory as ``--out``. ``--out`` is a local
directory (staged in ``<out>.tmp-XXXX`` and renamed) or a filesystem URI (staged in TMPDIR
and uploaded, the manifest last: export/store.py). A failure anywhere leaves no ``--out``
(no manifest at a URI): rank 0 removes the staging directory, and the parent removes it if
the ranks died (it named it, ``STAGING_ENV``), with what they uploaded.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Set
from pathlib import Path
from typing import Any

import torch.distributed as dist

from morec_dist.config import Config
from morec_dist.data import schema, storage
from morec_dist.data.dataset import VERIFIED_ENV, PreparedDataset
from morec_dist.data.storage import StoragePath
from morec_dist.distributed import DistContext
from morec_dist.export.index import IndexOptions, build_index
from morec_dist.export.layout import ITEMS_DIR, STAGING_ENV, ExportError, discard, write_manifest
from morec_dist.export.store import check_staged, new_staging, out_location, publish, refuse_existing
from morec_dist.export.user_side import UserSideJob, user_side_of
from morec_dist.export.vectors import Entity, id_map_of, item_lookup, vector_dim, write_vectors
from morec_dist.model.sharding import unwrap
from morec_dist.train.checkpoint import read_meta
from morec_dist.train.run_dir import provenance, versions
from morec_dist.train.runner import load_pretrained, setup_job


def check_inputs(config: Config, checkpoint: str | Path, out: str | Path) -> None:
    """What the parent can refuse before any rank starts (each a one-line ExportError or
    CheckpointError naming the input)."""
    refuse_existing(out_location(out))
    meta = read_meta(checkpoint)
    user_side_of(config.model.name)
    # the files' checksums, streamed, here once; the ranks then open it unverified (rank 0's
    # full check of a 10M-item catalogue held about 1 GB beside its shard). Its values were
    # verified when the model was trained on it.
    dataset = PreparedDataset.open(config.data.path, verify_checksums=True, verify_values=False)
    os.environ[VERIFIED_ENV] = dataset.uri
    tables = meta.get("model", {}).get("tables", {})
    for table, count in (("t_item_id", dataset.num_items), ("t_user_id", dataset.num_users)):
        rows = tables.get(table, [None])[0]
        if rows != count + 1:
            raise ExportError(
                f"--checkpoint {checkpoint}: its table {table} has {rows} rows, but data.path {dataset.path} "
                f"has {count} ids (+ padding): a checkpoint of another dataset"
            )
    id_map_of(dataset, schema.ID_MAP_ITEMS)
    id_map_of(dataset, schema.ID_MAP_USERS)


def export_config(checkpoint: str | Path, given: Config | None, explicit: Set[str] = frozenset()) -> Config:
    """The checkpoint's config (its model, its seed); a given config may replace data, eval
    and the run's other settings, never the model: the model keys it sets (``explicit``)
    must be the checkpoint's (``check_model``)."""
    from morec_dist.train.checkpoint_meta import checkpoint_config

    config = checkpoint_config(checkpoint, given)
    if given is not None:
        check_model(checkpoint, given, explicit)
        config.run.seed = int(read_meta(checkpoint)["config"]["run"]["seed"])  # the model's; seeds the index
    return config


def explicit_model_keys(config_file: str | None, overrides: list[str]) -> set[str]:
    """The ``model.*`` keys a config file's [model] table or the overrides set."""
    import tomllib

    keys = {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.startswith("model.") and "=" in o}
    if config_file:
        with open(config_file, "rb") as f:
            keys |= set(tomllib.load(f).get("model", {}))
    return keys


def check_model(checkpoint: str | Path, given: Config, explicit: Set[str]) -> None:
    """The model keys set beside the checkpoint agree with the model the checkpoint holds."""
    recorded = read_meta(checkpoint).get("config", {}).get("model", {})
    wanted = given.to_dict()["model"]
    differ = sorted(k for k in explicit if recorded.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"model.{k} = {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in differ)
        raise ExportError(f"--checkpoint {checkpoint}: a checkpoint of another model than the config's ({shown})")


def agreed_staging(out: StoragePath, ctx: DistContext) -> Path:
    """Collective: the one staging directory of this export (the parent's, or rank 0's new one)."""
    named = os.environ.get(STAGING_ENV)
    choice: list[Any] = [None]
    if ctx.rank == 0:
        if named:
            Path(named).mkdir(parents=True, exist_ok=False)
            choice[0] = named
        else:
            choice[0] = str(new_staging(out))
    if ctx.distributed:
        dist.broadcast_object_list(choice, src=0, group=ctx.pg)
    return Path(choice[0])


def write_artifacts(trainer: Any, dataset: PreparedDataset, staging: Path, part_rows: int) -> dict[str, Any]:
    """Collective: item parts and the user side; the manifest fields they make."""
    config, ctx, features = trainer.config, trainer.ctx, trainer.features
    module = unwrap(trainer.model)
    trainer.model.eval()
    items = Entity("item_id", dataset.num_items, id_map_of(dataset, schema.ID_MAP_ITEMS))
    lookup = item_lookup(module, features, ctx.device)
    dim = vector_dim(lookup)
    names = write_vectors(items, lookup, dim, staging / ITEMS_DIR, ctx, part_rows)
    side = user_side_of(config.model.name)
    user = side.export(UserSideJob(trainer.model, module, features, dataset, ctx, staging, part_rows))
    return {
        "items": {"dir": ITEMS_DIR, "parts": names, "count": items.count, "part_rows": part_rows,
                  "raw_ids": items.id_map is not None, "columns": ["item_id", "raw_id", "vector"]
                  if items.id_map is not None else ["item_id", "vector"]},
        "users": {"count": dataset.num_users},
        "user_side": user,
        "dims": {"embedding": config.model.embedding_dim, "output": dim},
    }  # fmt: skip


def staged_files(model_name: str, fields: dict[str, Any]) -> list[str]:
    """The files every rank wrote into the staging directory, by the manifest's fields."""
    items = [f"{ITEMS_DIR}/{n}" for n in fields["items"]["parts"]]
    return items + user_side_of(model_name).files({"user_side": fields["user_side"]})


def faiss_version() -> str:
    import faiss

    return str(faiss.__version__)


def run_export(
    config: Config, checkpoint: str | Path, out: str | Path, part_rows: int, index: IndexOptions | None
) -> dict[str, Any] | None:
    """This rank's part of the export; rank 0 returns the manifest."""
    target = out_location(out)
    ctx, dataset, trainer = setup_job(config)
    meta = load_pretrained(trainer, storage.location(checkpoint))
    refuse_existing(target)
    user_side_of(config.model.name)
    staging = agreed_staging(target, ctx)
    try:
        fields = write_artifacts(trainer, dataset, staging, part_rows)
        identity = trainer.model_identity()
        del trainer  # the index needs the memory the shards held
        gc.collect()
        if ctx.distributed:
            dist.barrier(group=ctx.pg)
        if ctx.rank != 0:
            return None
        manifest = {
            "model": {"name": config.model.name, **identity},
            **fields,
            "checkpoint": {"path": str(checkpoint), "step": meta.get("step"), "epoch": meta.get("epoch"),
                           "world_size": meta.get("world_size")},
            "dataset": {"path": storage.uri_of(dataset.path), "name": dataset.manifest.get("name"),
                        "num_users": dataset.num_users, "num_items": dataset.num_items,
                        "train_fingerprint": dataset.files_fingerprint("train")},
            "run_config": meta.get("config"),
            "export": {"world_size": ctx.world_size, "part_rows": part_rows},
            **provenance(config, ctx.world_size),
        }  # fmt: skip
        manifest["versions"] = {**versions(), "faiss": faiss_version()}
        manifest["index"] = build_index(staging, manifest, index, config.run.seed) if index is not None else None
        check_staged(staging, staged_files(config.model.name, fields))
        write_manifest(staging, manifest)
        publish(staging, target)
        print(f"exported {config.model.name} ({fields['items']['count']:,} items) to {target}", flush=True)
        return manifest
    except BaseException:
        if ctx.rank == 0:
            discard(staging)
        raise
