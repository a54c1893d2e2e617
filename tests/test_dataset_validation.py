"""Each kind of broken prepared dataset fails to open with a message naming file, column and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from morec_dist.cli import main
from morec_dist.data.dataset import DatasetError, PreparedDataset
from morec_dist.data.schema import sha256_file

TRAIN = "train/part-00000.parquet"


@pytest.fixture
def copy(small_synthetic, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(small_synthetic, dst)
    return dst


def rewrite(root: Path, rel: str, table: pa.Table) -> None:
    """Replace a file and keep the manifest consistent, so only the content is wrong."""
    pq.write_table(table, root / rel)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel] = {
        "sha256": sha256_file(root / rel),
        "bytes": (root / rel).stat().st_size,
        "rows": table.num_rows,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def assert_fails(root: Path, *fragments: str) -> None:
    with pytest.raises(DatasetError) as info:
        PreparedDataset.open(root)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_the_good_copy_opens(copy):
    assert PreparedDataset.open(copy).num_items == 300


def test_missing_column(copy):
    rewrite(copy, TRAIN, pq.read_table(copy / TRAIN).drop_columns(["fair_group"]))
    assert_fails(copy, TRAIN, "'fair_group'", "missing")


def test_mistyped_column(copy):
    t = pq.read_table(copy / TRAIN)
    rewrite(copy, TRAIN, replace_column(t, "item_id", pa.compute.cast(t["item_id"], pa.int64())))
    assert_fails(copy, TRAIN, "'item_id'", "int64", "expected int32")


def test_item_ids_out_of_range(copy):
    t = pq.read_table(copy / TRAIN)
    ids = t["item_id"].to_numpy().copy()
    ids[5] = 301
    rewrite(copy, TRAIN, replace_column(t, "item_id", pa.array(ids)))
    assert_fails(copy, TRAIN, "'item_id'", "[1, 300]")


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_price(copy, bad):
    t = pq.read_table(copy / "items.parquet")
    price = t["price"].to_numpy().copy()
    price[3] = bad
    rewrite(copy, "items.parquet", replace_column(t, "price", pa.array(price)))
    assert_fails(copy, "items.parquet", "'price'", "NaN" if bad != bad else "expected finite and >= 0")


def test_empty_split(copy):
    rel = "valid/part-00000.parquet"
    rewrite(copy, rel, pq.read_table(copy / rel).slice(0, 0))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["valid"]["rows"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(copy, "valid", "empty")


def test_checksum_mismatch(copy):
    data = bytearray((copy / TRAIN).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / TRAIN).write_bytes(bytes(data))
    assert_fails(copy, TRAIN, "sha256")


def test_truncated_file(copy):
    data = (copy / TRAIN).read_bytes()
    (copy / TRAIN).write_bytes(data[: len(data) // 2])
    assert_fails(copy, TRAIN, "truncated")


def test_truncated_file_with_manifest_rewritten_is_still_caught(copy):
    data = (copy / TRAIN).read_bytes()
    (copy / TRAIN).write_bytes(data[: len(data) // 2])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][TRAIN].update(bytes=len(data) // 2, sha256=sha256_file(copy / TRAIN))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(copy, TRAIN, "not a readable Parquet file")


def test_missing_manifest_and_cli_exit_code(copy, capsys):
    (copy / "manifest.json").unlink()
    assert_fails(copy, "manifest.json", "missing")
    assert main(["inspect", str(copy)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_prepare_refuses_to_overwrite_without_flag(copy, capsys):
    before = sorted(p.name for p in copy.iterdir())
    rc = main(["prepare", "synthetic", "--users", "10", "--items", "20", "--rows", "100", "--out", str(copy)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in copy.iterdir()) == before
    assert PreparedDataset.open(copy).num_items == 300
