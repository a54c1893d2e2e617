"""A prepared dataset read from s3:// (an S3-compatible server on loopback, tests/s3_loopback.py)
gives the same bytes, the same checks and the same batches as from a local directory; the
weighted reader's exactness tests (group chi-square, each row once per pass) hold on it; a
dataset whose write never finished (no manifest) or whose file was truncated is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from morec_dist.data import schema, storage
from morec_dist.data.dataset import DatasetError, PreparedDataset
from morec_dist.data.reader import Reader
from tests import reader_data
from tests.s3_loopback import moto_s3
from tests.test_reader_weighted import ALPHA, COUNTS, _draw_groups, _fair_reader, _group_chi2, _p

pytestmark = pytest.mark.slow  # a moto server and a few thousand S3 requests


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    return reader_data.build(tmp_path_factory.mktemp("s3src") / "ds")


@pytest.fixture(scope="module")
def s3(local_dir):
    with moto_s3() as server:
        yield server, server.upload(local_dir, "ds")


def _batches(data, steps: int) -> list:
    objectives = [("fairness", "fair_group"), ("revenue", "rev_group")]
    with Reader(data, batch_size=64, num_negatives=2, seed=5, objectives=objectives, prefetch_batches=2) as reader:
        reader.set_probabilities(
            1, {"fairness": _p("tiny_heavy", COUNTS.astype(float)), "revenue": [0.7, 0.1, 0.1, 0.1]}
        )
        out = []
        for step, batch in enumerate(reader):
            out.append((batch.user_ids, batch.item_ids, batch.block_ids, batch.version))
            if step + 1 == steps:
                break
    return out


def test_same_bytes_checks_and_batches_as_local(local_dir, s3):
    server, uri = s3
    remote = PreparedDataset.open(uri)  # every check: sizes, footers, schemas, sha256, values
    local = PreparedDataset.open(local_dir)
    assert isinstance(remote.path, storage.Location) and str(remote.path) == "s3://data/ds"
    assert remote.manifest == local.manifest
    for rel in local.manifest["files"]:
        assert storage.read_bytes(remote.path / rel) == (local_dir / rel).read_bytes(), rel
    assert remote.read_split("valid").equals(local.read_split("valid"))
    assert np.array_equal(remote.item_column("price"), local.item_column("price"))
    # a rank opens the dataset from the URI string: uniform and weighted blocks, negatives
    got, want = _batches(uri, 40), _batches(local_dir, 40)
    for (u, i, b, v), (u2, i2, b2, v2) in zip(got, want, strict=True):
        assert torch.equal(u, u2) and torch.equal(i, i2) and torch.equal(b, b2) and v == v2


def test_group_chi2_and_once_per_pass_on_s3(s3, local_dir):
    """The weighted reader's exactness on an s3:// dataset, windows of one row group re-read
    from the store every pass (in_memory_rows=100)."""
    from collections import Counter

    _, uri = s3
    train = reader_data.train_pairs(local_dir)
    truth = reader_data.row_keys(train[:, 0], train[:, 1])
    p = _p("tiny_heavy", COUNTS.astype(float))
    with _fair_reader(uri, in_memory_rows=100) as reader:
        groups, keys = _draw_groups(reader, p, 100_000)
    assert _group_chi2(groups, p) > ALPHA
    for g in range(1, reader_data.TINY_GROUP + 1):
        members = truth[train[:, 2] == g]
        drawn = Counter(keys[groups == g].tolist())
        assert set(drawn) <= set(members.tolist())
        total = int((groups == g).sum())
        per_row = np.asarray([drawn.get(k, 0) for k in members.tolist()])
        assert per_row.min() == total // len(members) and per_row.max() == -(-total // len(members)), g


def test_unfinished_or_truncated_dataset_is_refused(local_dir, s3):
    server, _ = s3
    import pyarrow.fs as pafs

    uri = server.upload(local_dir, "broken")
    fs, root = pafs.FileSystem.from_uri(uri)
    part = f"{root}/train/{schema.part_name(0)}"
    data = (local_dir / "train" / schema.part_name(0)).read_bytes()
    with fs.open_output_stream(part) as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"s3://data/broken/train/part-00000\.parquet: size .*truncated"):
        PreparedDataset.open(uri)
    fs.delete_file(f"{root}/{schema.MANIFEST}")
    with pytest.raises(DatasetError, match=r"s3://data/broken/manifest\.json: missing.*never finished"):
        PreparedDataset.open(uri)


def _files(ds: PreparedDataset) -> dict[str, bytes]:
    return {rel: storage.read_bytes(ds.path / rel) for rel in ds.manifest["files"]}


def test_prepare_to_s3_is_the_local_bytes_and_commits_with_the_manifest(s3, tmp_path, monkeypatch, capsys):
    """`morec prepare synthetic --out s3://...` writes the same files as to a local directory;
    the manifest goes last, so a write that dies before it leaves no dataset, and the prefix
    is refused (not silently mixed) until --overwrite replaces it."""
    from morec_dist.cli import main

    server, _ = s3
    args = ["prepare", "synthetic", "--users", "200", "--items", "60", "--rows", "4000", "--seed", "3", "--out"]
    assert main([*args, str(tmp_path / "local")]) == 0
    uri = server.uri("syn")
    assert main([*args, uri]) == 0
    local, remote = PreparedDataset.open(tmp_path / "local"), PreparedDataset.open(uri)
    assert remote.manifest == local.manifest and _files(remote) == _files(local)
    capsys.readouterr()
    assert main([*args, uri]) == 2 and "already exists" in capsys.readouterr().err

    upload = storage.upload

    def dies_at_the_manifest(local_file: Path, target: storage.Location) -> None:
        if target.name == schema.MANIFEST:
            raise OSError("connection lost (injected at the commit point)")
        upload(local_file, target)

    monkeypatch.setattr(storage, "upload", dies_at_the_manifest)
    with pytest.raises(OSError, match="injected"):
        main([*args, server.uri("half"), "--overwrite"])
    monkeypatch.setattr(storage, "upload", upload)
    with pytest.raises(DatasetError, match="never finished"):
        PreparedDataset.open(server.uri("half"))
    assert main([*args, server.uri("half")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main([*args, server.uri("half"), "--overwrite"]) == 0
    assert _files(PreparedDataset.open(server.uri("half"))) == _files(local)
