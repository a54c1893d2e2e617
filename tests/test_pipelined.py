"""The step drivers (train/pipelined.py): the ``train.pipeline`` choice and its config errors,
which strategies may run under TorchRec's TrainPipelineSparseDist and the fallback line of
those that may not, the reader position while the pipeline draws ahead, and the pipelined
epoch loop against the plain one, bit for bit, on 1 and 2 torchrun ranks (CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from morec_dist.config import Config, ConfigError, load_config
from morec_dist.data.prepare.synthetic import generate
from morec_dist.data.reader import Reader
from morec_dist.distributed import DistContext
from morec_dist.train.fingerprint import trajectory_config
from morec_dist.train.loop import PlainDriver
from morec_dist.train.pipelined import LookaheadReader, make_driver, pipeline_blocker, select_pipeline
from morec_dist.train.strategies import AccuracyOnly, CombinerStrategy, MGDAStrategy, MorecStrategy, StaticWeighting

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "dist_scripts" / "pipelined_vs_plain.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("pipelined") / "syn", users=100, items=120, rows=1500, seed=5)


# --------------------------------------------------------------------- selection


def test_auto_is_sparse_dist_on_cuda_and_none_on_cpu():
    assert select_pipeline("auto", "cuda") == "sparse_dist"
    assert select_pipeline("auto", "cpu") == "none"
    for device_type in ("cpu", "cuda"):
        assert select_pipeline("sparse_dist", device_type) == "sparse_dist"
        assert select_pipeline("none", device_type) == "none"
    with pytest.raises(ValueError, match=r"train.pipeline: 'fast' is not one of \('auto', 'sparse_dist', 'none'\)"):
        select_pipeline("fast", "cpu")


def test_config_names_the_key_of_a_wrong_pipeline():
    assert Config().train.pipeline == "auto"
    assert load_config(overrides=['train.pipeline="sparse_dist"']).train.pipeline == "sparse_dist"
    with pytest.raises(ConfigError, match=r"train.pipeline: 'sparse' is not one of \('auto', 'sparse_dist', 'none'\)"):
        load_config(overrides=['train.pipeline="sparse"'])
    with pytest.raises(ConfigError, match="train.pipeline"):
        load_config(overrides=["train.pipeline=1"])


def test_the_pipeline_setting_is_not_a_trajectory_key():
    """An exact driver: a checkpoint resumes under the other setting without --resume-changed."""
    assert "train.pipeline" not in trajectory_config(Config().to_dict())


# -------------------------------------------------------------------- strategies


def test_uniform_strategies_are_pipelineable_and_morec_is_not():
    for strategy in (AccuracyOnly, StaticWeighting, MGDAStrategy):
        assert pipeline_blocker(strategy) is None, strategy
    for strategy in (MorecStrategy, CombinerStrategy):
        reason = pipeline_blocker(strategy)
        assert reason is not None and "staleness" in reason and "step t - 2" in reason

    class Plugin:
        name = "mine"

    assert "strategy 'mine' does not declare pipeline_exact" in str(pipeline_blocker(Plugin()))


def test_a_refused_strategy_runs_the_plain_loop_with_one_line(capsys):
    ctx = DistContext.single()
    config = Config()
    config.train.pipeline = "sparse_dist"
    assert isinstance(make_driver(config, ctx, None, MorecStrategy), PlainDriver)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.pipeline = 'sparse_dist': running the plain step loop")
    config.train.pipeline = "auto"  # on CPU: the plain loop, as chosen, without a line
    assert isinstance(make_driver(config, ctx, None, AccuracyOnly()), PlainDriver)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- reader position


def test_lookahead_reader_reports_the_first_untrained_batch(data_dir):
    reader = Reader(data_dir, batch_size=32, num_negatives=2, seed=1)
    view = LookaheadReader(reader)
    before = [reader.state_dict()]
    batches = iter(reader)
    draws = view.draws(batches)
    for _ in range(3):  # the pipeline's start: batches 0 and 1, then 2 during step 0
        next(draws)
        before.append(reader.state_dict())
    assert view.state_dict() == before[0] and view.step == 0
    view.trained()  # step 0 done: a checkpoint must resume at batch 1
    assert view.state_dict() == before[1] and view.step == 1
    assert reader.step == 3  # the reader itself is ahead
    draws.close()
    batches.close()
    view.rewind()  # an epoch stopped here: the reader stands where the plain loop leaves it
    assert reader.state_dict() == before[1] and not view.pending
    assert view.state_dict() == before[1]


# ------------------------------------------------------- pipelined = plain, 1 and 2 ranks


def torchrun(nproc: int, data_dir: Path, *cases: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    proc = subprocess.run([*cmd, str(data_dir), *cases], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("OK ")]


@pytest.mark.slow  # torchrun ranks
def test_pipelined_loop_equals_plain_loop_on_two_ranks(data_dir):
    """Pretraining (row-wise MF), static weighting (table-wise two-tower: DDP towers) and
    MGDA (data-parallel MF tables; an all_reduce inside the step's forward), two epochs with a
    hook stop and a max_steps stop: losses, reader positions, weights, optimizer state equal."""
    cases = ("accuracy:mf:row_wise", "static:two_tower:table_wise", "mgda:mf:data_parallel")
    lines = torchrun(2, data_dir, *cases)
    assert [line.split()[1] for line in lines] == list(cases), lines


@pytest.mark.slow  # torchrun ranks
def test_pipelined_loop_equals_plain_loop_on_one_rank(data_dir):
    lines = torchrun(1, data_dir, "accuracy:mf:table_wise")
    assert len(lines) == 1, lines
