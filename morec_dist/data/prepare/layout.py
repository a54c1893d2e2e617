"""The group-partitioned copy of the train rows: ``by_group/<column>/g=<gid>/part-*.parquet``.

For each group column, the train rows whose column equals g, with all their columns, in the
order of ``schema.layout_hash(train row index, seed)``: a uniformly random order within the
group that is fixed by the seed and that any process can recompute.

How the rows are cut into files is fixed by the data alone, never by the engine: group g's
hash space is split into ``m_g = ceil(n_g / TARGET_PART_ROWS)`` equal ranges of the top 47
hash bits, range j becomes part j (rows sorted by hash; a range larger than PART_ROWS is
split further). So the same train rows give the same bytes whichever engine runs:

- ``local``: one process, the train split in memory (small data: tests, ML-1M);
- ``ray``: Ray Data, two map-only jobs for all group columns at once (no shuffle through
  the object store): tasks read runs of train row groups once and write each (column,
  group, range)'s rows to a spill file; then one task per range sorts its spill files by
  hash and writes the range (``_write_layout_ray``). Memory: one run of row groups, or
  one range, per task. The workers write under the output directory, so on a cluster it
  must be storage every node sees (as the prepared dataset's must be anyway).

Storage: one copy of the train rows per group column (3x the train split for ML-1M's three
columns). A cross-partition by the product of the groupings would store one copy, but its
cell count (10 x 10 x 10 for ML-1M, far more for real catalogues) leaves most cells tiny or
empty and makes each (objective, group) stream a union of many cells; one copy per grouping
keeps every stream one sequential file list.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morec_dist.data import schema
from morec_dist.data.schema import sha256_file

HASH_BITS = 47  # the key is (gid << 47) | (hash >> 17): an int64 for gid < 2**15
ROW = "__row"
HASH = "__hash"
# Rows the local engine holds in memory at most; above this, `auto` uses Ray Data.
LOCAL_MAX_ROWS = 1_000_000
SPILL_ROOT = "_layout_spill"  # the Ray engine's phase-1 files, under the dataset being written
SPILL_TASK_ROWS = 16 * schema.ROW_GROUP_ROWS  # train rows one phase-1 task reads (~2M)


def target_part_rows() -> int:
    # Half a part: a range's size varies with the hash, so a part of PART_ROWS rows is rare.
    return max(1, schema.PART_ROWS // 2)


def ranges_per_group(train_counts: list[int]) -> list[int]:
    """m_g for g = 1..G: how many hash ranges (parts) group g is cut into (0 when empty)."""
    target = target_part_rows()
    return [math.ceil(n / target) for n in train_counts]


def range_index(hash_values: np.ndarray, m: np.ndarray) -> np.ndarray:
    """j = floor(top47(hash) * m / 2**47), per row, for that row's group's m."""
    top = (hash_values >> np.uint64(64 - HASH_BITS)).astype(np.uint64)
    return ((top * m.astype(np.uint64)) >> np.uint64(HASH_BITS)).astype(np.int64)


def with_order_columns(table: pa.Table, first_row: int, seed: int) -> pa.Table:
    rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    return table.append_column(ROW, pa.array(rows)).append_column(HASH, pa.array(schema.layout_hash(rows, seed)))


def write_range(table: pa.Table, out_root: str, column: str, gid: int, j: int) -> list[dict[str, Any]]:
    """Writes one (group, range) of rows in hash order, as one or more files named so that
    their name order is the stream order. Rows not yet in hash order are sorted here, stably,
    so ties keep the order they came in (row order from either engine). Returns
    [{"gid", "j", "sub", "tmp", "rows"}]."""
    if table.num_rows == 0:
        return []
    hashes = table[HASH].to_numpy()
    if np.any(hashes[1:] < hashes[:-1]):  # the local engine's ranges come sorted; the Ray engine's in row order
        table = table.take(pa.array(np.argsort(hashes, kind="stable")))
    data = table.drop_columns([c for c in (ROW, HASH) if c in table.schema.names])
    folder = Path(out_root) / schema.group_dir(column, gid)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for sub, start in enumerate(range(0, data.num_rows, schema.PART_ROWS)):
        piece = data.slice(start, schema.PART_ROWS)
        name = f"range-{j:05d}-{sub:03d}.parquet"
        pq.write_table(piece, folder / name, row_group_size=schema.ROW_GROUP_ROWS, compression="zstd")
        out.append(
            {"gid": gid, "j": j, "sub": sub, "tmp": f"{schema.group_dir(column, gid)}/{name}", "rows": piece.num_rows}
        )
    return out


def _write_column_local(train: pa.Table, out_root: Path, column: str, m: list[int]) -> list[dict[str, Any]]:
    gid = train[column].to_numpy().astype(np.int64)
    m_of_row = np.asarray([0] + m, dtype=np.int64)[gid]
    j = range_index(train[HASH].to_numpy(), m_of_row)
    order = np.lexsort((train[HASH].to_numpy(), j, gid))
    gid_sorted, j_sorted = gid[order], j[order]
    cut = np.flatnonzero((np.diff(gid_sorted) != 0) | (np.diff(j_sorted) != 0)) + 1
    pieces = []
    for start, stop in zip(np.r_[0, cut], np.r_[cut, len(order)], strict=True):
        if stop > start:
            rows = train.take(pa.array(order[start:stop]))
            pieces += write_range(rows, str(out_root), column, int(gid_sorted[start]), int(j_sorted[start]))
    return pieces


def _spill_tasks(paths: list[Path], offsets: list[tuple[int, int, int]], total: int) -> list[dict[str, Any]]:
    """The phase-1 tasks: runs of consecutive train row groups of about SPILL_TASK_ROWS rows,
    each as [path, row group, first row index] triples (JSON: one Ray item per task)."""
    ends = [first for _, _, first in offsets[1:]] + [total]
    tasks: list[dict[str, Any]] = []
    run: list[list[Any]] = []
    rows = 0
    for (f, rg, first), end in zip(offsets, ends, strict=True):
        run.append([str(paths[f]), rg, first])
        rows += end - first
        if rows >= SPILL_TASK_ROWS or end == total:
            tasks.append({"task": len(tasks), "row_groups": json.dumps(run)})
            run, rows = [], 0
    return tasks


def _write_layout_ray(
    paths: list[Path], offsets: list[tuple[int, int, int]], total: int, root: Path, ms: dict[str, list[int]], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Every group column's by_group/ on Ray Data, in two map-only jobs (no shuffle).

    1. Each task reads a run of train row groups once, adds the row index and hash, and
       appends, for every group column, each (group, range)'s rows to its own spill file
       (Arrow IPC, zstd) under ``_layout_spill/``: a partitioned write, memory one run.
    2. Each task takes one (column, group, range): its spill files in row order, which
       ``write_range`` sorts by hash (stable, so ties keep row order as the local engine's
       lexsort does) and writes; the spill files are removed as they are consumed.

    Ray's distributed sort did the same range partitioning through the object store, one
    sort per column; at 50M rows it spent ~17 min of 2 cores in its shuffle, where this
    reads the train split once and moves each row through the filesystem twice.
    """
    import ray.data

    spill = root / SPILL_ROOT
    try:
        tasks = _spill_tasks(paths, offsets, total)
        spilled = (
            ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
            .map_batches(
                spill_row_groups,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"spill_root": str(spill), "ms": ms, "seed": seed},
            )
            .take_all()
        )
        ranges: dict[tuple[str, int, int], list[tuple[int, str]]] = {}
        for s in spilled:
            ranges.setdefault((s["column"], s["gid"], s["j"]), []).append((s["task"], s["path"]))
        items = [
            {"column": c, "gid": g, "j": j, "paths": json.dumps([p for _, p in sorted(files)])}
            for (c, g, j), files in sorted(ranges.items())
        ]
        written = (
            ray.data.from_items(items, override_num_blocks=max(1, len(items)))
            .map_batches(write_spilled_range, batch_size=1, batch_format="pyarrow", fn_kwargs={"out_root": str(root)})
            .take_all()
            if items
            else []
        )
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    pieces: dict[str, list[dict[str, Any]]] = {c: [] for c in ms}
    for w in written:
        pieces[w["column"]].append({k: w[k] for k in ("gid", "j", "sub", "tmp", "rows")})
    return pieces


def spill_row_groups(task: pa.Table, spill_root: str, ms: dict[str, list[int]], seed: int) -> pa.Table:
    """Ray task (phase 1): one run of train row groups -> a spill file per (column, group, range)."""
    (t,) = task["task"].to_pylist()
    (spec,) = task["row_groups"].to_pylist()
    runs = json.loads(spec)
    table = pa.concat_tables(
        [with_order_columns(pq.ParquetFile(path).read_row_group(rg), first, seed) for path, rg, first in runs]
    )
    hashes = table[HASH].to_numpy()
    out: list[dict[str, Any]] = []
    for column, m in ms.items():
        gid = table[column].to_numpy().astype(np.int64)
        j = range_index(hashes, np.asarray([0] + m, dtype=np.int64)[gid])
        key = gid * (max(m) + 1) + j
        order = np.argsort(key, kind="stable")  # stable: each spill file stays in row order
        ordered = table.take(pa.array(order))
        sorted_key = key[order]
        cuts = np.flatnonzero(np.diff(sorted_key)) + 1
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(order)].tolist(), strict=True):
            if hi <= lo:
                continue
            g, jj = int(gid[order[lo]]), int(j[order[lo]])
            folder = Path(spill_root) / column / f"g={g:05d}" / f"j={jj:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"task-{t:07d}.arrow"
            piece = ordered.slice(lo, hi - lo)
            with pa.ipc.new_file(path, piece.schema, options=_SPILL_IPC) as writer:
                writer.write_table(piece)
            out.append({"column": column, "gid": g, "j": jj, "task": t, "path": str(path)})
    return pa.table({k: [o[k] for o in out] for k in _SPILLED.names}, schema=_SPILLED)


def write_spilled_range(item: pa.Table, out_root: str) -> pa.Table:
    """Ray task (phase 2): one (column, group, range)'s spill files -> its by_group files."""
    (column,), (gid,), (j,) = item["column"].to_pylist(), item["gid"].to_pylist(), item["j"].to_pylist()
    spill_paths = json.loads(item["paths"].to_pylist()[0])
    tables = []
    for path in spill_paths:
        with pa.memory_map(path) as source:
            tables.append(pa.ipc.open_file(source).read_all())
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]  # row order: write_range sorts
    pieces = write_range(table, out_root, column, gid, j)
    for path in spill_paths:
        os.remove(path)
    return pa.table(
        {"column": [column] * len(pieces), **{k: [p[k] for p in pieces] for k in _PIECES.names}},
        schema=_WRITTEN,
    )


# zstd, not lz4: 40% less scratch disk (180 against 303 MB for 2M train rows x 3 columns),
# the same write time, +0.2 s a column to read back
_SPILL_IPC = pa.ipc.IpcWriteOptions(compression="zstd")
_SPILLED = pa.schema(
    [("column", pa.string()), ("gid", pa.int64()), ("j", pa.int64()), ("task", pa.int64()), ("path", pa.string())]
)
_PIECES = pa.schema(
    [("gid", pa.int64()), ("j", pa.int64()), ("sub", pa.int64()), ("tmp", pa.string()), ("rows", pa.int64())]
)
_WRITTEN = pa.schema([("column", pa.string()), *_PIECES])


def _finalise(out_root: Path, column: str, num_groups: int, pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """Renames the pieces of each group to part-00000... in (j, sub) order; the manifest entry."""
    groups: dict[str, Any] = {}
    for gid in range(1, num_groups + 1):
        mine = sorted((p for p in pieces if p["gid"] == gid), key=lambda p: (p["j"], p["sub"]))
        files = []
        for index, piece in enumerate(mine):
            rel = schema.group_part_path(column, gid, index)
            os.rename(out_root / piece["tmp"], out_root / rel)
            files.append({"path": rel, "rows": int(piece["rows"])})
        groups[str(gid)] = {"rows": sum(f["rows"] for f in files), "files": files}
    unknown = {p["gid"] for p in pieces} - set(range(1, num_groups + 1))
    if unknown:
        raise ValueError(f"{column}: train rows with group ids {sorted(unknown)} outside 1..{num_groups}")
    return {"num_groups": num_groups, "groups": groups}


@dataclass
class LayoutJob:
    root: Path  # the dataset directory being written
    train_parts: list[str]  # relative paths, in manifest order
    group_columns: dict[str, int]  # column -> G
    seed: int
    engine: str = "auto"  # auto | local | ray
    progress: bool = False
    ray_address: str | None = None  # None: a local Ray (capped), when the ray engine runs


def write_group_layout(job: LayoutJob) -> dict[str, Any]:
    """Writes by_group/ under ``job.root`` and returns the manifest's ``group_layout``."""
    started = time.monotonic()
    paths = [job.root / rel for rel in job.train_parts]
    offsets, total = [], 0
    for f, path in enumerate(paths):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            offsets.append((f, rg, total))
            total += meta.row_group(rg).num_rows
    engine = job.engine if job.engine != "auto" else ("local" if total <= LOCAL_MAX_ROWS else "ray")
    counts = _train_counts(paths, job.group_columns)
    columns = {}
    train = None
    runtime: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if engine == "ray" and total:
        from morec_dist.data.prepare.ray_env import ray_runtime

        runtime = ray_runtime(job.ray_address, progress=job.progress)
    if engine == "local":
        train = pa.concat_tables([pq.read_table(p) for p in paths]) if paths else None
        train = with_order_columns(train, 0, job.seed) if train is not None else None
    ms = {column: ranges_per_group(counts[column]) for column in job.group_columns}
    with runtime:
        if engine == "ray" and total:
            pieces = _write_layout_ray(paths, offsets, total, job.root, ms, job.seed)
        for column, num_groups in job.group_columns.items():
            if total == 0:
                mine = []
            elif engine == "local":
                mine = _write_column_local(train, job.root, column, ms[column])
            else:
                mine = pieces[column]
            columns[column] = _finalise(job.root, column, num_groups, mine)
            if job.progress:
                print(
                    f"[layout {time.monotonic() - started:6.1f}s] by_group/{column}: {num_groups} groups, {total:,} "
                    f"rows ({engine})",
                    file=sys.stderr,
                    flush=True,
                )
    return {"seed": int(job.seed), "root": schema.GROUP_LAYOUT_ROOT, "columns": columns}


def _train_counts(paths: list[Path], group_columns: dict[str, int]) -> dict[str, list[int]]:
    """Train rows per group, streaming the group columns only (O(G) memory)."""
    counts = {c: np.zeros(g + 1, dtype=np.int64) for c, g in group_columns.items()}
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=list(group_columns), batch_size=1 << 20):
            for column, num_groups in group_columns.items():
                values = batch[column].to_numpy().astype(np.int64)
                if len(values) and (values.min() < 1 or values.max() > num_groups):
                    raise ValueError(f"{path}: column {column!r} has group ids outside 1..{num_groups}")
                counts[column] += np.bincount(values, minlength=num_groups + 1)
    return {c: [int(x) for x in v[1:]] for c, v in counts.items()}


def layout_files(layout: dict[str, Any]) -> list[str]:
    return [f["path"] for col in layout["columns"].values() for g in col["groups"].values() for f in g["files"]]


def rebuild_group_layout(root: Path, manifest: dict[str, Any], engine: str = "auto") -> dict[str, Any]:
    """Rewrites by_group/ of a prepared directory from its (edited) train parts and updates
    ``manifest``'s group_layout and file entries in place (for tools and tests that edit a
    dataset's train split; the manifest is not written here)."""
    import shutil

    root = Path(root)
    shutil.rmtree(root / schema.GROUP_LAYOUT_ROOT, ignore_errors=True)
    for rel in [r for r in manifest["files"] if r.startswith(schema.GROUP_LAYOUT_ROOT + "/")]:
        del manifest["files"][rel]
    columns = {c: int(g["num_groups"]) for c, g in manifest["groups"].items()}
    layout = write_group_layout(
        LayoutJob(root, manifest["splits"]["train"]["files"], columns, int(manifest["group_layout"]["seed"]), engine)
    )
    manifest["group_layout"] = layout
    for rel in layout_files(layout):
        path = root / rel
        manifest["files"][rel] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "rows": pq.ParquetFile(path).metadata.num_rows,
        }
    return manifest
