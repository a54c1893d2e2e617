"""The group-partitioned copy of the train rows: ``by_group/<column>/g=<gid>/part-*.parquet``.

For each group column, the train rows whose column equals g, with all their columns, in the
order of ``schema.layout_hash(train row index, seed)``: a uniformly random order within the
group that is fixed by the seed and that any process can recompute.

How the rows are cut into files is fixed by the data alone, never by the engine: group g's
hash space is split into ``m_g = ceil(n_g / TARGET_PART_ROWS)`` equal ranges of the top 47
hash bits, range j becomes part j (rows sorted by hash; a range larger than PART_ROWS is
split further). So the same train rows give the same bytes whichever engine runs:

- ``local``: one process, the train split in memory (small data: tests, ML-1M);
- ``ray``: Ray Data. The train row groups are read by tasks that add the row index and the
  hash, ``Dataset.sort`` with the range boundaries above does the range partitioning (a
  distributed sort, memory bounded by one range per task), and each sorted range is written
  by the task that holds it.

Storage: one copy of the train rows per group column (3x the train split for ML-1M's three
columns). A cross-partition by the product of the groupings would store one copy, but its
cell count (10 x 10 x 10 for ML-1M, far more for real catalogues) leaves most cells tiny or
empty and makes each (objective, group) stream a union of many cells; one copy per grouping
keeps every stream one sequential file list.
"""

from __future__ import annotations

import contextlib
import math
import os
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
KEY = "__key"
# Rows the local engine holds in memory at most; above this, `auto` uses Ray Data.
LOCAL_MAX_ROWS = 1_000_000


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


def range_boundaries(m_per_group: list[int]) -> list[int]:
    """Sort keys at which each (g, j) range starts, all but the first (for Dataset.sort)."""
    starts = []
    for gid, m in enumerate(m_per_group, start=1):
        for j in range(m):
            starts.append((gid << HASH_BITS) + -(-(j << HASH_BITS) // m))  # ceil(j * 2**47 / m)
    return starts[1:]


def with_order_columns(table: pa.Table, first_row: int, seed: int) -> pa.Table:
    rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    return table.append_column(ROW, pa.array(rows)).append_column(HASH, pa.array(schema.layout_hash(rows, seed)))


def write_range(table: pa.Table, out_root: str, column: str, gid: int, j: int) -> list[dict[str, Any]]:
    """Writes one (group, range) of rows, sorted by hash, as one or more files named so that
    their name order is the stream order. Returns [{"gid", "j", "sub", "tmp", "rows"}]."""
    if table.num_rows == 0:
        return []
    hashes = table[HASH].to_numpy()
    if np.any(hashes[1:] < hashes[:-1]):  # Ray's sort orders by the 47-bit key; ties are rare
        table = table.sort_by([(HASH, "ascending")])
    data = table.drop_columns([c for c in (ROW, HASH, KEY) if c in table.schema.names])
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


def _write_column_ray(
    part_paths: list[Path], offsets: list[tuple[int, int, int]], out_root: Path, column: str, m: list[int], seed: int
) -> list[dict[str, Any]]:
    import ray.data

    items = [{"path": str(part_paths[f]), "row_group": rg, "first_row": first} for f, rg, first in offsets]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        read_row_groups_with_index,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"seed": seed, "column": column, "m": m},
    )
    ds = ds.sort(KEY, boundaries=range_boundaries(m)) if sum(m) > 1 else ds
    written = ds.map_batches(
        _write_block,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"out_root": str(out_root), "column": column, "m": m},
    )
    return written.take_all()


def read_row_groups_with_index(items: pa.Table, seed: int, column: str, m: list[int]) -> pa.Table:
    """Ray task: reads the listed train row groups, adds row index, hash and sort key."""
    tables = []
    for path, rg, first in zip(
        items["path"].to_pylist(), items["row_group"].to_pylist(), items["first_row"].to_pylist(), strict=True
    ):
        table = with_order_columns(pq.ParquetFile(path).read_row_group(rg), first, seed)
        tables.append(table.append_column(KEY, order_key(table, column)))
    return pa.concat_tables(tables)


def _write_block(block: pa.Table, out_root: str, column: str, m: list[int]) -> pa.Table:
    """A sorted block (one (g, j) range, or several when the sort is skipped) -> files."""
    pieces = []
    if block.num_rows:
        gid = block[column].to_numpy().astype(np.int64)
        j = range_index(block[HASH].to_numpy(), np.asarray([0] + m, dtype=np.int64)[gid])
        if gid.min() == gid.max() and j.min() == j.max():  # the usual case: one range per block
            pieces += write_range(block, out_root, column, int(gid[0]), int(j[0]))
        else:
            for g, jj in sorted(set(zip(gid.tolist(), j.tolist(), strict=True))):
                mask = pa.array((gid == g) & (j == jj))
                pieces += write_range(block.filter(mask), out_root, column, g, jj)
    return pa.table({k: [p[k] for p in pieces] for k in ("gid", "j", "sub", "tmp", "rows")}, schema=_PIECES)


_PIECES = pa.schema(
    [("gid", pa.int64()), ("j", pa.int64()), ("sub", pa.int64()), ("tmp", pa.string()), ("rows", pa.int64())]
)


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
    with runtime:
        for column, num_groups in job.group_columns.items():
            m = ranges_per_group(counts[column])
            if total == 0:
                pieces = []
            elif engine == "local":
                pieces = _write_column_local(train, job.root, column, m)
            else:
                pieces = _write_column_ray(paths, offsets, job.root, column, m, job.seed)
            columns[column] = _finalise(job.root, column, num_groups, pieces)
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


def order_key(table: pa.Table, column: str) -> pa.Array:
    """The int64 sort key (gid << 47) | top47(hash) of each row."""
    gid = table[column].to_numpy().astype(np.int64)
    top = (table[HASH].to_numpy() >> np.uint64(64 - HASH_BITS)).astype(np.int64)
    return pa.array((gid << HASH_BITS) | top)


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
