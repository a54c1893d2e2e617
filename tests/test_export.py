"""``morec export`` and ``morec evaluate --ann`` on real ranks, real Parquet and real FAISS.

One tiny MF and one tiny two-tower model are checkpointed once for the module (at their
seeded initial weights, by the product's builder and ``save_checkpoint``, in this process)
for a synthetic dataset that carries id maps (``id_map/*.parquet`` with raw ids,
registered in its manifest as ``prepare parquet`` registers them; preparing through Ray Data
takes minutes here). Each is exported on 1 rank and on 2 ranks (``--part-rows`` small, so
parts spread over both ranks). Checked: the data files are byte-identical across world
sizes, the vectors are the model's (an unsharded copy loaded from the same checkpoint with
DCP, in this process), raw ids round-trip through the id map, the two-tower ``.pt2`` scores
in a process where only torch can be imported, evaluation through a flat index equals the
exact evaluation (the evaluator's, on the unsharded model), and bad input is
refused in one line with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from morec_dist.cli import main
from morec_dist.config import config_from_dict, load_config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.prepare.synthetic import generate
from morec_dist.data.schema import ID_MAP_ITEMS, ID_MAP_USERS, sha256_file
from morec_dist.distributed import DistContext
from morec_dist.eval.evaluator import evaluate
from morec_dist.model.init import META, materialize_unsharded
from morec_dist.model.registry import build_model
from morec_dist.train.checkpoint import dcp_load, read_meta, save_checkpoint
from morec_dist.train.run_dir import provenance
from morec_dist.train.trainer import build_features, unsharded_identity
from tests.e2e_fixtures import morec

pytestmark = pytest.mark.slow  # exports under torchrun

PART_ROWS = 32
CONFIG = """
[run]
seed = 5
[data]
path = "{data}"
[model]
name = "{model}"
embedding_dim = 8
tower_dims = [8, 4]
# one table per rank: a row-wise table's multi-hot pools are summed over ranks, in another
# order on 2 ranks than on 1 (the last bits differ); the same placement gives the same bytes
default_sharding = "table_wise"
[eval]
ks = [5, 10]
batch_users = 64
"""


def add_id_maps(root: Path) -> None:
    """Raw ids for every dense id, written and registered the way ``prepare parquet`` does
    (schema (raw_id, <id>), sha256 / bytes / rows in manifest.json's files)."""
    manifest = json.loads((root / "manifest.json").read_text())
    maps = {
        ID_MAP_ITEMS: ("item_id", manifest["num_items"], lambda i: pa.array([f"sku-{7 * x + 3:05d}" for x in i])),
        ID_MAP_USERS: ("user_id", manifest["num_users"], lambda i: pa.array(1000 + 3 * i, pa.int64())),
    }
    for rel, (column, count, raw) in maps.items():
        ids = np.arange(1, count + 1)
        (root / rel).parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"raw_id": raw(ids), column: pa.array(ids, pa.int32())}), root / rel)
        manifest["files"][rel] = {
            "sha256": sha256_file(root / rel),
            "bytes": (root / rel).stat().st_size,
            "rows": count,
        }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = generate(tmp_path_factory.mktemp("export") / "data", users=120, items=90, rows=3000, seed=5)
    add_id_maps(path)
    return path


def write_checkpoint(root: Path, data: Path, model_name: str) -> Path:
    """A real checkpoint of the model at its seeded initial weights, written in this process
    (the product's builder, init rule and save_checkpoint; DCP reshards it onto the export's
    ranks): training adds nothing the export reads, and torchrun launches are this module's cost."""
    (root / f"{model_name}.toml").write_text(CONFIG.format(data=data, model=model_name))
    config = load_config(root / f"{model_name}.toml")
    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    model = build_model(model_name, build_features(config, dataset), config.model, device=META)
    identity = unsharded_identity(model_name, model)
    model = materialize_unsharded(model, config.run.seed, config.model.init_std, torch.device("cpu"))
    meta = {"model": identity, "epoch": 0, "step": 0, **provenance(config, 1)}
    save_checkpoint(root / f"ckpt-{model_name}", {"model": model.state_dict()}, meta)
    return root / f"ckpt-{model_name}"


def export(checkpoint: Path, out: Path, nproc: int, *extra: str) -> dict:
    morec("export", "--checkpoint", str(checkpoint), "--out", str(out), "--nproc", str(nproc),
          "--part-rows", str(PART_ROWS), *extra)  # fmt: skip
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def exports(data, tmp_path_factory) -> dict[str, dict]:
    """Per model: its checkpoint, and its export on 1 rank and on 2 ranks (+ a flat index)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for model in ("mf", "two_tower"):
        checkpoint = write_checkpoint(root, data, model)
        one = export(checkpoint, root / f"{model}-1", 1)
        two = export(checkpoint, root / f"{model}-2", 2, "--index", "--index-kind", "flat")
        out[model] = {
            "checkpoint": checkpoint,
            "dirs": (root / f"{model}-1", root / f"{model}-2"),
            "manifests": (one, two),
        }
    return out


# ------------------------------------------------------------------ the model itself


def reference_model(checkpoint: Path, data: Path):
    """The checkpoint's model, unsharded in this process: built by rule, loaded with DCP."""
    config = config_from_dict(read_meta(checkpoint)["config"])
    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    features = build_features(config, dataset)
    model = build_model(config.model.name, features, config.model, device=META)
    model = materialize_unsharded(model, config.run.seed, config.model.init_std, torch.device("cpu"))
    dcp_load({"model": model.state_dict()}, checkpoint)  # loads into the weights in place
    return model.eval(), features


def read_vectors(directory: Path, id_column: str) -> tuple[np.ndarray, np.ndarray, list]:
    table = pq.read_table(sorted(directory.glob("part-*.parquet"))).sort_by(id_column)
    vectors = table["vector"].combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
    return table[id_column].to_numpy(), vectors, table["raw_id"].to_pylist()


def data_files(manifest: dict, *prefixes: str) -> dict[str, str]:
    return {rel: info["sha256"] for rel, info in manifest["files"].items() if rel.startswith(prefixes)}


def check_manifest(directory: Path, manifest: dict, model: str) -> None:
    assert manifest["model"]["name"] == model and manifest["seed"] == 5 and manifest["checkpoint"]["step"] == 0
    assert {"torch", "torchrec", "pyarrow", "faiss"} <= set(manifest["versions"])
    assert manifest["run_config"]["model"]["name"] == model
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for rel, info in manifest["files"].items():
        assert sha256_file(directory / rel) == info["sha256"], rel


def check_raw_ids(data: Path, ids: np.ndarray, raw: list, rel: str, id_column: str) -> None:
    """Raw id -> dense id through the dataset's id map gives back each row's dense id."""
    table = pq.read_table(data / rel)
    to_dense = dict(zip(table["raw_id"].to_pylist(), table[id_column].to_pylist(), strict=True))
    assert [to_dense[r] for r in raw] == ids.tolist()


def test_mf_export_same_files_on_1_and_2_ranks_vectors_are_the_models(exports, data):
    run = exports["mf"]
    (_, two), (m1, m2) = run["dirs"], run["manifests"]
    assert len(m2["items"]["parts"]) == 3 and len(m2["user_side"]["parts"]) == 4  # spread over both ranks
    assert data_files(m1, "items/", "users/") == data_files(m2, "items/", "users/")
    assert m1["export"]["world_size"] == 1 and m2["export"]["world_size"] == 2
    check_manifest(two, m2, "mf")
    model, features = reference_model(run["checkpoint"], data)
    ids, vectors, raw = read_vectors(two / "items", "item_id")
    assert ids.tolist() == list(range(1, 91))
    with torch.no_grad():
        expected = model.item_vectors(features.item_kjt(ids)).numpy()
        assert np.array_equal(vectors, expected)
        check_raw_ids(data, ids, raw, ID_MAP_ITEMS, "item_id")
        users, user_vectors, user_raw = read_vectors(two / "users", "user_id")
        assert users.tolist() == list(range(1, 121))
        assert np.array_equal(user_vectors, model.user_vectors(features.user_kjt(users)).numpy())
    check_raw_ids(data, users, user_raw, ID_MAP_USERS, "user_id")


# the serving side: torch alone (morec_dist, torchrec, fbgemm and pyarrow refused on import)
PLAIN_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("morec_dist", "torchrec", "fbgemm_gpu", "pyarrow", "tests"):
            raise ImportError("refused in this test: " + name)
sys.meta_path.insert(0, Refuse())
import torch
inputs = torch.load("inputs.pt", weights_only=True)
tower = torch.export.load("user_tower.pt2").module()
torch.save(tower(inputs), "vectors.pt")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("morec_dist", "torchrec", "pyarrow")))
"""


def test_two_tower_same_item_files_and_the_pt2_scores_in_plain_torch(exports, data, tmp_path):
    from morec_dist.export.user_side import tower_inputs

    run = exports["two_tower"]
    (_, two), (m1, m2) = run["dirs"], run["manifests"]
    assert data_files(m1, "items/") == data_files(m2, "items/")
    check_manifest(two, m2, "two_tower")
    spec = json.loads((two / "user_tower.json").read_text())
    model, features = reference_model(run["checkpoint"], data)
    assert [i["name"] for i in spec["inputs"][::2]] == [f.name for f in model.user_features]
    assert [i["vocab_size"] for i in spec["inputs"][::2]] == [f.num_embeddings for f in model.user_features]
    ids, vectors, raw = read_vectors(two / "items", "item_id")
    users = np.array([1, 2, 17, 64, 120])
    with torch.no_grad():
        assert np.allclose(vectors, model.item_vectors(features.item_kjt(ids)).numpy(), atol=1e-6, rtol=0)
        expected = model.user_vectors(features.user_kjt(users))
    check_raw_ids(data, ids, raw, ID_MAP_ITEMS, "item_id")
    shutil.copy(two / "user_tower.pt2", tmp_path / "user_tower.pt2")
    torch.save(tower_inputs(features.user_kjt(users)), tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TORCH], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    got = torch.load(tmp_path / "vectors.pt", weights_only=True)
    assert got.shape == expected.shape and float((got - expected).abs().max()) < 1e-6


@pytest.mark.parametrize("model", ["mf", "two_tower"])
def test_evaluate_through_a_flat_index_equals_the_exact_evaluation(exports, data, model, tmp_path):
    run = exports[model]
    report_path = tmp_path / "ann.json"
    argv = [
        "evaluate",
        "--ann",
        str(run["dirs"][1]),
        "--out",
        str(report_path),
        f'data.path="{data}"',
        "eval.ks=[5, 10]",
    ]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    reference, features = reference_model(run["checkpoint"], data)
    exact = evaluate(reference, data, "test", [5, 10], features, DistContext.single()).metrics  # the evaluator's
    assert report["index"]["faiss_class"] == "IndexFlatIP"
    for key, value in report["exact"].items():
        if "@" in key:
            assert report["ann"][key] == value, key
            assert exact[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert report["recall"] == {"recall@5": 1.0, "recall@10": 1.0}
    assert all(v == 0.0 for v in report["change"].values())


# ------------------------------------------------------------------------- bad input


def refused(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err


def nothing_written(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))


def test_bad_input_one_line_exit_2_nothing_written(exports, data, tmp_path, capsys):
    mf = str(exports["mf"]["checkpoint"])
    out = tmp_path / "out"
    # an existing non-empty output directory: left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(capsys, ["export", "--checkpoint", mf, "--out", str(out)], f"--out {out}", "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)
    # a config of another model than the checkpoint's
    refused(capsys, ["export", "--checkpoint", mf, "--out", str(out), 'model.name="two_tower"'],
            "another model", "model.name = 'mf' there, 'two_tower' here")  # fmt: skip
    nothing_written(out)
    # a checkpoint of another dataset
    other = generate(tmp_path / "other", users=50, items=40, rows=900, seed=1)
    refused(capsys, ["export", "--checkpoint", mf, "--out", str(out), f'data.path="{other}"'],
            "t_item_id has 91 rows", "another dataset")  # fmt: skip
    nothing_written(out)
    # the id map its manifest lists is gone
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / ID_MAP_ITEMS).unlink()
    refused(capsys, ["export", "--checkpoint", mf, "--out", str(out), f'data.path="{broken}"'],
            str(broken / ID_MAP_ITEMS), "missing")  # fmt: skip
    nothing_written(out)
    # evaluation through an export that has no index
    refused(capsys, ["evaluate", "--ann", str(exports["mf"]["dirs"][0]), f'data.path="{data}"'], "has no index")


# ------------------------------------------------------------------- on an object store


def store_files(where) -> set[str]:
    """Every object below ``where`` (a Location), relative."""
    import pyarrow.fs as pafs

    infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    return {i.path[len(where.path) + 1 :] for i in infos if i.type == pafs.FileType.File}


def test_export_to_s3_same_files_as_local_refuses_existing_and_evaluate_reads_it(exports, data, tmp_path, capsys):
    """The 2-rank MF export with a flat index, to s3:// (the loopback server) instead of a
    directory: the same files, byte for byte, and the same manifest checksums; the manifest
    is the last object; the staging directory in TMPDIR is gone; an existing prefix and a URI
    with credentials are refused before any rank; ``evaluate --ann`` reads it from the store."""
    from morec_dist.data import storage
    from tests.s3_loopback import moto_s3

    run = exports["mf"]
    local, local_manifest = run["dirs"][1], run["manifests"][1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with moto_s3() as s3:
        uri = s3.uri("runs/r1/export")
        morec("export", "--checkpoint", str(run["checkpoint"]), "--out", uri, "--nproc", "2",
              "--part-rows", str(PART_ROWS), "--index", "--index-kind", "flat", TMPDIR=str(tmp))  # fmt: skip
        where = storage.location(uri)
        manifest = json.loads(storage.read_text(where / "manifest.json"))
        assert manifest["files"] == local_manifest["files"] and manifest["export"]["world_size"] == 2
        assert store_files(where) == set(manifest["files"]) | {"manifest.json"}
        for rel in manifest["files"]:
            assert storage.read_bytes(where / rel) == (local / rel).read_bytes(), rel
        assert not list(tmp.glob("morec-export-*"))
        # an existing prefix: refused by the parent, one line naming --out, left as it was
        refused(capsys, ["export", "--checkpoint", str(run["checkpoint"]), "--out", uri],
                f"--out {where}", "not empty")  # fmt: skip
        assert store_files(where) == set(manifest["files"]) | {"manifest.json"}
        secret = f"s3://key:secret@{s3.bucket}/runs/r2/export{s3.query}"
        refused(capsys, ["export", "--checkpoint", str(run["checkpoint"]), "--out", secret], "--out", "credentials")
        assert not store_files(storage.location(s3.uri("runs/r2")))
        # evaluation through the export on the store: the report of the local copy, beside it on the store
        assert main(["evaluate", "--ann", uri, f'data.path="{data}"', "eval.ks=[5, 10]"]) == 0
        report = json.loads(storage.read_text(where.parent / "metrics-test-ann.json"))
        assert main(["evaluate", "--ann", str(local), "--out", str(tmp_path / "local.json"),
                     f'data.path="{data}"', "eval.ks=[5, 10]"]) == 0  # fmt: skip
        expected = json.loads((tmp_path / "local.json").read_text())
        assert report["export"] == uri and report["exact"] == expected["exact"] and report["ann"] == expected["ann"]
        assert report["recall"] == expected["recall"]


def test_a_failed_upload_leaves_no_manifest_and_a_corrupted_file_is_refused(tmp_path, monkeypatch):
    """store.publish: the manifest is uploaded last, and when any upload fails what was
    uploaded is removed (no manifest ever at the destination); store.local_copy refuses a
    file whose sha256 is not the manifest's; check_staged refuses a staging directory that
    lacks a rank's file."""
    from morec_dist.data import storage
    from morec_dist.export import store
    from morec_dist.export.layout import ExportError, write_manifest
    from tests.s3_loopback import moto_s3

    staging = tmp_path / "staging"
    (staging / "items").mkdir(parents=True)
    for k in range(3):
        (staging / "items" / f"part-{k:05d}.parquet").write_bytes(bytes([k]) * 1000)
    write_manifest(staging, {"model": {"name": "mf"}})
    store.check_staged(staging, [f"items/part-{k:05d}.parquet" for k in range(3)])
    with pytest.raises(ExportError, match="users/part-00000.parquet, ...\\): an export to a URI stages on one node"):
        store.check_staged(staging, ["users/part-00000.parquet"])  # a rank on another host wrote it there
    order = []
    upload = storage.upload

    def failing(local: Path, where) -> None:
        order.append(where.name)
        if where.name == "manifest.json":
            raise OSError("connection lost (the test)")
        upload(local, where)

    with moto_s3() as s3:
        out = storage.location(s3.uri("exports/e1"))
        monkeypatch.setattr(storage, "upload", failing)
        with pytest.raises(OSError, match="connection lost"):
            store.publish(staging, out)
        assert order[-1] == "manifest.json" and len(order) == 4
        assert store_files(out) == set()
        monkeypatch.setattr(storage, "upload", upload)
        store.publish(staging, out)
        assert store_files(out) == {"manifest.json", *(f"items/part-{k:05d}.parquet" for k in range(3))}
        assert not staging.exists()
        with store.local_copy(s3.uri("exports/e1")) as copy:
            assert (copy / "items" / "part-00002.parquet").read_bytes() == bytes([2]) * 1000
        with out.fs.open_output_stream(f"{out.path}/items/part-00001.parquet") as f:
            f.write(b"tampered")
        with (
            pytest.raises(ExportError, match="part-00001.parquet: sha256 does not match"),
            store.local_copy(s3.uri("exports/e1")),
        ):
            pass
