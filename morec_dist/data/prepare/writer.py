"""Writes a prepared dataset atomically, to a local directory or a filesystem URI, and the
derived item groupings.

Every preparer (MovieLens-1M, synthetic, user Parquet) produces its tables and hands them
to ``DatasetWriter``; it owns the part-file layout, the row-group size, the group-partitioned
copy (``layout.write_group_layout``, run at commit), the checksums and the manifest, and it
publishes so that a crash never leaves a half-written dataset where a valid one is expected:
a local directory is renamed into place; on an object store (no rename) the files are
uploaded from a local staging directory and ``manifest.json`` last, so the dataset exists
exactly when its manifest does (``PreparedDataset.open`` refuses a prefix without one).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Generic, Self, TypeVar, cast, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from morec_dist import __version__
from morec_dist.data import schema, storage
from morec_dist.data.schema import sha256_file
from morec_dist.data.storage import Location, StoragePath


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


def category_groups(
    first_genre: np.ndarray, train_item_counts: np.ndarray, top: int = 9
) -> tuple[np.ndarray, list[str]]:
    """Fairness groups: the ``top`` first-genres by train interactions get 1..top (ties by
    name), every other genre ``top + 1``. Inputs are by item_id - 1. Returns the group per
    item (by item_id - 1) and the genre name of each of the first ``top`` groups."""
    totals: dict[str, int] = {}
    for genre, count in zip(first_genre.tolist(), train_item_counts.tolist(), strict=True):
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


def reference_groups(
    fair: np.ndarray, align: np.ndarray, rev: np.ndarray, popularity: np.ndarray, num_fair: int, fair_names: list[str]
) -> dict[str, dict[str, Any]]:
    """The manifest's ``groups`` of the reference objectives: category (with its names; the
    last group is "other"), popularity band and price band, from per-item group ids."""
    groups = {
        "fair_group": group_stats(fair, popularity, num_fair),
        "align_group": group_stats(align, popularity, schema.NUM_BANDS),
        "rev_group": group_stats(rev, popularity, schema.NUM_BANDS),
    }
    groups["fair_group"]["names"] = fair_names + ["other"]
    return groups


def reference_user_features(gender: np.ndarray, age: np.ndarray, occupation: np.ndarray) -> dict[str, np.ndarray]:
    """ML-1M's user codes as the dense single-hot ids of ``schema.reference_features``
    (indexed like the inputs): gender 0/1 -> 1/2, age code -> its rank 1..7, occupation + 1."""
    ages = np.asarray(schema.ML1M_AGES)
    rank = np.searchsorted(ages, age)
    if np.any(rank >= len(ages)) or np.any(ages[rank.clip(max=len(ages) - 1)] != age):
        raise ValueError(
            f"user age codes {sorted(set(age.tolist()) - set(ages.tolist()))} are not ML-1M codes {list(ages)}"
        )
    if occupation.min(initial=0) < 0 or occupation.max(initial=0) >= schema.ML1M_NUM_OCCUPATIONS:
        raise ValueError(f"user occupations outside 0..{schema.ML1M_NUM_OCCUPATIONS - 1}")
    return {
        "user_gender": gender.astype(np.int32) + 1,
        "user_age": rank.astype(np.int32) + 1,
        "user_occupation": occupation.astype(np.int32) + 1,
    }


def join_features(
    interactions: pa.Table, users: pa.Table, items: pa.Table, features: dict[str, schema.FeatureSpec]
) -> pa.Table:
    """Appends each user / item feature column to interaction rows, looked up by id (the
    side tables must hold ids 1..N in order)."""
    user_pos = pc.subtract(interactions["user_id"], 1)
    item_pos = pc.subtract(interactions["item_id"], 1)
    for spec in features.values():
        if spec.entity == "user":
            interactions = interactions.append_column(spec.name, users[spec.name].take(user_pos))
        elif spec.entity == "item":
            interactions = interactions.append_column(spec.name, items[spec.name].take(item_pos))
    return interactions


def check_target(out: StoragePath, overwrite: bool) -> None:
    """Refuses an existing dataset (or, on a store, a prefix holding files but no manifest:
    an unfinished write, or someone else's data) unless ``overwrite``."""
    if overwrite:
        return
    if isinstance(out, Path):
        if out.exists():
            raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
        return
    if storage.exists(out / schema.MANIFEST):
        raise FileExistsError(f"{out}: a dataset already exists (pass --overwrite to replace it)")
    if storage.files_below(out):
        raise FileExistsError(
            f"{out}: holds files but no {schema.MANIFEST} (an unfinished write?); pass --overwrite to replace them"
        )


def publish_remote(staging: Path, out: Location) -> None:
    """Uploads a finished dataset directory: first the old manifest goes (the old dataset stops
    existing before any of its files changes), then the old files, then every new file, and
    the manifest last: the commit point on a store without rename."""
    if storage.exists(out / schema.MANIFEST):
        out.fs.delete_file((out / schema.MANIFEST).path)
    for stale in storage.files_below(out):
        out.fs.delete_file(stale)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != schema.MANIFEST)
    for path in files + [staging / schema.MANIFEST]:
        storage.upload(path, out / path.relative_to(staging).as_posix())


# what ``commit`` returns: a Path for a writer made with a Path, else a Path or a Location
Where = TypeVar("Where", bound=Path | Location)


class DatasetWriter(Generic[Where]):
    """Streams interaction tables into part files inside a temporary directory; ``commit``
    writes the manifest and publishes: a rename into place locally; on a filesystem URI an
    upload of the staged files with the manifest last (module doc)."""

    @overload
    def __init__(
        self: DatasetWriter[Path],
        out_dir: Path,
        *,
        overwrite: bool = False,
        features: dict[str, schema.FeatureSpec] | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: DatasetWriter[StoragePath],
        out_dir: str | Location,
        *,
        overwrite: bool = False,
        features: dict[str, schema.FeatureSpec] | None = None,
    ) -> None: ...

    def __init__(
        self,
        out_dir: str | Path | Location,
        *,
        overwrite: bool = False,
        features: dict[str, schema.FeatureSpec] | None = None,
    ) -> None:
        self.out_dir = cast(Where, storage.location(out_dir))
        self.features = dict(features or {})
        self.interactions_schema = schema.interaction_schema(self.features)
        check_target(self.out_dir, overwrite)
        if isinstance(self.out_dir, Path):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging_parent: str | None = str(self.out_dir.parent)
        else:  # staged on local disk ($TMPDIR), uploaded at commit
            staging_parent = None
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=staging_parent))
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._rows_in_part: dict[str, int] = {}
        self._parts: dict[str, list[str]] = {s: [] for s in schema.SPLITS}
        self._rows: dict[str, int] = {s: 0 for s in schema.SPLITS}
        self._side: list[str] = []
        self._adopted: set[str] = set()

    def _open_part(self, split: str) -> pq.ParquetWriter:
        rel = f"{split}/{schema.part_name(len(self._parts[split]))}"
        (self.tmp_dir / split).mkdir(exist_ok=True)
        self._parts[split].append(rel)
        self._rows_in_part[split] = 0
        writer = pq.ParquetWriter(self.tmp_dir / rel, self.interactions_schema, compression="zstd")
        self._writers[split] = writer
        return writer

    def write_interactions(self, split: str, table: pa.Table) -> None:
        """Append rows to a split; cuts a new part file every ``schema.PART_ROWS`` rows."""
        table = table.select(self.interactions_schema.names).cast(self.interactions_schema)
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

    def adopt_parts(self, split: str, parts: list[tuple[str, int]]) -> None:
        """Takes part files already written into ``tmp_dir`` (by Ray tasks), in stream order:
        renames them to part-00000... of ``split``."""
        if self._writers.get(split) is not None or self._parts[split]:
            raise RuntimeError(f"split {split!r} already has parts")
        (self.tmp_dir / split).mkdir(exist_ok=True)
        for tmp, rows in parts:
            rel = f"{split}/{schema.part_name(len(self._parts[split]))}"
            os.rename(self.tmp_dir / tmp, self.tmp_dir / rel)
            self._parts[split].append(rel)
            self._rows[split] += int(rows)
        self._adopted.add(split)

    def write_side_table(self, name: str, table: pa.Table, table_schema: pa.Schema) -> None:
        """items.parquet / users.parquet (their entity's feature columns are added to the
        schema here) or an id map."""
        entity = {schema.ITEMS_FILE: "item", schema.USERS_FILE: "user"}.get(name)
        if entity is not None:
            table_schema = schema.entity_schema(table_schema, self.features, entity)
        (self.tmp_dir / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.select(table_schema.names).cast(table_schema), self.tmp_dir / name, compression="zstd")
        if name not in self._side:
            self._side.append(name)

    def commit(
        self,
        manifest: dict[str, Any],
        *,
        layout_seed: int | None = None,
        layout_engine: str = "auto",
        progress: bool = False,
    ) -> Where:
        """Closes the splits, writes by_group/ (seed: ``layout_seed``, else the manifest's
        ``seed``, else 0), checksums every file, writes the manifest and publishes."""
        from morec_dist.data.prepare.layout import LayoutJob, layout_files, write_group_layout

        for split in schema.SPLITS:
            if split in self._adopted and self._parts[split]:
                continue
            if self._writers.get(split) is None:
                self.write_interactions(split, self.interactions_schema.empty_table())
                if self._writers.get(split) is None:  # an empty table writes nothing: make an empty part
                    self._open_part(split)
            self._writers[split].close()
        seed = layout_seed if layout_seed is not None else int(manifest.get("seed", 0))
        group_columns = {c: int(g["num_groups"]) for c, g in manifest["groups"].items()}
        layout = write_group_layout(
            LayoutJob(self.tmp_dir, self._parts["train"], group_columns, seed, layout_engine, progress)
        )
        files = {}
        side = [schema.ITEMS_FILE, schema.USERS_FILE] + [
            n for n in self._side if n not in (schema.ITEMS_FILE, schema.USERS_FILE)
        ]
        for rel in side + [p for s in schema.SPLITS for p in self._parts[s]] + layout_files(layout):
            path = self.tmp_dir / rel
            files[rel] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "rows": pq.ParquetFile(path).metadata.num_rows,
            }
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            **manifest,
            "splits": {s: {"rows": self._rows[s], "files": self._parts[s]} for s in schema.SPLITS},
            "group_layout": layout,
            "features": {name: spec.to_manifest() for name, spec in self.features.items()},
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
        if isinstance(self.out_dir, Location):
            publish_remote(self.tmp_dir, self.out_dir)
            shutil.rmtree(self.tmp_dir)
            return
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
            except Exception:  # broad on purpose: best effort on the error path
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
