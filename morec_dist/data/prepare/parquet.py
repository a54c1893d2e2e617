"""`morec prepare parquet`: a user's own interaction logs (and item / user tables) in Parquet,
local or on any pyarrow filesystem (s3://, gs://, hdfs://), into the prepared layout.

The mapping (``ParquetMapping``, from a TOML file plus ``section.key=value`` overrides) is
validated once, at the edge, together with every input file's schema, before any work
starts. The rows then go through Ray Data (local Ray by default, a cluster with
``--ray-address``), streaming:

1. profile: one pass over the interactions checks nulls and unknown item ids per file
   (as data, so the error names the file and the column) and counts the positives;
2. ids: the distinct raw user ids (``Dataset.unique``) and the catalogue's item ids, sorted,
   become dense 1..N ids; the mapping is kept as ``id_map/{users,items}.parquet``;
3. split: positives, with dense ids, are range-partitioned by user (``Dataset.sort`` with
   user-id boundaries, so a user never straddles two blocks), each block is ordered by
   (user, timestamp, item) and labelled train / valid / test (leave-one-out per user as
   docs/data.md, or a time cut); the result is materialised (object store, spilling);
4. train popularity per item (``groupby(...).sum``) gives, on the driver, the objectives'
   item groups exactly as for MovieLens-1M: popularity bands, price bands, the top
   categories -> fairness groups, and q*;
5. write: each split block joins the item meta and the declared features and is written as
   part files; the DatasetWriter then adds the by_group layout (Ray Data engine), checksums
   and publishes the directory with a rename.

Items and users tables (catalogue-sized) are read on the driver.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from morec_dist.data import schema, storage
from morec_dist.data.prepare.writer import (
    DatasetWriter,
    category_groups,
    check_target,
    popularity_bands,
    price_bands,
    reference_groups,
)
from morec_dist.data.storage import Location, StoragePath

SPLIT_RULES = ("leave_one_out", "time")
BLOCK_ROWS = 1 << 20  # positives per split block (one user range)
UNKNOWN_CATEGORY = ""  # null categories: always in the "other" fairness group


class PrepareError(ValueError):
    """Bad input to `prepare parquet`: names the file (or mapping key) and the column."""


# --------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class ParquetMapping:
    """What the user's columns mean. Sections of the TOML file: [input], [columns],
    [features], [split], [output]; see docs/data.md."""

    source: str  # the mapping file, for messages
    interactions: tuple[str, ...]
    user: str
    item: str
    timestamp: str
    price: str
    category: str
    items: str | None = None
    users: str | None = None
    label: str | None = None
    rating: str | None = None
    rating_threshold: float | None = None
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    split: str = "leave_one_out"
    valid_from: int | None = None
    test_from: int | None = None
    seed: int = 0
    fair_groups: int = 10
    name: str = "parquet"

    SECTIONS = {
        "input": ("interactions", "items", "users"),
        "columns": ("user", "item", "timestamp", "label", "rating", "rating_threshold", "price", "category"),
        "features": ("user", "item"),
        "split": ("rule", "valid_from", "test_from"),
        "output": ("seed", "fair_groups", "name"),
    }

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> ParquetMapping:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise PrepareError(f"{path}: mapping file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise PrepareError(f"{path}: not valid TOML ({exc})") from None
        for item in overrides:
            key, sep, value = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise PrepareError(f"override {item!r}: expected SECTION.KEY=VALUE")
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                parsed = value  # a bare string
            raw.setdefault(section, {})[name] = parsed
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<mapping>") -> ParquetMapping:
        for section, values in raw.items():
            if section not in cls.SECTIONS or not isinstance(values, dict):
                raise PrepareError(f"{source}: unknown section [{section}] (expected {list(cls.SECTIONS)})")
            for key in values:
                if key not in cls.SECTIONS[section]:
                    raise PrepareError(
                        f"{source}: [{section}] {key}: unknown key (expected one of {cls.SECTIONS[section]})"
                    )

        def get(section: str, key: str, kind: type | tuple, required: bool = False, default: Any = None) -> Any:
            value = raw.get(section, {}).get(key, default)
            if value is None:
                if required:
                    raise PrepareError(f"{source}: [{section}] {key}: required")
                return None
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise PrepareError(
                    f"{source}: [{section}] {key}: expected {getattr(kind, '__name__', kind)}, got {value!r}"
                )
            return value

        interactions = get("input", "interactions", (str, list), required=True)
        interactions = (interactions,) if isinstance(interactions, str) else tuple(interactions)
        if not interactions or not all(isinstance(p, str) for p in interactions):
            raise PrepareError(f"{source}: [input] interactions: expected a path or a list of paths")
        rule = get("split", "rule", str, default="leave_one_out")
        if rule not in SPLIT_RULES:
            raise PrepareError(f"{source}: [split] rule: unknown split rule {rule!r} (expected one of {SPLIT_RULES})")
        mapping = cls(
            source=source,
            interactions=interactions,
            items=get("input", "items", str),
            users=get("input", "users", str),
            user=get("columns", "user", str, required=True),
            item=get("columns", "item", str, required=True),
            timestamp=get("columns", "timestamp", str, required=True),
            label=get("columns", "label", str),
            rating=get("columns", "rating", str),
            rating_threshold=get("columns", "rating_threshold", (int, float)),
            price=get("columns", "price", str, required=True),
            category=get("columns", "category", str, required=True),
            user_features=tuple(get("features", "user", list, default=[])),
            item_features=tuple(get("features", "item", list, default=[])),
            split=rule,
            valid_from=get("split", "valid_from", int),
            test_from=get("split", "test_from", int),
            seed=get("output", "seed", int, default=0),
            fair_groups=get("output", "fair_groups", int, default=10),
            name=get("output", "name", str, default="parquet"),
        )
        mapping._check(source)
        return mapping

    def _check(self, source: str) -> None:
        if (self.label is None) == (self.rating is None):
            raise PrepareError(
                f"{source}: [columns]: set exactly one of 'label' (positive when true / non-zero) or 'rating' with "
                "'rating_threshold'"
            )
        if self.rating is not None and self.rating_threshold is None:
            raise PrepareError(f"{source}: [columns] rating_threshold: required with 'rating'")
        if self.split == "time":
            if self.valid_from is None or self.test_from is None or not self.valid_from <= self.test_from:
                raise PrepareError(
                    f"{source}: [split]: rule 'time' needs integers valid_from <= test_from (train < valid_from <= "
                    "valid < test_from <= test)"
                )
        elif self.valid_from is not None or self.test_from is not None:
            raise PrepareError(f"{source}: [split]: valid_from / test_from apply only to rule 'time'")
        if self.user_features and self.users is None:
            raise PrepareError(f"{source}: [features] user: needs [input] users (a table of user id + feature columns)")
        if self.item_features and self.items is None:
            raise PrepareError(f"{source}: [features] item: needs [input] items")
        if not 2 <= self.fair_groups <= 1000:
            raise PrepareError(f"{source}: [output] fair_groups: expected 2..1000, got {self.fair_groups}")
        names = [f"user_{c}" for c in self.user_features] + [f"item_{c}" for c in self.item_features]
        if len(set(names)) != len(names):
            raise PrepareError(f"{source}: [features]: a feature column is listed twice")

    @property
    def item_columns_source(self) -> str:
        return "items" if self.items is not None else "interactions"

    @property
    def positive_column(self) -> str:
        """The label column, else the rating column (from_toml requires exactly one)."""
        column = self.label or self.rating
        assert column is not None, "from_toml validates [columns]"
        return column

    def interaction_columns(self) -> list[str]:
        cols = [self.user, self.item, self.timestamp, self.positive_column]
        if self.items is None:
            cols += [self.price, self.category]
        return cols


# ------------------------------------------------------------------- files and schemas
@dataclass
class Inputs:
    filesystem: pafs.FileSystem
    files: list[str]  # paths on that filesystem, sorted
    uri: str

    def label(self, path: str) -> str:
        """How a file is named in messages: the URI form the user wrote."""
        if "://" in self.uri:
            scheme = self.uri.split("://", 1)[0]
            return f"{scheme}://{path}"
        return path


def resolve(uris: tuple[str, ...] | str, what: str) -> Inputs:
    """A file, a directory (all *.parquet below it) or a list of them, on one filesystem."""
    uris = (uris,) if isinstance(uris, str) else uris
    filesystem, files = None, []
    for uri in uris:
        try:
            if "://" in uri:
                fs, path = pafs.FileSystem.from_uri(uri)
            else:
                fs, path = pafs.LocalFileSystem(), str(Path(uri).resolve())
            info = fs.get_file_info(path)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise PrepareError(f"{uri}: cannot open {what} ({exc})") from None
        if filesystem is not None and type(fs) is not type(filesystem):
            raise PrepareError(f"{uri}: all {what} inputs must be on one filesystem")
        filesystem = fs
        if info.type == pafs.FileType.NotFound:
            raise PrepareError(f"{uri}: {what} not found")
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
            if not found:
                raise PrepareError(f"{uri}: no *.parquet files under this {what} directory")
            files += found
        else:
            files.append(path)
    return Inputs(filesystem, files, uris[0])


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list<" + _kind(t.value_type) + ">"
    return str(t)


ID = ("int", "string")
ALLOWED = {
    "user": ID,
    "item": ID,
    "timestamp": ("int", "float", "timestamp"),  # float: epoch seconds, floored
    "label": ("bool", "int"),
    "rating": ("int", "float"),
    "price": ("int", "float"),
    "category": ("string", "int"),
    "feature": ("string", "int", "bool", "list<string>", "list<int>"),
}


def check_schemas(inputs: Inputs, expected: dict[str, str], what: str) -> dict[str, pa.DataType]:
    """Every file has every mapped column, of an accepted kind; returns column -> type."""
    types: dict[str, pa.DataType] = {}
    for path in inputs.files:
        try:
            file_schema = pq.read_schema(path, filesystem=inputs.filesystem)
        except (pa.ArrowInvalid, OSError) as exc:
            raise PrepareError(f"{inputs.label(path)}: not a readable Parquet file ({exc})") from None
        for column, role in expected.items():
            index = file_schema.get_field_index(column)
            if index < 0:
                raise PrepareError(f"{inputs.label(path)}: column {column!r} missing (mapped as the {what} {role})")
            t = file_schema.field(index).type
            allowed = ALLOWED["feature" if role.endswith("feature") else role]
            if role == "category" and _kind(t).startswith("list<"):
                raise PrepareError(
                    f"{inputs.label(path)}: column {column!r} has type {t}, a multi-label list: the {what} category "
                    "must be one label per item (each distinct combination would become its own category); map a "
                    "single-label column, e.g. the first label, as columns.category and the list as a feature"
                )
            if _kind(t) not in allowed:
                raise PrepareError(
                    f"{inputs.label(path)}: column {column!r} has type {t}, expected one of {allowed} for the {what} "
                    f"{role}"
                )
            if column in types and _kind(types[column]) != _kind(t):
                raise PrepareError(
                    f"{inputs.label(path)}: column {column!r} has type {t}, other files have {types[column]}"
                )
            types.setdefault(column, t)
    return types


def read_side_table(inputs: Inputs, columns: list[str]) -> tuple[pa.Table, list[str]]:
    """A catalogue-sized table on the driver; the file of each row, for messages."""
    tables, origin = [], []
    for path in inputs.files:
        table = pq.read_table(path, columns=columns, filesystem=inputs.filesystem)
        tables.append(table.cast(pa.schema([(c, _plain_type(table.schema.field(c).type)) for c in columns])))
        origin += [path] * table.num_rows
    return pa.concat_tables(tables), origin


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain_type(t.value_type))
    return t


def _first_bad_row(inputs: Inputs, origin: list[str], mask: np.ndarray) -> str:
    return inputs.label(origin[int(np.flatnonzero(mask)[0])])


def check_ids(inputs: Inputs, table: pa.Table, origin: list[str], column: str, role: str) -> None:
    values = table[column]
    if values.null_count:
        bad = values.is_null().to_numpy(zero_copy_only=False)
        raise PrepareError(
            f"{_first_bad_row(inputs, origin, bad)}: column {column!r} ({role} id) has {values.null_count} null values"
        )
    unique = pc.unique(values)
    if len(unique) != len(values):
        counts = pc.value_counts(values)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"]
        second = np.flatnonzero(pc.equal(values, dup).to_numpy(zero_copy_only=False))[1]
        raise PrepareError(
            f"{inputs.label(origin[second])}: column {column!r} ({role} id) repeats id {dup} (one row per {role} "
            "expected)"
        )


def check_prices(label: str, price: pa.ChunkedArray | pa.Array, column: str) -> None:
    price = pc.cast(price, pa.float64())
    if price.null_count:
        raise PrepareError(f"{label}: column {column!r} (price) has {price.null_count} null values")
    if len(price) == 0:
        return
    nan = int(pc.sum(pc.cast(pc.is_nan(price), pa.int64())).as_py() or 0)
    if nan:
        raise PrepareError(f"{label}: column {column!r} (price) has {nan} NaN values")
    low = pc.min(price).as_py()
    if low <= 0 or not math.isfinite(pc.max(price).as_py()):
        raise PrepareError(
            f"{label}: column {column!r} (price) has values in [{low}, {pc.max(price).as_py()}], expected finite and "
            "> 0"
        )


def dense_vocabulary(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Sorted distinct non-null values (strings by code point, numbers by value)."""
    unique = pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values).drop_null()
    return unique.take(pc.sort_indices(unique))


def encode_feature(values: pa.ChunkedArray, column: str) -> tuple[pa.Array, str, int]:
    """Single-hot -> int32 0..C (0 = null), multi-hot (a list column) -> list<int32> of
    1..C (null lists and null elements dropped). Returns (codes, kind, C); the dense codes
    follow the sorted distinct values."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_list(values.type):
        rows = values.to_pylist()
        vocab = dense_vocabulary(
            pa.array([v for row in rows if row for v in row if v is not None], type=values.type.value_type)
        )
        code = {v: i + 1 for i, v in enumerate(vocab.to_pylist())}
        lists = pa.array(
            [[code[v] for v in row if v is not None] if row else [] for row in rows], type=pa.list_(pa.int32())
        )
        return lists, "multi", max(len(vocab), 1)
    vocab = dense_vocabulary(values)
    codes = pc.cast(pc.add(pc.index_in(values, value_set=vocab), 1).fill_null(0), pa.int32())
    return codes, "single", max(len(vocab), 1)


# ------------------------------------------------------------------------ Ray stages
_CACHE: dict[str, Any] = {}


def _lookup(ref: Any) -> Any:
    """An object from the object store, fetched once per worker process (a pandas Index
    built once, not a hash table per batch)."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        import pandas as pd

        _CACHE.clear()
        _CACHE[key] = pd.Index(ray.get(ref))
    return _CACHE[key]


def _positive_mask(batch: pa.Table, m: ParquetMapping) -> pa.Array:
    if m.label is not None:
        col = batch[m.label]
        return pc.fill_null(pc.cast(col, pa.bool_()) if not pa.types.is_boolean(col.type) else col, False)
    assert m.rating_threshold is not None, "from_toml requires it with 'rating'"
    return pc.fill_null(pc.greater_equal(pc.cast(batch[m.rating], pa.float64()), float(m.rating_threshold)), False)


def _profile(batch: pa.Table, m: ParquetMapping, items_ref: Any) -> pa.Table:
    """Per batch: the problems, as data (the driver reports the first, naming the file)."""
    if batch.num_rows == 0:
        return pa.table(
            {
                "path": pa.array([], pa.string()),
                "rows": pa.array([], pa.int64()),
                "positives": pa.array([], pa.int64()),
                "nonnull_category": pa.array([], pa.int64()),
                "problem": pa.array([], pa.string()),
            }
        )
    paths = pc.unique(batch["path"]).to_pylist()
    if len(paths) > 1:  # a read task may combine small files: profile each on its own
        return pa.concat_tables([_profile(batch.filter(pc.equal(batch["path"], p)), m, items_ref) for p in paths])
    path = paths[0]
    problems = []
    for column, role in (
        (m.user, "user id"),
        (m.item, "item id"),
        (m.timestamp, "timestamp"),
        (m.label or m.rating, "label" if m.label else "rating"),
    ):
        nulls = batch[column].null_count
        if nulls:
            problems.append(f"column {column!r} ({role}) has {nulls} null values")
        elif role == "timestamp" and pa.types.is_floating(batch[column].type):
            bad = batch.num_rows - int(pc.sum(pc.is_finite(batch[column])).as_py() or 0)
            if bad:
                problems.append(f"column {column!r} ({role}) has {bad} NaN or infinite values")
    positive = _positive_mask(batch, m)
    pos = batch.filter(positive)
    nonnull_category = 0
    if items_ref is not None and pos.num_rows and not problems:
        index = _lookup(items_ref)
        unknown = int((index.get_indexer(pos[m.item].to_numpy(zero_copy_only=False)) < 0).sum())
        if unknown:
            problems.append(f"column {m.item!r} (item id) has {unknown} ids that are not in the items table")
    if m.items is None and pos.num_rows:
        try:
            check_prices("", pos[m.price], m.price)
        except PrepareError as exc:
            problems.append(str(exc).lstrip(": "))
        nonnull_category = pos.num_rows - pos[m.category].null_count
    return pa.table(
        {
            "path": [path],
            "rows": [batch.num_rows],
            "positives": [pos.num_rows],
            "nonnull_category": [nonnull_category],
            "problem": ["; ".join(problems)],
        }
    )


def _to_dense(batch: pa.Table, m: ParquetMapping, users_ref: Any, items_ref: Any) -> pa.Table:
    pos = batch.filter(_positive_mask(batch, m))
    users = _lookup(users_ref).get_indexer(pos[m.user].to_numpy(zero_copy_only=False)) + 1
    items = _lookup(items_ref).get_indexer(pos[m.item].to_numpy(zero_copy_only=False)) + 1
    ts = pos[m.timestamp]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
    elif pa.types.is_floating(ts.type):  # epoch seconds with a fraction: floored, as a timestamp type is cast
        ts = pc.floor(ts)
    rating = pc.cast(pos[m.rating], pa.float32()) if m.rating else pa.array(np.ones(pos.num_rows, dtype=np.float32))
    return pa.table(
        {
            "user_id": users.astype(np.int32),
            "item_id": items.astype(np.int32),
            "timestamp": pc.cast(ts, pa.int64()),
            "rating": rating,
        }
    )


def _split_block(block: pa.Table, m: ParquetMapping) -> pa.Table:
    """One user range: order by (user, timestamp, item), label 0 train, 1 valid, 2 test."""
    u, i, t = (block[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    order = np.lexsort((i, t, u))
    block = block.take(pa.array(order))
    u, t = u[order], t[order]
    if m.split == "time":
        # one held-out row per user and split (the evaluation protocol): the user's first
        # positive in [valid_from, test_from) is valid, the first at >= test_from is test;
        # the user's later positives past the cut are dropped (code 3), never trained on
        window = np.where(t >= m.test_from, 2, np.where(t >= m.valid_from, 1, 0)).astype(np.int8)
        first = np.r_[True, (u[1:] != u[:-1]) | (window[1:] != window[:-1])]
        code = window.copy()
        code[(window > 0) & ~first] = 3
    else:
        first = np.r_[True, u[1:] != u[:-1]]
        starts = np.flatnonzero(first)
        counts = np.diff(np.r_[starts, len(u)])
        count = np.repeat(counts, counts)
        from_end = np.repeat(starts + counts, counts) - np.arange(len(u))
        code = np.zeros(len(u), dtype=np.int8)
        code[(count >= 3) & (from_end == 2)] = 1
        code[(count >= 3) & (from_end == 1)] = 2
    return block.append_column("split", pa.array(code))


def _train_item_counts(block: pa.Table) -> pa.Table:
    train = block.filter(pc.equal(block["split"], 0))
    counts = pc.value_counts(train["item_id"]).flatten() if train.num_rows else None
    if counts is None:
        return pa.table({"item_id": pa.array([], pa.int32()), "n": pa.array([], pa.int64())})
    return pa.table({"item_id": counts[0], "n": pc.cast(counts[1], pa.int64())})


def _write_splits(block: pa.Table, out_root: str, meta_ref: Any, interaction_schema: pa.Schema) -> pa.Table:
    """One sorted user-range block -> train/valid/test piece files (the item meta and the
    declared features joined in). Returns the pieces for the driver to order and rename."""
    import ray

    key = meta_ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(meta_ref)
    items, users = _CACHE[key]
    rows = []
    if block.num_rows:
        item_pos = pc.subtract(block["item_id"], 1)
        user_pos = pc.subtract(block["user_id"], 1)
        table = block.drop_columns(["split"])
        for column in items.schema.names:
            if column != "item_id":
                table = table.append_column(column, items[column].take(item_pos))
        for column in users.schema.names:
            if column != "user_id":
                table = table.append_column(column, users[column].take(user_pos))
        table = table.select(interaction_schema.names).cast(interaction_schema)
        first_user, last_user = int(block["user_id"][0].as_py()), int(block["user_id"][-1].as_py())
        split = block["split"].to_numpy()
        for code, name in enumerate(schema.SPLITS):
            piece = table.filter(pa.array(split == code))
            if piece.num_rows == 0:
                continue
            rel = f"{name}/block-{first_user:010d}.parquet"
            Path(out_root, name).mkdir(parents=True, exist_ok=True)
            pq.write_table(piece, Path(out_root) / rel, row_group_size=schema.ROW_GROUP_ROWS, compression="zstd")
            rows.append(
                {"split": name, "tmp": rel, "rows": piece.num_rows, "first_user": first_user, "last_user": last_user}
            )
    return pa.table(
        {k: [r[k] for r in rows] for k in ("split", "tmp", "rows", "first_user", "last_user")}, schema=_SPLIT_PIECES
    )


_SPLIT_PIECES = pa.schema(
    [
        ("split", pa.string()),
        ("tmp", pa.string()),
        ("rows", pa.int64()),
        ("first_user", pa.int64()),
        ("last_user", pa.int64()),
    ]
)


# ---------------------------------------------------------------------------- the job
@dataclass
class _Log:
    started: float = field(default_factory=time.monotonic)
    quiet: bool = False

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[prepare parquet {time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


def prepare_parquet(
    mapping: ParquetMapping,
    out_dir: str | Path | Location,
    *,
    overwrite: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    layout_engine: str = "auto",
    progress: bool = False,
    quiet: bool = False,
) -> StoragePath:
    log = _Log(quiet=quiet)
    m = mapping
    out = storage.location(out_dir)
    if ray_address and not storage.is_local(out):
        # the Ray tasks write the splits into the writer's staging directory, local to the driver
        raise PrepareError(f"--out {out}: with --ray-address, --out must be a directory every Ray worker sees")
    check_target(out, overwrite)

    # -- the edge: every input file's schema, the side tables' values, before Ray starts
    inter = resolve(m.interactions, "interactions")
    roles = {
        m.user: "user",
        m.item: "item",
        m.timestamp: "timestamp",
        m.positive_column: "label" if m.label else "rating",
    }
    if m.items is None:
        roles.update({m.price: "price", m.category: "category"})
    check_schemas(inter, roles, "interactions")
    items_table = users_table = None
    if m.items is not None:
        items_in = resolve(m.items, "items")
        # the roles last win: a category also declared as a feature is checked as the category
        item_roles = {
            **{c: "item feature" for c in m.item_features},
            m.item: "item",
            m.price: "price",
            m.category: "category",
        }
        check_schemas(items_in, item_roles, "items")
        items_table, origin = read_side_table(items_in, list(item_roles))
        check_ids(items_in, items_table, origin, m.item, "item")
        check_prices(
            items_in.label(items_in.files[0]) if len(items_in.files) == 1 else items_in.uri,
            items_table[m.price],
            m.price,
        )
        if items_table[m.category].null_count == items_table.num_rows:
            raise PrepareError(
                f"{items_in.label(items_in.files[0])}: column {m.category!r} (category) is entirely null"
            )
    if m.users is not None:
        users_in = resolve(m.users, "users")
        user_roles = {m.user: "user", **{c: "user feature" for c in m.user_features}}
        check_schemas(users_in, user_roles, "users")
        users_table, origin = read_side_table(users_in, list(user_roles))
        check_ids(users_in, users_table, origin, m.user, "user")
    log(f"{len(inter.files)} interaction files; mapping {m.source} checked")

    from morec_dist.data.prepare.ray_env import DEFAULT_OBJECT_STORE_MB, ray_runtime

    with ray_runtime(
        ray_address, num_cpus=num_cpus, object_store_mb=object_store_mb or DEFAULT_OBJECT_STORE_MB, progress=progress
    ):
        return _run(m, inter, items_table, users_table, out, overwrite, log, layout_engine)


def _run(
    m: ParquetMapping,
    inter: Inputs,
    items_table: pa.Table | None,
    users_table: pa.Table | None,
    out_dir: StoragePath,
    overwrite: bool,
    log: _Log,
    layout_engine: str,
) -> StoragePath:
    import ray
    import ray.data

    def read() -> ray.data.Dataset:
        return ray.data.read_parquet(
            inter.files, filesystem=inter.filesystem, columns=m.interaction_columns(), include_paths=True, shuffle=None
        )

    # 1. profile
    item_vocab = dense_vocabulary(items_table[m.item]) if items_table is not None else None
    items_ref = ray.put(item_vocab.to_numpy(zero_copy_only=False)) if item_vocab is not None else None
    profile = pa.Table.from_pylist(
        read().map_batches(_profile, batch_format="pyarrow", fn_kwargs={"m": m, "items_ref": items_ref}).take_all()
    )
    for path, problem in sorted(zip(profile["path"].to_pylist(), profile["problem"].to_pylist(), strict=True)):
        if problem:
            raise PrepareError(f"{inter.label(path)}: {problem.split('; ')[0]}")
    positives = int(pc.sum(profile["positives"]).as_py() or 0)
    if positives == 0:
        raise PrepareError(f"{inter.uri}: no positive interactions (column {(m.label or m.rating)!r})")
    if m.items is None and int(pc.sum(profile["nonnull_category"]).as_py() or 0) == 0:
        raise PrepareError(f"{inter.uri}: column {m.category!r} (category) is entirely null")
    log(f"profile: {int(pc.sum(profile['rows']).as_py()):,} rows, {positives:,} positives")

    # 2. dense ids
    # users: those with a positive; items: the catalogue (the items table), else those with a positive
    user_vocab = _sorted_unique(
        read().map_batches(_positive_column, batch_format="pyarrow", fn_kwargs={"m": m, "column": m.user}), "v"
    )
    if item_vocab is None:
        item_vocab = _sorted_unique(
            read().map_batches(_positive_column, batch_format="pyarrow", fn_kwargs={"m": m, "column": m.item}), "v"
        )
        items_ref = ray.put(item_vocab.to_numpy(zero_copy_only=False))
    users_ref = ray.put(user_vocab.to_numpy(zero_copy_only=False))
    num_users, num_items = len(user_vocab), len(item_vocab)
    if num_items < schema.NUM_BANDS:
        raise PrepareError(
            f"{inter.uri}: column {m.item!r}: {num_items} items, need at least {schema.NUM_BANDS} (the popularity "
            "and price bands)"
        )
    log(f"ids: {num_users:,} users, {num_items:,} items")

    # 3. split, by user ranges (a user never straddles two blocks)
    dense = read().map_batches(
        _to_dense, batch_format="pyarrow", fn_kwargs={"m": m, "users_ref": users_ref, "items_ref": items_ref}
    )
    blocks = max(1, math.ceil(positives / BLOCK_ROWS))
    boundaries = sorted({int(1 + k * num_users // blocks) for k in range(1, blocks)} - {1})
    split = dense.sort("user_id", boundaries=boundaries) if boundaries else dense.repartition(1)
    split = split.map_batches(_split_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"m": m}).materialize()
    log(f"split ({m.split}): {split.num_blocks()} user-range blocks")

    # 4. item meta on the driver: popularity, bands, categories -> groups, q*
    counts = pa.Table.from_pylist(
        split.map_batches(_train_item_counts, batch_format="pyarrow").groupby("item_id").sum("n").take_all()
    )
    popularity = np.zeros(num_items + 1, dtype=np.int64)
    if counts.num_rows:
        popularity[counts["item_id"].to_numpy()] = counts["sum(n)"].to_numpy()
    popularity = popularity[1:]
    price, category = _item_meta(m, items_table, item_vocab, read)
    category_names = np.array([UNKNOWN_CATEGORY if c is None else str(c) for c in category.to_pylist()], dtype=object)
    fair, fair_names, num_fair = fairness_groups(category_names, popularity, m.fair_groups)
    align = popularity_bands(popularity)[1:]
    rev = price_bands(price)[1:]

    features: dict[str, schema.FeatureSpec] = {}
    item_meta = {
        "item_id": np.arange(1, num_items + 1, dtype=np.int32),
        "price": price,
        "fair_group": fair,
        "align_group": align,
        "rev_group": rev,
    }
    user_meta: dict[str, Any] = {"user_id": np.arange(1, num_users + 1, dtype=np.int32)}
    if items_table is not None:
        order = pc.index_in(item_vocab, value_set=items_table[m.item].combine_chunks())  # item_id - 1 -> row
        for column in m.item_features:
            encoded, kind, card = encode_feature(items_table[column].take(order), column)
            features[f"item_{column}"] = schema.FeatureSpec(f"item_{column}", kind, card, "item")
            item_meta[f"item_{column}"] = encoded
    if users_table is not None:
        index = pc.index_in(user_vocab, value_set=pc.cast(users_table[m.user], user_vocab.type).combine_chunks())
        for column in m.user_features:
            # users missing from the users table: feature 0 / empty (missing)
            encoded, kind, card = encode_feature(users_table[column].take(index), column)
            features[f"user_{column}"] = schema.FeatureSpec(f"user_{column}", kind, card, "user")
            user_meta[f"user_{column}"] = encoded
    items_meta_table = pa.table(item_meta)
    users_meta_table = pa.table(user_meta)

    # 5. write the splits (Ray), then the side tables, the id maps and the by_group layout
    with DatasetWriter(out_dir, overwrite=overwrite, features=features) as writer:
        meta_ref = ray.put((items_meta_table, users_meta_table))
        pieces = split.map_batches(
            _write_splits,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={
                "out_root": str(writer.tmp_dir),
                "meta_ref": meta_ref,
                "interaction_schema": writer.interactions_schema,
            },
        ).take_all()
        _check_user_ranges(pieces)
        for name in schema.SPLITS:
            mine = sorted((p for p in pieces if p["split"] == name), key=lambda p: p["first_user"])
            if not mine and name != "train":
                raise PrepareError(f"{m.source}: [split] rule {m.split!r} leaves the {name} split empty")
            writer.adopt_parts(name, [(p["tmp"], p["rows"]) for p in mine])
        del split
        writer.write_side_table(
            schema.ITEMS_FILE, _items_table(items_meta_table, item_vocab, category_names, popularity), schema.ITEMS
        )
        writer.write_side_table(schema.USERS_FILE, _users_table(users_meta_table), schema.USERS)
        writer.write_side_table(
            schema.ID_MAP_USERS,
            pa.table({"raw_id": user_vocab, "user_id": user_meta["user_id"]}),
            pa.schema([("raw_id", user_vocab.type), ("user_id", pa.int32())]),
        )
        writer.write_side_table(
            schema.ID_MAP_ITEMS,
            pa.table({"raw_id": item_vocab, "item_id": item_meta["item_id"]}),
            pa.schema([("raw_id", item_vocab.type), ("item_id", pa.int32())]),
        )
        groups = reference_groups(fair, align, rev, popularity, num_fair, fair_names)
        total_train = max(int(popularity.sum()), 1)
        manifest = {
            "name": m.name,
            "source": {"mapping": _mapping_record(m), "interaction_files": len(inter.files)},
            "seed": m.seed,
            "price_note": f"from column {m.price!r} of the {m.item_columns_source}",
            "num_users": num_users,
            "num_items": num_items,
            "num_positives": positives,
            "split": {
                "rule": m.split,
                "valid_from": m.valid_from,
                "test_from": m.test_from,
                "dropped_after_cut": positives - sum(int(p["rows"]) for p in pieces),
            },
            "groups": groups,
            "q_star": [c / total_train for c in groups["align_group"]["train_counts"]],
            "genres": [n for n in fair_names],
        }
        log("splits written; writing the by_group layout")
        path = writer.commit(manifest, layout_engine=layout_engine, progress=not log.quiet)
    log(f"done: {path}")
    return path


def _positive_column(batch: pa.Table, m: ParquetMapping, column: str) -> pa.Table:
    values = batch.filter(_positive_mask(batch, m))[column]
    return pa.table({"v": pc.unique(values.combine_chunks())})


def _sorted_unique(ds: Any, column: str) -> pa.Array:
    values = ds.unique(column)
    return dense_vocabulary(pa.array(values))


def _item_meta(
    m: ParquetMapping, items_table: pa.Table | None, item_vocab: pa.Array, read: Any
) -> tuple[np.ndarray, pa.Array]:
    """price (float64) and category per item_id - 1."""
    if items_table is not None:
        order = pc.index_in(item_vocab, value_set=items_table[m.item].combine_chunks())
        return pc.cast(items_table[m.price].take(order), pa.float64()).to_numpy(), items_table[m.category].take(
            order
        ).combine_chunks()
    # no items table: the largest price / category an item's positives carry
    agg = pa.Table.from_pylist(
        read()
        .map_batches(_positive_item_columns, batch_format="pyarrow", fn_kwargs={"m": m})
        .groupby("item")
        .aggregate(*_max_aggs())
        .take_all()
    )
    order = pc.index_in(item_vocab, value_set=pc.cast(agg["item"], item_vocab.type).combine_chunks())
    return pc.cast(agg["max(price)"].take(order), pa.float64()).to_numpy(), agg["max(category)"].take(
        order
    ).combine_chunks()


def _max_aggs():
    from ray.data.aggregate import Max

    return Max("price"), Max("category")


def _positive_item_columns(batch: pa.Table, m: ParquetMapping) -> pa.Table:
    pos = batch.filter(_positive_mask(batch, m))
    return pa.table({"item": pos[m.item], "price": pc.cast(pos[m.price], pa.float64()), "category": pos[m.category]})


def fairness_groups(names: np.ndarray, popularity: np.ndarray, max_groups: int) -> tuple[np.ndarray, list[str], int]:
    """As for MovieLens-1M: the top (G - 1) categories by train interactions get 1..G-1 (ties
    by name), every other category and every item without one the last group G.
    G = min(max_groups, distinct categories + 1). Returns (group per item, names, G)."""
    known = names != UNKNOWN_CATEGORY
    distinct = len(set(names[known].tolist()))
    num_groups = min(max_groups, distinct + 1)
    fair = np.full(len(names), num_groups, dtype=np.int16)
    ranked: list[str] = []
    if known.any():
        fair[known], ranked = category_groups(names[known], popularity[known], top=num_groups - 1)
    return fair, ranked, num_groups


def _check_user_ranges(pieces: list[dict[str, Any]]) -> None:
    ranges = sorted({(p["first_user"], p["last_user"]) for p in pieces})
    for (a0, a1), (b0, b1) in itertools.pairwise(ranges):
        if b0 <= a1:  # Ray split a user range across blocks: leave-one-out would be wrong
            raise RuntimeError(f"internal: user ranges {a0}..{a1} and {b0}..{b1} overlap")


def _items_table(meta: pa.Table, vocab: pa.Array, categories: np.ndarray, popularity: np.ndarray) -> pa.Table:
    titles = pc.cast(vocab, pa.string())
    genres = pa.array([[c] if c != UNKNOWN_CATEGORY else [] for c in categories.tolist()], type=pa.list_(pa.string()))
    extra = {c: meta[c] for c in meta.schema.names if c.startswith("item_") and c != "item_id"}
    return pa.table(
        {
            "item_id": meta["item_id"],
            "title": titles,
            "price": meta["price"],
            "fair_group": meta["fair_group"],
            "align_group": meta["align_group"],
            "rev_group": meta["rev_group"],
            "popularity": popularity,
            "genres": genres,
            "genre_ids": pa.array([[] for _ in range(meta.num_rows)], type=pa.list_(pa.int16())),
            **extra,
        }
    )


def _users_table(meta: pa.Table) -> pa.Table:
    n = meta.num_rows
    zeros = np.zeros(n, dtype=np.int16)
    # gender / age / occupation are MovieLens' raw codes: 0 for user data (see docs/data.md)
    return pa.table(
        {
            "user_id": meta["user_id"],
            "gender": np.zeros(n, dtype=np.int8),
            "age": zeros,
            "occupation": zeros,
            **{c: meta[c] for c in meta.schema.names if c != "user_id"},
        }
    )


def _mapping_record(m: ParquetMapping) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(m, f.name), tuple) else v) for f in fields(m)}
