"""`morec prepare parquet`: hand-written Parquet with string ids, a list column and a time
split, local and through s3:// on a real S3-compatible server (moto) on loopback; bad
input exits 2 with one line and leaves nothing; the by_group partitions hold exactly each
group's train rows in the hash order. One real local Ray for the whole module."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from morec_dist.cli import main
from morec_dist.data import schema
from morec_dist.data.dataset import PreparedDataset

# moto accepts any credentials; set for this module only (never the real ones of the machine)
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

NUM_USERS, NUM_ITEMS, ROWS = 40, 25, 600
VALID_FROM, TEST_FROM = 4000, 5000
CATEGORIES = ["shoes", "hats", "bags", None]


@pytest.fixture(scope="module", autouse=True)
def ray_once():
    """One Ray for the module, started with the fake AWS_* set so its workers inherit them;
    both undone when the module ends (the per-test environment fixture restores os.environ
    to this module-level state after each test)."""
    from morec_dist.data.prepare.ray_env import ray_runtime

    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS.items():
            patch.setenv(key, value)
        with ray_runtime(num_cpus=2, object_store_mb=300):
            yield


def raw_tables(seed: int = 0) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    interactions = pa.table(
        {
            "uid": [f"user-{u:03d}" for u in rng.integers(0, NUM_USERS, ROWS)],
            "sku": [f"sku-{i:02d}" for i in rng.integers(0, NUM_ITEMS, ROWS)],
            "ts": np.arange(ROWS, dtype=np.int64) * 10,
            "clicked": rng.random(ROWS) < 0.8,
            "ignored": np.zeros(ROWS),
        }
    )
    items = pa.table(
        {
            "sku": [f"sku-{i:02d}" for i in range(NUM_ITEMS)],
            "cost": np.round(rng.uniform(1, 100, NUM_ITEMS), 2),
            "cat": ["shoes"] + [CATEGORIES[i % 4] for i in range(1, NUM_ITEMS)],
            "tags": [[f"t{j}" for j in range(i % 3)] for i in range(NUM_ITEMS)],  # a list column
        }
    )
    users = pa.table(
        {
            "uid": [f"user-{u:03d}" for u in range(NUM_USERS)],
            "country": [["de", "fr", None][u % 3] for u in range(NUM_USERS)],
        }
    )
    return {"interactions": interactions, "items": items, "users": users}


def write_inputs(root: Path, tables: dict[str, pa.Table]) -> None:
    (root / "inter").mkdir(parents=True, exist_ok=True)
    inter = tables["interactions"]
    pq.write_table(inter.slice(0, 300), root / "inter" / "a.parquet")
    pq.write_table(inter.slice(300), root / "inter" / "b.parquet")
    pq.write_table(tables["items"], root / "items.parquet")
    pq.write_table(tables["users"], root / "users.parquet")


def mapping_text(base: str, rule: str = "time", query: str = "") -> str:
    split = f'rule = "{rule}"\n' + (f"valid_from = {VALID_FROM}\ntest_from = {TEST_FROM}\n" if rule == "time" else "")
    return f"""
[input]
interactions = "{base}/inter{query}"
items = "{base}/items.parquet{query}"
users = "{base}/users.parquet{query}"
[columns]
user = "uid"
item = "sku"
timestamp = "ts"
label = "clicked"
price = "cost"
category = "cat"
[features]
user = ["country"]
item = ["tags", "cat"]
[split]
{split}
[output]
seed = 11
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    write_inputs(root, raw_tables())
    (root / "mapping.toml").write_text(mapping_text(str(root)))
    return root


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "ds"
    assert main(["prepare", "parquet", "--mapping", str(inputs / "mapping.toml"), "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------- the expected result
def expected(tables: dict[str, pa.Table], rule: str) -> dict:
    """The rules of docs/data.md, recomputed in plain Python from the raw tables."""
    inter = tables["interactions"].to_pylist()
    positives = [r for r in inter if r["clicked"]]
    users = sorted({r["uid"] for r in positives})
    items = sorted(tables["items"]["sku"].to_pylist())
    uid = {u: k + 1 for k, u in enumerate(users)}
    iid = {i: k + 1 for k, i in enumerate(items)}
    rows = [(uid[r["uid"]], iid[r["sku"]], r["ts"]) for r in positives]
    split = {}
    per_user: dict[int, list] = {}
    for row in rows:
        per_user.setdefault(row[0], []).append(row)
    for user_rows in per_user.values():
        user_rows.sort(key=lambda r: (r[2], r[1]))
        if rule == "time":  # train before the cut; the first positive of each window held out
            seen = set()
            for row in user_rows:
                window = "test" if row[2] >= TEST_FROM else "valid" if row[2] >= VALID_FROM else "train"
                split[row] = window if window == "train" or window not in seen else "dropped"
                seen.add(window)
        else:
            for k, row in enumerate(user_rows):
                n = len(user_rows)
                split[row] = "test" if n >= 3 and k == n - 1 else "valid" if n >= 3 and k == n - 2 else "train"
    return {"users": users, "items": items, "split": split}


def interaction_rows(ds: PreparedDataset, split: str) -> list[tuple]:
    t = ds.read_split(split, ["user_id", "item_id", "timestamp"])
    return list(zip(*(t[c].to_pylist() for c in ("user_id", "item_id", "timestamp")), strict=True))


def check_against_raw(ds: PreparedDataset, tables: dict[str, pa.Table], rule: str) -> None:
    want = expected(tables, rule)
    assert ds.num_users == len(want["users"]) and ds.num_items == NUM_ITEMS
    for split in schema.SPLITS:
        assert Counter(interaction_rows(ds, split)) == Counter(r for r, s in want["split"].items() if s == split), split
    id_users = pq.read_table(ds.path / schema.ID_MAP_USERS)
    assert id_users["raw_id"].to_pylist() == want["users"] and id_users["user_id"].to_pylist() == list(
        range(1, ds.num_users + 1)
    )
    id_items = pq.read_table(ds.path / schema.ID_MAP_ITEMS)
    assert id_items["raw_id"].to_pylist() == want["items"]


def check_group_layout(ds: PreparedDataset) -> None:
    """Each partition = exactly the train rows of its group (multiset), in layout_hash order
    of the train row index; every gid 1..G listed."""
    train = ds.read_split("train")
    row_index = np.arange(train.num_rows)
    hashes = schema.layout_hash(row_index, ds.layout_seed)
    columns = schema.interaction_schema(ds.features).names
    for column in ds.group_columns():
        g = ds.num_groups(column)
        assert sorted(int(k) for k in ds.group_layout["columns"][column]["groups"]) == list(range(1, g + 1))
        values = train[column].to_numpy()
        for gid in range(1, g + 1):
            files = ds.group_files(column, gid)
            got = (
                pa.concat_tables([pq.read_table(p) for p, _ in files]).select(columns)
                if files
                else train.slice(0, 0).select(columns)
            )
            mine = np.flatnonzero(values == gid)
            want = train.take(pa.array(mine[np.argsort(hashes[mine])])).select(columns)
            assert got.num_rows == ds.group_rows(column, gid) == len(mine)
            assert got.equals(want), (column, gid)  # the same rows, in the hash order
            for path, _ in files:
                meta = pq.ParquetFile(path).metadata
                assert all(meta.row_group(i).num_rows <= schema.ROW_GROUP_ROWS for i in range(meta.num_row_groups))


# ------------------------------------------------------------------------------ tests
def test_string_ids_list_column_time_split(prepared):
    ds = PreparedDataset.open(prepared)
    tables = raw_tables()
    check_against_raw(ds, tables, "time")
    check_group_layout(ds)
    # one held-out row per user and split; the later positives past the cut are dropped
    dropped = sum(1 for s in expected(tables, "time")["split"].values() if s == "dropped")
    assert ds.manifest["split"]["dropped_after_cut"] == dropped > 0
    for split in ("valid", "test"):
        users = ds.read_split(split, ["user_id"])["user_id"].to_pylist()
        assert len(users) == len(set(users))
    # features: user country (single, null -> 0), item tags (multi, a list column), item cat
    feats = ds.features
    assert (feats["user_country"].kind, feats["user_country"].cardinality) == ("single", 2)
    assert (feats["item_tags"].kind, feats["item_tags"].cardinality) == ("multi", 2)
    items = ds.items.to_pydict()
    raw_items = {r["sku"]: r for r in tables["items"].to_pylist()}
    for item_id, title, tags, price in zip(
        items["item_id"], items["title"], items["item_tags"], items["price"], strict=True
    ):
        assert title == f"sku-{item_id - 1:02d}"
        assert tags == [int(t[1:]) + 1 for t in raw_items[title]["tags"]]
        assert price == raw_items[title]["cost"]
    users = ds.users.to_pydict()
    raw_country = {r["uid"]: r["country"] for r in tables["users"].to_pylist()}
    id_users = pq.read_table(ds.path / schema.ID_MAP_USERS)["raw_id"].to_pylist()
    for user_id, country in zip(users["user_id"], users["user_country"], strict=True):
        assert country == {"de": 1, "fr": 2, None: 0}[raw_country[id_users[user_id - 1]]]
    # the rows carry the features of their user and item
    train = ds.read_split("train")
    tags_of = dict(zip(items["item_id"], items["item_tags"], strict=True))
    assert all(
        tags_of[i] == t for i, t in zip(train["item_id"].to_pylist(), train["item_tags"].to_pylist(), strict=True)
    )
    # the objectives' groups: categories (null -> "other"), popularity and price bands
    fair = dict(zip(items["item_id"], items["fair_group"], strict=True))
    names = ds.manifest["groups"]["fair_group"]["names"]
    assert ds.num_groups("fair_group") == 4 and names[-1] == "other"
    for item_id, title in zip(items["item_id"], items["title"], strict=True):
        cat = raw_items[title]["cat"]
        assert fair[item_id] == (names.index(cat) + 1 if cat is not None else 4)
    assert sum(ds.q_star) == pytest.approx(1.0)


@pytest.mark.slow
def test_leave_one_out_through_s3(inputs, tmp_path):
    """The same inputs, uploaded to a real S3-compatible server on loopback and read by the
    Ray workers through pyarrow's S3 filesystem, split leave-one-out per user."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="logs")
        for path in sorted(inputs.rglob("*.parquet")):
            s3.upload_file(str(path), "logs", f"raw/{path.relative_to(inputs)}")
        query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        (tmp_path / "s3.toml").write_text(mapping_text("s3://logs/raw", rule="leave_one_out", query=query))
        out = tmp_path / "from-s3"
        assert main(["prepare", "parquet", "--mapping", str(tmp_path / "s3.toml"), "--out", str(out)]) == 0
    finally:
        server.stop()
    ds = PreparedDataset.open(out)
    check_against_raw(ds, raw_tables(), "leave_one_out")
    check_group_layout(ds)
    assert ds.manifest["source"]["mapping"]["interactions"] == [f"s3://logs/raw/inter{query}"]


@pytest.mark.slow
def test_ray_layout_engine_writes_the_same_bytes(prepared, tmp_path, monkeypatch):
    """The by_group writer on Ray Data (spill per range, then sort each range) and in-process
    agree byte for byte, so the engine `auto` picks by size never changes a dataset. The
    train parts are rewritten with small row groups and each spill task reads one, so a range
    gathers several tasks' spill files; none is left behind."""
    import filecmp
    import json

    from morec_dist.data.prepare import layout as layout_module
    from morec_dist.data.prepare.layout import LayoutJob, layout_files, write_group_layout

    monkeypatch.setattr(layout_module, "SPILL_TASK_ROWS", 1)
    manifest = json.loads((prepared / schema.MANIFEST).read_text())
    root = tmp_path / "copy"
    row_groups = 0
    for rel in manifest["splits"]["train"]["files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(prepared / rel)
        pq.write_table(table, root / rel, row_group_size=max(1, table.num_rows // 5))
        row_groups += pq.ParquetFile(root / rel).num_row_groups
    assert row_groups >= 5
    columns = {c: g["num_groups"] for c, g in manifest["groups"].items()}
    layout = write_group_layout(
        LayoutJob(root, manifest["splits"]["train"]["files"], columns, manifest["group_layout"]["seed"], "ray")
    )
    assert layout == manifest["group_layout"]
    for rel in layout_files(layout):
        assert filecmp.cmp(prepared / rel, root / rel, shallow=False), rel
    assert not (root / layout_module.SPILL_ROOT).exists()


def test_float_epoch_seconds_are_floored(tmp_path):
    """A timestamp stored as float epoch seconds is accepted and floored to whole seconds: the
    same dataset as from the integer seconds (the fraction never reorders or moves a row)."""
    tables = raw_tables()
    inter = tables["interactions"]
    fraction = np.random.default_rng(1).uniform(0, 0.999, inter.num_rows)
    float_ts = _mutate(inter, "ts", pa.array(inter["ts"].to_numpy() + fraction))
    write_inputs(tmp_path, {**tables, "interactions": float_ts})
    (tmp_path / "mapping.toml").write_text(mapping_text(str(tmp_path)))
    out = tmp_path / "out"
    assert main(["prepare", "parquet", "--mapping", str(tmp_path / "mapping.toml"), "--out", str(out)]) == 0
    ds = PreparedDataset.open(out)
    assert ds.read_split("train").schema.field("timestamp").type == pa.int64()
    check_against_raw(ds, tables, "time")


def test_cheap_refusals(inputs, prepared, tmp_path, capsys):
    """Refused before any work: an existing output, a bad override, a mapping typo."""
    mapping = str(inputs / "mapping.toml")
    assert main(["prepare", "parquet", "--mapping", mapping, "--out", str(prepared)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["prepare", "parquet", "--mapping", mapping, "split.valid_from=soon", "--out", str(tmp_path / "o")]) == 2
    )
    assert "valid_from" in capsys.readouterr().err
    (tmp_path / "typo.toml").write_text(mapping_text(str(inputs)).replace("timestamp =", "timestmp ="))
    assert main(["prepare", "parquet", "--mapping", str(tmp_path / "typo.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "timestmp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- bad input
def _mutate(table: pa.Table, column: str, values: list | pa.Array) -> pa.Table:
    return table.set_column(
        table.schema.get_field_index(column), column, pa.array(values) if isinstance(values, list) else values
    )


def _bad_cases():
    t = raw_tables()
    inter, items = t["interactions"], t["items"]
    null_uid = inter["uid"].to_pylist()
    null_uid[310] = None
    cost = items["cost"].to_pylist()
    return {
        "missing column": ({"interactions": inter.drop_columns(["ts"])}, "inter/a.parquet", "'ts'", "missing"),
        "wrong type": (
            {"interactions": _mutate(inter, "ts", [str(x) for x in inter["ts"].to_pylist()])},
            "inter/a.parquet",
            "'ts'",
            "expected",
        ),
        "null ids": ({"interactions": _mutate(inter, "uid", null_uid)}, "inter/b.parquet", "'uid'", "null"),
        "price zero": ({"items": _mutate(items, "cost", [0.0] + cost[1:])}, "items.parquet", "'cost'", "> 0"),
        "price nan": (
            {"items": _mutate(items, "cost", cost[:3] + [float("nan")] + cost[4:])},
            "items.parquet",
            "'cost'",
            "NaN",
        ),
        "nan timestamp": (
            {"interactions": _mutate(inter, "ts", [float("nan")] + [float(x) for x in inter["ts"].to_pylist()[1:]])},
            "inter/a.parquet",
            "'ts'",
            "NaN",
        ),
        # also mapped as an item feature (as in the module's mapping), where a list is allowed
        "multi-label category": (
            {"items": _mutate(items, "cat", [[c, "sale"] if c else [] for c in items["cat"].to_pylist()])},
            "items.parquet",
            "'cat'",
            "multi-label",
        ),
        "all-null category": (
            {"items": _mutate(items, "cat", pa.nulls(NUM_ITEMS, pa.string()))},
            "items.parquet",
            "'cat'",
            "entirely null",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    changes, file_fragment, column_fragment, problem = _bad_cases()[case]
    tables = {**raw_tables(), **changes}
    write_inputs(tmp_path, tables)
    (tmp_path / "mapping.toml").write_text(mapping_text(str(tmp_path)))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prepare", "parquet", "--mapping", str(tmp_path / "mapping.toml"), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[prepare parquet")]
    assert len(errors) == 1, errors
    for fragment in (file_fragment, column_fragment, problem):
        assert fragment in errors[0], errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left


def test_unknown_split_rule(inputs, tmp_path, capsys):
    (tmp_path / "m.toml").write_text(mapping_text(str(inputs)).replace('rule = "time"', 'rule = "random"'))
    assert main(["prepare", "parquet", "--mapping", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.toml" in err[0] and "rule" in err[0] and "'random'" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_movielens_through_prepare_parquet_equals_its_own_preparation(movielens_dir, tmp_path):
    """MovieLens-1M's raw ratings, catalogue and users as Parquet, prepared by `prepare
    parquet`, give the rows, item groups, q* and features of `prepare movielens-1m`: both
    entry points follow docs/data.md. Users are renumbered over those with a positive, so
    rows are compared on the raw user ids the id map gives back."""
    raw = tmp_path / "raw"
    assert main(["prepare", "movielens-1m", "--raw-parquet", "--out", str(raw)]) == 0
    out = tmp_path / "prepared"
    assert main(["prepare", "parquet", "--mapping", str(raw / "mapping.toml"), "--out", str(out)]) == 0
    ours, reference = PreparedDataset.open(out), PreparedDataset.open(movielens_dir)
    raw_user = np.asarray([0, *pq.read_table(out / schema.ID_MAP_USERS)["raw_id"].to_pylist()])
    columns = [c for c in reference.read_split("test").schema.names if c != "user_id"]
    for split in schema.SPLITS:
        got, want = ours.read_split(split), reference.read_split(split)
        np.testing.assert_array_equal(raw_user[got["user_id"].to_numpy()], want["user_id"].to_numpy())
        assert got.select(columns).equals(want.select(columns)), split
    item_columns = ["item_id", "title", "price", "fair_group", "align_group", "rev_group", "popularity"]
    assert ours.items.select(item_columns).equals(reference.items.select(item_columns))
    assert ours.items["item_genres"].equals(reference.items["item_genres"])
    assert ours.manifest["groups"] == reference.manifest["groups"]
    np.testing.assert_array_equal(ours.q_star, reference.q_star)
    assert {n: (f.kind, f.cardinality) for n, f in ours.features.items()} == {
        n: (f.kind, f.cardinality) for n, f in reference.features.items()
    }
