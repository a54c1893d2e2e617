"""A synthetic dataset generator with the prepared schema, at any size, in bounded memory.

Skew mimics real interaction logs: Zipf-like item popularity, log-normal user activity,
categories whose sizes are Zipf-distributed, and log-normal (long-tailed) prices. Rows are
generated in time order in fixed-size chunks, each from its own seeded generator, so the
generator can make three streaming passes over the same rows without storing them:
1. per-user last and second-to-last row (the leave-one-out split),
2. train popularity per item (which the popularity bands and fairness groups need),
3. the rows themselves, with the item's groups joined in, written part by part.
Memory is O(users + items + chunk), whatever the number of rows. Same seed, same bytes.

``planted_clusters = C`` (``PlantedStructure``) plants a structure a recommender can learn and
MoRec can move: every user and item belongs to one of C taste clusters, a user's row is drawn
from their cluster's items with probability ``in_cluster`` (else from the whole catalogue),
always Zipf by popularity. Clusters are interleaved over the popularity order and prices are
independent of popularity, so every cluster spans every popularity band and price band: an
accuracy-trained model recommends each cluster's head (high Pop-KL against the train
popularity distribution, low price), while the cluster's tail and its expensive items are
near enough in score that the alignment and revenue objectives can raise them at a small cost
in Hit. ``planted_structure(users, items, seed, clusters)`` gives the clusters to tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa

from morec_dist.data import schema
from morec_dist.data.prepare.writer import (
    DatasetWriter,
    category_groups,
    join_features,
    popularity_bands,
    price_bands,
    reference_groups,
    reference_user_features,
)
from morec_dist.data.storage import Location, StoragePath

CHUNK_ROWS = 1 << 20
NUM_GENRES = 18
NUM_FAIR_GROUPS = 10
AGES = np.array([1, 18, 25, 35, 45, 50, 56], dtype=np.int16)


@dataclass(frozen=True)
class PlantedStructure:
    """Taste clusters: which cluster each user and item is in, and the per-cluster item CDFs."""

    user_cluster: np.ndarray  # by user_id - 1
    item_cluster: np.ndarray  # by item_id - 1
    cluster_items: np.ndarray  # item_id - 1, grouped by cluster (cluster 0 first)
    cluster_cdf: np.ndarray  # per-cluster CDF of cluster_items' weights, plus the cluster index
    in_cluster: float


@dataclass(frozen=True)
class Catalogue:
    item_cdf: np.ndarray  # cumulative popularity weights, by item_id - 1
    user_cdf: np.ndarray  # cumulative activity weights, by user_id - 1
    price: np.ndarray
    genre_lists: list[list[int]]
    planted: PlantedStructure | None = None


def planted_structure(users: int, items: int, seed: int, clusters: int, in_cluster: float = 0.85) -> PlantedStructure:
    """Seeded clusters over the catalogue of ``make_catalogue(users, items, seed)``."""
    if clusters < 1 or clusters > items or not 0.0 <= in_cluster <= 1.0:
        raise ValueError(
            f"synthetic: planted_clusters must be 1..items and in_cluster in [0, 1] (got {clusters}, {in_cluster})"
        )
    weight = _item_weights(items, seed)
    rng = np.random.default_rng([seed, 4])
    by_popularity = np.argsort(-weight, kind="stable")
    item_cluster = np.empty(items, dtype=np.int64)
    item_cluster[by_popularity] = np.arange(items) % clusters  # every cluster gets head and tail
    user_cluster = rng.permutation(users) % clusters  # clusters of equal user counts
    cluster_items = np.argsort(item_cluster, kind="stable")
    cdf = np.empty(items)
    for c in range(clusters):
        members = cluster_items[item_cluster[cluster_items] == c]
        positions = np.flatnonzero(item_cluster[cluster_items] == c)
        cdf[positions] = c + np.cumsum(weight[members]) / weight[members].sum()
    return PlantedStructure(user_cluster, item_cluster, cluster_items, cdf, in_cluster)


def _item_weights(items: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    item_weight = np.empty(items)
    item_weight[rng.permutation(items)] = 1.0 / np.arange(1, items + 1) ** 1.0
    return item_weight


def make_catalogue(users: int, items: int, seed: int, planted: PlantedStructure | None = None) -> Catalogue:
    rng = np.random.default_rng([seed, 0])
    item_weight = np.empty(items)
    item_weight[rng.permutation(items)] = 1.0 / np.arange(1, items + 1) ** 1.0  # = _item_weights
    user_weight = rng.lognormal(0.0, 1.0, users)
    price = np.round(np.clip(14.0 * np.exp(0.9 * rng.standard_normal(items)), 0.99, 999.99), 2)
    genre_weight = 1.0 / np.arange(1, NUM_GENRES + 1) ** 1.2
    first = rng.choice(NUM_GENRES, size=items, p=genre_weight / genre_weight.sum())
    extra_count = rng.integers(0, 3, size=items)
    genre_lists = []
    for g, n in zip(first.tolist(), extra_count.tolist(), strict=True):
        extra = rng.choice(NUM_GENRES, size=n, replace=False).tolist()
        genre_lists.append([g] + [e for e in extra if e != g])
    return Catalogue(
        np.cumsum(item_weight) / item_weight.sum(),
        np.cumsum(user_weight) / user_weight.sum(),
        price,
        genre_lists,
        planted,
    )


def chunks(rows: int, seed: int, cat: Catalogue) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (first_row_index, user_ids, item_ids) per chunk; identical on every pass."""
    for c, start in enumerate(range(0, rows, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, rows - start)
        rng = np.random.default_rng([seed, 1, c])
        users = _inverse_cdf(cat.user_cdf, rng.random(n)) + 1
        items = _inverse_cdf(cat.item_cdf, rng.random(n)) + 1
        if cat.planted is not None:
            items = _planted_items(cat.planted, users, items, np.random.default_rng([seed, 5, c]))
        yield start, users.astype(np.int32), items.astype(np.int32)


def _inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """searchsorted(cdf, u, "right") capped at the last index, for sorted needles: random
    needles into a CDF of millions of users miss the cache at every level of the search
    (8+ min a pass at 200M rows); sorted ones walk it in order. Same values."""
    order = np.argsort(u, kind="stable")
    out = np.empty(len(u), dtype=np.int64)
    out[order] = np.searchsorted(cdf, u[order], side="right")
    return out.clip(max=len(cdf) - 1)


def _planted_items(planted: PlantedStructure, users: np.ndarray, items: np.ndarray, rng) -> np.ndarray:
    """Rows replaced, with probability in_cluster, by a Zipf draw from the user's cluster."""
    cluster = planted.user_cluster[users - 1]
    position = np.searchsorted(planted.cluster_cdf, cluster + rng.random(len(users)), side="right")
    own = planted.cluster_items[position.clip(max=len(planted.cluster_items) - 1)] + 1
    return np.where(rng.random(len(users)) < planted.in_cluster, own, items)


def last_two_rows(rows: int, users: int, seed: int, cat: Catalogue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: number of rows, index of the last row and of the one before it (-1 if none)."""
    count = np.zeros(users + 1, dtype=np.int64)
    last = np.full(users + 1, -1, dtype=np.int64)
    second = np.full(users + 1, -1, dtype=np.int64)
    for start, u, _ in chunks(rows, seed, cat):
        index = start + np.arange(len(u))
        order = np.lexsort((index, u))
        su, si = u[order], index[order]
        is_last = np.r_[su[1:] != su[:-1], True]
        is_second = np.r_[is_last[1:] & (su[1:] == su[:-1]), False]
        users_here = su[is_last]
        in_chunk = np.bincount(su, minlength=users + 1)
        # a user with one row in this chunk: the previous last becomes the second-to-last
        single = users_here[in_chunk[users_here] == 1]
        second[single] = last[single]
        second[su[is_second]] = si[is_second]
        last[users_here] = si[is_last]
        count += in_chunk
    return count, last, second


def split_codes(start: int, u: np.ndarray, count: np.ndarray, last: np.ndarray, second: np.ndarray) -> np.ndarray:
    index = start + np.arange(len(u))
    eligible = count[u] >= 3
    code = np.zeros(len(u), dtype=np.int8)
    code[eligible & (index == second[u])] = 1
    code[eligible & (index == last[u])] = 2
    return code


@overload
def generate(
    out_dir: Path,
    *,
    users: int,
    items: int,
    rows: int,
    seed: int,
    overwrite: bool = False,
    progress: bool = False,
    planted_clusters: int = 0,
    in_cluster: float = 0.85,
) -> Path: ...


@overload
def generate(
    out_dir: str | Location,
    *,
    users: int,
    items: int,
    rows: int,
    seed: int,
    overwrite: bool = False,
    progress: bool = False,
    planted_clusters: int = 0,
    in_cluster: float = 0.85,
) -> StoragePath: ...


def generate(
    out_dir: str | Path | Location,
    *,
    users: int,
    items: int,
    rows: int,
    seed: int,
    overwrite: bool = False,
    progress: bool = False,
    planted_clusters: int = 0,
    in_cluster: float = 0.85,
) -> StoragePath:
    """Write the dataset to ``out_dir``; ``planted_clusters > 0`` plants taste clusters (module doc)."""
    if users < 1 or items < schema.NUM_BANDS or rows < 1:
        raise ValueError(
            f"synthetic: need users >= 1, items >= {schema.NUM_BANDS}, rows >= 1 (got {users}, {items}, {rows})"
        )
    started = time.monotonic()

    def say(msg: str) -> None:
        if progress:
            print(f"[synthetic {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    planted = planted_structure(users, items, seed, planted_clusters, in_cluster) if planted_clusters else None
    cat = make_catalogue(users, items, seed, planted)
    say(f"pass 1/3: leave-one-out positions of {rows:,} rows")
    count, last, second = last_two_rows(rows, users, seed, cat)
    say("pass 2/3: train popularity")
    popularity = np.zeros(items + 1, dtype=np.int64)
    for start, u, i in chunks(rows, seed, cat):
        code = split_codes(start, u, count, last, second)
        popularity += np.bincount(i[code == 0], minlength=items + 1)
    popularity = popularity[1:]

    first_genre = np.array([f"genre_{g[0]:02d}" for g in cat.genre_lists], dtype=object)
    fair, fair_names = category_groups(first_genre, popularity)
    align = popularity_bands(popularity)[1:]
    rev = price_bands(cat.price)[1:]
    rng = np.random.default_rng([seed, 2])
    items_table = pa.table(
        {
            "item_id": np.arange(1, items + 1, dtype=np.int32),
            "title": pa.array([f"item {i}" for i in range(1, items + 1)]),
            "price": cat.price,
            "fair_group": fair,
            "align_group": align,
            "rev_group": rev,
            "popularity": popularity,
            "genres": pa.array([[f"genre_{g:02d}" for g in gs] for gs in cat.genre_lists], type=pa.list_(pa.string())),
            "genre_ids": pa.array(cat.genre_lists, type=pa.list_(pa.int16())),
            "item_genres": pa.array([[g + 1 for g in gs] for gs in cat.genre_lists], type=pa.list_(pa.int32())),
        }
    )
    gender = rng.integers(0, 2, users).astype(np.int8)
    age = AGES[rng.integers(0, len(AGES), users)]
    occupation = rng.integers(0, 21, users).astype(np.int16)
    users_table = pa.table(
        {
            "user_id": np.arange(1, users + 1, dtype=np.int32),
            "gender": gender,
            "age": age,
            "occupation": occupation,
            **reference_user_features(gender, age, occupation),
        }
    )
    features = schema.reference_features(NUM_GENRES)
    groups = reference_groups(fair, align, rev, popularity, NUM_FAIR_GROUPS, fair_names)
    total_train = max(int(popularity.sum()), 1)
    manifest = {
        "name": "synthetic",
        "source": {
            "generator": "morec_dist.data.prepare.synthetic",
            "users": users,
            "items": items,
            "rows": rows,
            **({"planted_clusters": planted_clusters, "in_cluster": in_cluster} if planted else {}),
        },
        "seed": seed,
        "price_note": "synthetic: 14 * exp(0.9 * z), clipped to [0.99, 999.99]",
        "num_users": users,
        "num_items": items,
        "num_positives": rows,
        "groups": groups,
        "q_star": [c / total_train for c in groups["align_group"]["train_counts"]],
        "genres": [f"genre_{g:02d}" for g in range(NUM_GENRES)],
    }
    say("pass 3/3: writing rows")
    names = {0: "train", 1: "valid", 2: "test"}
    with DatasetWriter(out_dir, overwrite=overwrite, features=features) as writer:
        for start, u, i in chunks(rows, seed, cat):
            code = split_codes(start, u, count, last, second)
            row_rng = np.random.default_rng([seed, 3, start])
            pos = i - 1
            table = pa.table(
                {
                    "user_id": u,
                    "item_id": i,
                    "timestamp": 1_600_000_000 + start + np.arange(len(u), dtype=np.int64),
                    "rating": row_rng.integers(4, 6, len(u)).astype(np.float32),
                    "price": cat.price[pos],
                    "fair_group": fair[pos],
                    "align_group": align[pos],
                    "rev_group": rev[pos],
                }
            )
            table = join_features(table, users_table, items_table, features)
            for c, name in names.items():
                writer.write_interactions(name, table.filter(pa.array(code == c)))
            if progress and start and start % (8 * CHUNK_ROWS) == 0:
                say(f"  {start:,} / {rows:,} rows")
        writer.write_side_table(schema.ITEMS_FILE, items_table, schema.ITEMS)
        writer.write_side_table(schema.USERS_FILE, users_table, schema.USERS)
        path = writer.commit(manifest, progress=progress)
    say(f"done: {path}")
    return path
