"""Writes a prepared dataset directory atomically, and the derived item groupings.

Both preparers (MovieLens-1M and synthetic) produce their tables and hand them to
``DatasetWriter``; it owns the part-file layout, the row-group size, the checksums and the
manifest, and it publishes the directory with a rename so that a crash never leaves a
half-written dataset where a valid one is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morec_dist import __version__
from morec_dist.data import schema


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def banded_groups(sort_keys: list[np.ndarray], num_items: int, num_bands: int) -> np.ndarray:
    """Cut items into ``num_bands`` near-equal bands by ``np.lexsort(sort_keys)`` order.

    Returns a 1-based band per item_id, indexed by item_id (index 0 unused).
    """
    order = np.lexsort(sort_keys)  # item positions 0..num_items-1 (item_id - 1)
    bands = np.zeros(num_items + 1, dtype=np.int16)
    for band, members in enumerate(np.array_split(order, num_bands), start=1):
        bands[members + 1] = band
    return bands


def popularity_bands(popularity: np.ndarray, num_bands: int = schema.NUM_BANDS) -> np.ndarray:
    """Band 1 = most popular; ties broken by ascending item_id. ``popularity`` is by item_id - 1."""
    item_ids = np.arange(1, len(popularity) + 1)
    return banded_groups([item_ids, -popularity.astype(np.int64)], len(popularity), num_bands)


def price_bands(price: np.ndarray, num_bands: int = schema.NUM_BANDS) -> np.ndarray:
    """Band 1 = most expensive; ties broken by ascending item_id. ``price`` is by item_id - 1."""
    item_ids = np.arange(1, len(price) + 1)
    return banded_groups([item_ids, -price], len(price), num_bands)


def category_groups(first_genre: np.ndarray, train_item_counts: np.ndarray, top: int = 9) -> tuple[np.ndarray, list[str]]:
    """Fairness groups: the ``top`` first-genres by train interactions get 1..top (ties by
    name), every other genre ``top + 1``. Inputs are by item_id - 1. Returns the group per
    item (by item_id - 1) and the genre name of each of the first ``top`` groups."""
    totals: dict[str, int] = {}
    for genre, count in zip(first_genre.tolist(), train_item_counts.tolist()):
        totals[genre] = totals.get(genre, 0) + int(count)
    ranked = sorted(totals, key=lambda g: (-totals[g], g))[:top]
    rank_of = {g: i + 1 for i, g in enumerate(ranked)}
    groups = np.array([rank_of.get(g, top + 1) for g in first_genre.tolist()], dtype=np.int16)
    return groups, ranked


def group_stats(groups_by_item: np.ndarray, train_item_counts: np.ndarray, num_groups: int) -> dict[str, Any]:
    """Item counts and train-interaction counts per 1-based group (arrays by item_id - 1)."""
    item_counts = np.bincount(groups_by_item, minlength=num_groups + 1)[1:]
    train_counts = np.bincount(groups_by_item, weights=train_item_counts, minlength=num_groups + 1)[1:]
    return {
        "num_groups": int(num_groups),
        "item_counts": [int(x) for x in item_counts],
        "train_counts": [int(x) for x in train_counts],
    }


class DatasetWriter:
    """Streams interaction tables into part files inside a temporary directory; ``commit``
    writes the manifest and renames the directory into place."""

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.out_dir = Path(out_dir).resolve()
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir}: already exists (pass --overwrite to replace it)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._rows_in_part: dict[str, int] = {}
        self._parts: dict[str, list[str]] = {s: [] for s in schema.SPLITS}
        self._rows: dict[str, int] = {s: 0 for s in schema.SPLITS}

    def _open_part(self, split: str) -> pq.ParquetWriter:
        rel = f"{split}/{schema.part_name(len(self._parts[split]))}"
        (self.tmp_dir / split).mkdir(exist_ok=True)
        self._parts[split].append(rel)
        self._rows_in_part[split] = 0
        writer = pq.ParquetWriter(self.tmp_dir / rel, schema.INTERACTIONS, compression="zstd")
        self._writers[split] = writer
        return writer

    def write_interactions(self, split: str, table: pa.Table) -> None:
        """Append rows to a split; cuts a new part file every ``schema.PART_ROWS`` rows."""
        table = table.select(schema.INTERACTIONS.names).cast(schema.INTERACTIONS)
        offset = 0
        while offset < table.num_rows:
            writer = self._writers.get(split)
            if writer is None or self._rows_in_part[split] >= schema.PART_ROWS:
                if writer is not None:
                    writer.close()
                writer = self._open_part(split)
            take = min(table.num_rows - offset, schema.PART_ROWS - self._rows_in_part[split])
            writer.write_table(table.slice(offset, take), row_group_size=schema.ROW_GROUP_ROWS)
            self._rows_in_part[split] += take
            self._rows[split] += take
            offset += take

    def write_side_table(self, name: str, table: pa.Table, table_schema: pa.Schema) -> None:
        pq.write_table(table.select(table_schema.names).cast(table_schema), self.tmp_dir / name, compression="zstd")

    def commit(self, manifest: dict[str, Any]) -> Path:
        for split in schema.SPLITS:
            if self._writers.get(split) is None:
                self.write_interactions(split, schema.INTERACTIONS.empty_table())
                if self._writers.get(split) is None:  # an empty table writes nothing: make an empty part
                    self._open_part(split)
            self._writers[split].close()
        files = {}
        for rel in [schema.ITEMS_FILE, schema.USERS_FILE] + [p for s in schema.SPLITS for p in self._parts[s]]:
            path = self.tmp_dir / rel
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": pq.ParquetFile(path).metadata.num_rows}
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            **manifest,
            "splits": {s: {"rows": self._rows[s], "files": self._parts[s]} for s in schema.SPLITS},
            "files": files,
            "written_by": {
                "morec_dist": __version__,
                "pyarrow": pa.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        with open(self.tmp_dir / schema.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        self._publish()
        return self.out_dir

    def _publish(self) -> None:
        # Swap in with renames: the old directory is removed only after the new one is in place.
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - best effort on the error path
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
