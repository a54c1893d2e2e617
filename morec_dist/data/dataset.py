"""The validated handle on a prepared dataset: a local directory or a filesystem URI (s3://...).

``PreparedDataset.open`` is the only way the rest of the package reaches a dataset: it
checks the manifest, every file's presence, size, Parquet footer, schema and row count,
optionally its sha256, and the values that later code relies on (ids in range, prices
finite and non-negative, group ids within their group counts, no empty split). Every
failure is a ``DatasetError`` naming the file, the column and the problem; nothing is
coerced. Where the bytes come from is ``data/storage.py``'s: the checks and the bytes are
the same for a local directory and for a URI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from morec_dist.data import schema, storage
from morec_dist.data.storage import Location, StoragePath

# set by the `morec` parent that fully verified a dataset (its URI): the ranks then skip it
VERIFIED_ENV = "MOREC_DATASET_VERIFIED"

REQUIRED_MANIFEST_KEYS = (
    "schema_version",
    "num_users",
    "num_items",
    "splits",
    "files",
    "groups",
    "q_star",
    "group_layout",
    "features",
)


class DatasetError(ValueError):
    """A prepared dataset is missing, truncated, mistyped or holds out-of-range values."""


def _fail(where: str, problem: str) -> None:
    raise DatasetError(f"{where}: {problem}")


def _load_manifest(root: StoragePath) -> dict[str, Any]:
    path = root / schema.MANIFEST
    if isinstance(root, Path) and not root.is_dir():
        _fail(str(root), "not a directory (prepare it with `morec prepare ...`)")
    if not storage.exists(path):
        # on an object store the manifest is written last: a write that stopped has none
        _fail(str(path), "missing: not a prepared dataset (or its write never finished)")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    for key in REQUIRED_MANIFEST_KEYS:
        if key not in manifest:
            _fail(str(path), f"key {key!r} missing")
    if manifest["schema_version"] != schema.SCHEMA_VERSION:
        _fail(
            str(path),
            f"schema_version {manifest['schema_version']} != supported {schema.SCHEMA_VERSION} (prepare it again)",
        )
    _check_features(path, manifest["features"])
    _check_group_layout(path, manifest)
    return manifest


def _check_features(path: StoragePath, features: Any) -> None:
    if not isinstance(features, dict):
        _fail(str(path), "'features' must be an object of name -> {kind, cardinality, entity}")
    for name, entry in features.items():
        try:
            schema.FeatureSpec.from_manifest(name, entry)
        except (KeyError, TypeError, ValueError) as exc:
            _fail(str(path), f"features[{name!r}]: {exc}")


def _check_group_layout(path: StoragePath, manifest: dict[str, Any]) -> None:
    """Every group column has a layout; every gid 1..G is listed; the rows add up to the
    manifest's train counts; the files are the ones ``files`` checks."""
    layout = manifest["group_layout"]
    where = f"{path}: group_layout"
    if not isinstance(layout, dict) or not {"seed", "root", "columns"} <= set(layout):
        _fail(str(path), "'group_layout' must hold 'seed', 'root' and 'columns'")
    if layout["root"] != schema.GROUP_LAYOUT_ROOT:
        _fail(where, f"root {layout['root']!r} != {schema.GROUP_LAYOUT_ROOT!r}")
    missing = set(manifest["groups"]) - set(layout["columns"])
    if missing:
        _fail(where, f"no partitions for group columns {sorted(missing)}")
    for column, entry in layout["columns"].items():
        g = int(entry["num_groups"])
        if column in manifest["groups"] and g != manifest["groups"][column]["num_groups"]:
            _fail(f"{where}[{column!r}]", f"num_groups {g} != {manifest['groups'][column]['num_groups']} in 'groups'")
        if set(entry["groups"]) != {str(gid) for gid in range(1, g + 1)}:
            _fail(f"{where}[{column!r}]", f"must list every group id 1..{g}")
        counts = manifest["groups"].get(column, {}).get("train_counts")
        for gid in range(1, g + 1):
            group = entry["groups"][str(gid)]
            rows = sum(int(f["rows"]) for f in group["files"])
            if rows != group["rows"]:
                _fail(f"{where}[{column!r}][{gid}]", f"files hold {rows} rows != {group['rows']}")
            if counts is not None and int(counts[gid - 1]) != group["rows"]:
                _fail(f"{where}[{column!r}][{gid}]", f"{group['rows']} rows != train_counts {int(counts[gid - 1])}")
            for f in group["files"]:
                if not f["path"].startswith(schema.group_dir(column, gid) + "/"):
                    _fail(f"{where}[{column!r}][{gid}]", f"file {f['path']!r} outside {schema.group_dir(column, gid)}/")


def _check_schema(path: StoragePath, actual: pa.Schema, expected: pa.Schema) -> None:
    for field in expected:
        index = actual.get_field_index(field.name)
        if index < 0:
            _fail(str(path), f"column {field.name!r} missing (expected {field.type})")
        if not actual.field(index).type.equals(field.type):
            _fail(str(path), f"column {field.name!r} has type {actual.field(index).type}, expected {field.type}")


def _range_checks(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    checks = {"user_id": (1, manifest["num_users"]), "item_id": (1, manifest["num_items"])}
    for column, stats in manifest["groups"].items():
        checks[column] = (1, stats["num_groups"])
    for name, entry in manifest["features"].items():
        # single-hot: 0 = missing, 1..C; multi-hot: the values of the lists, 1..C
        checks[name] = (0 if entry["kind"] == "single" else 1, entry["cardinality"])
    return checks


def _check_values(
    path: StoragePath, table_or_batch: pa.RecordBatch | pa.Table, ranges: dict[str, tuple[int, int]]
) -> None:
    for column, (low, high) in ranges.items():
        if column not in table_or_batch.schema.names:
            continue
        values = table_or_batch[column]
        if pa.types.is_list(values.type):
            if values.null_count:
                _fail(str(path), f"column {column!r} has {values.null_count} null lists (use an empty list)")
            values = pc.list_flatten(values)
        if values.null_count:
            _fail(str(path), f"column {column!r} has {values.null_count} null values")
        if len(values) == 0:
            continue
        mm = pc.min_max(values).as_py()
        if mm["min"] < low or mm["max"] > high:
            _fail(
                str(path),
                f"column {column!r} has values in [{mm['min']}, {mm['max']}], expected within [{low}, {high}]",
            )
    if "price" in table_or_batch.schema.names and len(table_or_batch):
        price = table_or_batch["price"]
        nan = pc.sum(pc.cast(pc.is_nan(price), pa.int64())).as_py() or 0
        if nan:
            _fail(str(path), f"column 'price' has {nan} NaN values")
        mm = pc.min_max(price).as_py()
        if mm["min"] < 0 or not np.isfinite(mm["max"]):
            _fail(str(path), f"column 'price' has values in [{mm['min']}, {mm['max']}], expected finite and >= 0")


@dataclass
class PreparedDataset:
    path: StoragePath  # a local Path, or a Location inside a filesystem (data/storage.py)
    manifest: dict[str, Any]

    @classmethod
    def open(
        cls, path: str | Path | Location, *, verify_checksums: bool = True, verify_values: bool = True
    ) -> PreparedDataset:
        root = storage.location(path)
        manifest = _load_manifest(root)
        dataset = cls(root, manifest)
        dataset._check_files(verify_checksums)
        if verify_values:
            dataset._check_all_values()
        return dataset

    # ---------------------------------------------------------------- accessors
    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def q_star(self) -> np.ndarray:
        return np.asarray(self.manifest["q_star"], dtype=np.float64)

    def group_columns(self) -> list[str]:
        return list(self.manifest["groups"])

    def num_groups(self, column: str) -> int:
        if column not in self.manifest["groups"]:
            raise DatasetError(
                f"{self.path / schema.MANIFEST}: no group column {column!r}; have {self.group_columns()}"
            )
        return int(self.manifest["groups"][column]["num_groups"])

    def train_counts(self, column: str) -> np.ndarray:
        self.num_groups(column)
        return np.asarray(self.manifest["groups"][column]["train_counts"], dtype=np.int64)

    @property
    def features(self) -> dict[str, schema.FeatureSpec]:
        """The declared side features, in declaration order."""
        return {n: schema.FeatureSpec.from_manifest(n, e) for n, e in self.manifest["features"].items()}

    @property
    def group_layout(self) -> dict[str, Any]:
        return self.manifest["group_layout"]

    @property
    def layout_seed(self) -> int:
        return int(self.group_layout["seed"])

    def group_rows(self, column: str, gid: int) -> int:
        """Train rows of group ``gid`` (1-based) of ``column``."""
        return int(self._layout_group(column, gid)["rows"])

    @property
    def uri(self) -> str:
        """What another process passes to ``open`` to reach this dataset (a URI keeps its query)."""
        return storage.uri_of(self.path)

    def group_files(self, column: str, gid: int) -> list[tuple[StoragePath, int]]:
        """(path, rows) of each part file of group ``gid``, in stream order (the hash order)."""
        return [(self.path / f["path"], int(f["rows"])) for f in self._layout_group(column, gid)["files"]]

    def _layout_group(self, column: str, gid: int) -> dict[str, Any]:
        columns = self.group_layout["columns"]
        if column not in columns:
            raise DatasetError(
                f"{self.path / schema.MANIFEST}: no by_group layout for {column!r}; have {sorted(columns)}"
            )
        groups = columns[column]["groups"]
        if str(gid) not in groups:
            raise DatasetError(
                f"{self.path / schema.MANIFEST}: {column!r} has no group {gid} (groups "
                f"1..{columns[column]['num_groups']})"
            )
        return groups[str(gid)]

    def split_rows(self, split: str) -> int:
        return int(self.manifest["splits"][split]["rows"])

    def split_files(self, split: str) -> list[StoragePath]:
        if split not in schema.SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {schema.SPLITS}")
        return [self.path / rel for rel in self.manifest["splits"][split]["files"]]

    def files_fingerprint(self, split: str = "train") -> str:
        """A short id of a split's exact content, from the manifest checksums (for caches)."""
        import hashlib

        digest = hashlib.sha256()
        for rel in self.manifest["splits"][split]["files"]:
            digest.update(self.manifest["files"][rel]["sha256"].encode())
        return digest.hexdigest()[:16]

    @cached_property
    def items(self) -> pa.Table:
        return storage.read_table(self.path / schema.ITEMS_FILE).sort_by("item_id")

    @cached_property
    def users(self) -> pa.Table:
        return storage.read_table(self.path / schema.USERS_FILE).sort_by("user_id")

    def item_column(self, column: str) -> np.ndarray:
        """An item column as an array indexed by item_id (index 0 is padding, zero)."""
        # Projected: the item table of a large catalogue has many feature columns, and a
        # reader needs one or two of them (reading all of it cost ~180 MB at 500k items).
        if "items" in self.__dict__:  # already read whole by someone else: reuse it
            table = self.items
        else:
            items = storage.parquet_file(self.path / schema.ITEMS_FILE)
            if column not in items.schema_arrow.names:
                raise KeyError(column)
            # one thread: read_table's threaded read peaks ~4x higher (50 MB at 500k items)
            table = items.read(columns=list(dict.fromkeys(["item_id", column])), use_threads=False)
        values = table[column].to_numpy()
        out = np.zeros(self.num_items + 1, dtype=values.dtype)
        out[table["item_id"].to_numpy()] = values
        return out

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The whole split in memory: for the small valid/test splits, never for train at scale."""
        return pa.concat_tables([storage.read_table(f, columns=columns) for f in self.split_files(split)])

    # -------------------------------------------------------------- validation
    def _expected_files(self) -> dict[str, pa.Schema]:
        features = self.features
        interactions = schema.interaction_schema(features)
        expected = {
            schema.ITEMS_FILE: schema.entity_schema(schema.ITEMS, features, "item"),
            schema.USERS_FILE: schema.entity_schema(schema.USERS, features, "user"),
        }
        for split in schema.SPLITS:
            info = self.manifest["splits"].get(split)
            if info is None:
                _fail(str(self.path / schema.MANIFEST), f"split {split!r} missing")
            if info["rows"] <= 0:
                _fail(str(self.path / split), f"split {split!r} is empty")
            for rel in info["files"]:
                expected[rel] = interactions
        for rel in self._layout_files():
            expected[rel] = interactions
        return expected

    def _layout_files(self) -> list[str]:
        return [
            f["path"] for c in self.group_layout["columns"].values() for g in c["groups"].values() for f in g["files"]
        ]

    def _check_files(self, verify_checksums: bool) -> None:
        for rel, expected_schema in self._expected_files().items():
            path = self.path / rel
            info = self.manifest["files"].get(rel)
            if info is None:
                _fail(str(self.path / schema.MANIFEST), f"no entry for file {rel!r}")
            if not storage.exists(path):
                _fail(str(path), "missing")
            size = storage.size(path)
            if size != info["bytes"]:
                _fail(str(path), f"size {size} bytes != {info['bytes']} in the manifest (truncated or replaced)")
            try:
                footer = storage.parquet_file(path)  # one open: the footer holds both
                metadata, actual = footer.metadata, footer.schema_arrow
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
            _check_schema(path, actual, expected_schema)
            if metadata.num_rows != info["rows"]:
                _fail(str(path), f"{metadata.num_rows} rows != {info['rows']} in the manifest")
            if verify_checksums and storage.sha256(path) != info["sha256"]:
                _fail(str(path), "sha256 does not match the manifest (the file was modified or corrupted)")

    def _check_all_values(self) -> None:
        ranges = _range_checks(self.manifest)
        items = self.items
        ids = items["item_id"].to_numpy()
        if len(ids) != self.num_items or not np.array_equal(np.sort(ids), np.arange(1, self.num_items + 1)):
            _fail(
                str(self.path / schema.ITEMS_FILE),
                f"column 'item_id' must hold each of 1..{self.num_items} exactly once",
            )
        _check_values(self.path / schema.ITEMS_FILE, items, ranges)
        _check_values(self.path / schema.USERS_FILE, self.users, ranges)
        for split in schema.SPLITS:
            for path in self.split_files(split):
                try:
                    for batch in storage.parquet_file(path).iter_batches(batch_size=1 << 20):
                        _check_values(path, batch, ranges)
                except (pa.ArrowInvalid, OSError) as exc:
                    raise DatasetError(f"{path}: corrupt Parquet data ({exc})") from None
        # each partition holds only its own group (the other values were checked in train)
        for column, entry in self.group_layout["columns"].items():
            for gid, group in entry["groups"].items():
                for f in group["files"]:
                    values = storage.read_table(self.path / f["path"], columns=[column])[column]
                    if len(values) and pc.min_max(values).as_py() != {"min": int(gid), "max": int(gid)}:
                        _fail(str(self.path / f["path"]), f"column {column!r} holds values other than its group {gid}")
