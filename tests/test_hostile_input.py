"""Hostile input at the job level: each a clear one-line error naming the problem, exit 2,
and nothing corrupted (the prepared files keep their bytes, no checkpoint is written).

Bad datasets, config errors, a broken ``--from`` checkpoint and an unreachable Ray address
are refused by the ``morec`` parent before torchrun starts (called in-process here: it
returns before any rank would start). What only the ranks can find (an empty group given
probability, a metrics port in use, a checkpoint of another model, a checkpoint of another
world size with resharding off) goes through real torchrun ranks, which report it to the
parent (exit 2, one line).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from morec_dist.cli import main
from morec_dist.data.prepare.layout import rebuild_group_layout
from morec_dist.data.schema import sha256_file
from tests.conftest import REPO
from tests.procs import run_job
from tests.test_checkpoint_resume import CONFIG, cli_env, quoted, reference_run, shared_data, shared_pretrained

TRAIN = "train/part-00000.parquet"


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (``.index/``, the cache of an older reader, is
    ignored; the reader now writes nothing next to a dataset)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".index" not in p.relative_to(root).parts
    }


@pytest.fixture(autouse=True)
def _parent_env(monkeypatch):
    """The in-process parent marks verified datasets in os.environ; keep that per test."""
    from morec_dist.data.dataset import VERIFIED_ENV

    monkeypatch.setenv(VERIFIED_ENV, "")  # restored (unset) after the test


@pytest.fixture
def data(tmp_path_factory, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(shared_data(tmp_path_factory), dst)
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


def refused(capsys, args: list[str], *fragments: str) -> str:
    """``morec <args>`` (in-process) exits 2 with one line naming the problem."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", CONFIG, quoted("data.path", data), quoted("run.out_dir", out), *extra]


def finetune_args(tmp_path_factory, data: Path, out: Path, *extra: str, start: Path | None = None) -> list[str]:
    """``morec finetune`` from ``start``, or from the shared pretraining (a real torchrun
    job: only the tests whose ranks load the checkpoint need it, and they are slow)."""
    return [
        "finetune",
        "--from",
        str(start or shared_pretrained(tmp_path_factory)),
        "--config",
        CONFIG,
        quoted("data.path", data),
        quoted("run.out_dir", out),
        *extra,
    ]


def unread_checkpoint(tmp_path: Path, meta: str = "{}") -> Path:
    """A --from the parent refuses nothing in (its meta.json parses) and no rank ever
    loads: the parent's own refusals come before the checkpoint's tensors are read."""
    path = tmp_path / "unread-checkpoint"
    path.mkdir()
    (path / "meta.json").write_text(meta)
    return path


def assert_untouched(data: Path, before: dict[str, str], out: Path) -> None:
    assert fingerprint(data) == before
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


# ------------------------------------------------------------- refused by the parent


def test_truncated_parquet(data, tmp_path, capsys):
    raw = (data / TRAIN).read_bytes()
    (data / TRAIN).write_bytes(raw[: len(raw) // 2])
    before = fingerprint(data)
    refused(capsys, train_args(data, tmp_path / "out"), TRAIN, "truncated")
    assert_untouched(data, before, tmp_path / "out")


def test_corrupt_parquet_bytes(data, tmp_path, capsys):
    raw = bytearray((data / TRAIN).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (data / TRAIN).write_bytes(bytes(raw))
    before = fingerprint(data)
    refused(capsys, train_args(data, tmp_path / "out"), TRAIN, "sha256")
    assert_untouched(data, before, tmp_path / "out")


def test_wrong_schema(data, tmp_path, capsys):
    rewrite(data, TRAIN, pq.read_table(data / TRAIN).drop_columns(["fair_group"]))
    before = fingerprint(data)
    refused(capsys, train_args(data, tmp_path / "out"), TRAIN, "'fair_group'", "missing")
    assert_untouched(data, before, tmp_path / "out")


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_price(data, tmp_path, capsys, bad):
    t = pq.read_table(data / "items.parquet")
    price = t["price"].to_numpy().copy()
    price[3] = bad
    rewrite(data, "items.parquet", t.set_column(t.schema.get_field_index("price"), "price", pa.array(price)))
    before = fingerprint(data)
    refused(capsys, train_args(data, tmp_path / "out"), "items.parquet", "'price'")
    assert_untouched(data, before, tmp_path / "out")


def test_item_id_out_of_range(data, tmp_path, capsys):
    t = pq.read_table(data / TRAIN)
    ids = t["item_id"].to_numpy().copy()
    ids[5] = 301
    rewrite(data, TRAIN, t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(ids)))
    before = fingerprint(data)
    refused(capsys, train_args(data, tmp_path / "out"), TRAIN, "'item_id'", "[1, 300]")
    assert_untouched(data, before, tmp_path / "out")


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["morec.pid.beta_min=2.0", "morec.pid.beta_max=1.0"], "beta_min (2.0) must not exceed beta_max (1.0)"),
        (["morec.pid.kp=-0.1"], "morec.pid.kp: gains must be >= 0"),
        (
            ['morec.objectives=[{name="revenue", kind="revenue", group_column="rev_group", weight=-0.5}]'],
            "weights must be >= 0",
        ),
        (
            ['morec.objectives=[{name="revenue", kind="revenue", group_column="rev_group", weight=0.0}]'],
            "weights sum to 0",
        ),
        (['morec.objectives=[{name="x", kind="no_such_kind", group_column="rev_group", weight=1.0}]'], "no_such_kind"),
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    ],
)
def test_config_errors_exit_2_before_torchrun(tmp_path_factory, tmp_path, capsys, override, fragment):
    """Refused by the in-process parent: ``main`` returns 2 with the config's message and no
    run directory exists (a started job would have made it). Ordering, not a timer: the
    checkpoint given is never read, so the config is checked before it as well."""
    data = shared_data(tmp_path_factory)
    start = tmp_path / "never-read"  # missing: it would be the error if it were looked at first
    refused(capsys, finetune_args(tmp_path_factory, data, tmp_path / "out", *override, start=start), fragment)
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address(tmp_path_factory, tmp_path, capsys):
    """The parent's probe (coordinator.service.probe_address, a TCP connect with its own
    timeout) names the address: the refusal comes from it, not from Ray's long retries."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = shared_data(tmp_path_factory)
    address = quoted("coordinator.ray_address", f"127.0.0.1:{port}")
    args = finetune_args(tmp_path_factory, data, tmp_path / "out", address, start=unread_checkpoint(tmp_path))
    refused(capsys, args, f"127.0.0.1:{port}", "no Ray head reachable")
    assert not (tmp_path / "out").exists()


def test_broken_from_checkpoint(tmp_path_factory, tmp_path, capsys):
    broken = unread_checkpoint(tmp_path, meta="{not json")
    args = finetune_args(tmp_path_factory, shared_data(tmp_path_factory), tmp_path / "out", start=broken)
    refused(capsys, args, "meta.json", "not valid JSON")


# ------------------------------------------------------------- found by the ranks


def ranks_refuse(args: list[str], *fragments: str) -> str:
    proc = run_job([sys.executable, "-m", "morec_dist.cli", *args], 300, env=cli_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.startswith("morec: error:")]
    assert len(last) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last[0], last[0]
    return last[0]


@pytest.mark.slow
def test_empty_group_given_probability(data, tmp_path_factory, tmp_path):
    """Remove every train row of price band 10: the revenue objective's initial p (band
    mean prices) then puts probability on a group with no rows to draw from."""
    t = pq.read_table(data / TRAIN)
    keep = pc.not_equal(t["rev_group"], pa.scalar(10, pa.int16()))
    rewrite(data, TRAIN, t.filter(keep))
    manifest = json.loads((data / "manifest.json").read_text())
    removed = t.num_rows - int(pc.sum(keep.cast(pa.int64())).as_py())
    manifest["splits"]["train"]["rows"] -= removed
    counts = manifest["groups"]["rev_group"]["train_counts"]
    assert counts[9] == removed
    counts[9] = 0
    for column in ("fair_group", "align_group"):
        kept = t.filter(keep)[column].to_numpy()
        manifest["groups"][column]["train_counts"] = np.bincount(
            kept, minlength=manifest["groups"][column]["num_groups"] + 1
        )[1:].tolist()
    rebuild_group_layout(data, manifest)  # by_group/ must match the edited train split
    (data / "manifest.json").write_text(json.dumps(manifest))
    before = fingerprint(data)
    out = tmp_path / "out"
    # one rank: the refusal is all this tests, and every rank makes it alike
    ranks_refuse(
        [*finetune_args(tmp_path_factory, data, out), "--nproc", "1"], "revenue", "groups [10]", "no train rows"
    )
    assert fingerprint(data) == before
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


@pytest.mark.slow
def test_metrics_port_in_use(tmp_path_factory, tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        # rank r exports on base_port + 1 + local rank: occupy rank 0's
        out = tmp_path / "out"
        ranks_refuse(
            [
                *train_args(
                    shared_data(tmp_path_factory), out, "metrics.enabled=true", f"metrics.base_port={taken - 1}"
                ),
                "--nproc",
                "1",  # rank 0's port is the one taken
            ],
            str(taken),
        )
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


@pytest.mark.slow
def test_from_checkpoint_of_another_model(tmp_path_factory, tmp_path):
    out = tmp_path / "out"
    ranks_refuse(
        # one rank: the refusal is all this tests (the 2-rank checkpoint loads resharded first)
        [*finetune_args(tmp_path_factory, shared_data(tmp_path_factory), out, "model.embedding_dim=8"), "--nproc", "1"],
        "tables",
        "this job builds",
    )


@pytest.mark.slow
def test_step_checkpoint_of_another_world_size_without_resharding(tmp_path_factory, tmp_path):
    source = reference_run(tmp_path_factory) / "checkpoints" / "step-40"
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, out / "checkpoints" / "step-40")
    before = fingerprint(out / "checkpoints")
    ranks_refuse(
        [
            *finetune_args(tmp_path_factory, shared_data(tmp_path_factory), out, "checkpoint.reshard=false"),
            "--nproc",
            "1",
        ],
        "written by 2 ranks",
        "this job has 1",
        "checkpoint.reshard",
    )
    assert fingerprint(out / "checkpoints") == before


# ------------------------------------------------------------- no untrusted pickles


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCodeWhenUnpickled.marker),))


def test_a_checkpoint_with_a_pickled_object_is_refused_not_executed(tmp_path):
    """DCP's default planner unpickles non-tensor entries with weights_only=False; ours
    (SafeLoadPlanner, used for every load) refuses anything but plain data."""
    import torch
    import torch.distributed.checkpoint as dcp

    from morec_dist.train.checkpoint import CheckpointError, dcp_load

    marker = tmp_path / "code-ran"
    _RunsCodeWhenUnpickled.marker = str(marker)
    dcp.save(
        {"weight": torch.ones(3), "hyper": {"lr": 0.1}, "evil": _RunsCodeWhenUnpickled()},
        checkpoint_id=str(tmp_path / "ckpt"),
    )
    plain = {"weight": torch.zeros(3), "hyper": {"lr": 0.0}}
    dcp_load(plain, tmp_path / "ckpt")  # tensors and plain data load
    assert torch.equal(plain["weight"], torch.ones(3)) and plain["hyper"] == {"lr": 0.1}
    with pytest.raises(CheckpointError, match="evil"):
        dcp_load({"weight": torch.zeros(3), "evil": None}, tmp_path / "ckpt")
    assert not marker.exists()
