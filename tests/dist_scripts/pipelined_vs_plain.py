"""torchrun worker: the epoch loop through TorchRec's TrainPipelineSparseDist equals the plain
loop bit for bit, for each case named on the command line.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/dist_scripts/pipelined_vs_plain.py DATA_DIR CASE [CASE ...]
with CASE = STRATEGY:MODEL:DEFAULT_TYPE (STRATEGY: accuracy, static, mgda), e.g.
accuracy:mf:row_wise or static:two_tower:table_wise.

Per case, two trainers born from the same seed train the same schedule, one per driver:
epoch 0 whole; epoch 1 stopped by the step hook after 3 steps (a SIGTERM's stop), then
continued from there up to ``train.max_steps`` (2 steps short of its end). After every step
the running loss sum, the reader position a step checkpoint would save and the hook's
``reader.step`` must be equal; after each stop, the reader's own state; at the end every
local tensor of the model and the optimizer, the strategy's state, and a forward of a fresh
batch in eval mode (the model given back by the pipeline). Prints "OK <case> ..." per case.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from rank_main import run_rank

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.reader import Reader
from morec_dist.distributed import DistContext
from morec_dist.train.loop import EpochProgress, PlainDriver, StepDriver, train_epoch
from morec_dist.train.pipelined import SparseDistDriver
from morec_dist.train.strategies import AccuracyOnly, MGDAStrategy, StaticWeighting
from morec_dist.train.trainer import Trainer, build_features

STOP_AFTER = 3  # epoch 1 is interrupted by the hook after this many steps


def case_config(case: str) -> Config:
    _, model, default = case.split(":")
    config = Config()
    config.run.seed = 7
    config.model.name = model
    config.model.embedding_dim = 8
    config.model.tower_dims = [16, 8]
    config.model.default_sharding = default
    config.optim.embedding_optimizer = "adagrad"
    config.data.batch_size = 64
    config.data.num_negatives = 3
    return config


def make_strategy(kind: str, dataset: PreparedDataset, config: Config) -> Any:
    objectives = config.morec.objectives
    if kind == "accuracy":
        return AccuracyOnly()
    if kind == "static":
        return StaticWeighting(dataset, objectives, [0.4, 0.3, 0.2, 0.1][: 1 + len(objectives)])
    if kind == "mgda":
        return MGDAStrategy(dataset, objectives)
    raise ValueError(f"unknown strategy {kind!r}")


class Arm:
    """One trainer, its reader and strategy, trained by one driver; what its hook saw."""

    def __init__(self, case: str, ctx: DistContext, dataset: PreparedDataset, pipelined: bool):
        config = self.config = case_config(case)
        self.trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
        self.reader = Reader(
            dataset,
            batch_size=config.data.batch_size,
            num_negatives=config.data.num_negatives,
            seed=config.run.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            features=self.trainer.features,
        )
        self.strategy = make_strategy(case.split(":")[0], dataset, config)
        self.driver: StepDriver = SparseDistDriver(self.trainer, self.strategy) if pipelined else PlainDriver()
        self.view = self.driver.reader_view(self.reader)
        self.seen: list[tuple[float, int, dict[str, Any]]] = []  # per step: loss sum, reader.step, its state
        self.stopped_state: dict[str, Any] = {}
        self.end_state: dict[str, Any] = {}
        self.last_stats: Any = None

    def epoch(self, epoch: int, stop_after: int = 0, max_steps: int = 0, resumed: EpochProgress | None = None) -> Any:
        self.view.set_epoch(epoch)
        self.trainer.epoch = epoch

        def hook(done: EpochProgress) -> bool:
            self.seen.append((done.loss_sum, self.view.step, self.view.state_dict()))
            return bool(stop_after) and done.steps == stop_after

        stats = train_epoch(
            self.trainer,
            self.view,
            self.strategy,
            epoch=epoch,
            log_every=0,
            max_steps=max_steps,
            resumed=resumed,
            after_step=hook,
            driver=self.driver,
        )
        return stats


def local(value: Any) -> list[torch.Tensor]:
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in local(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in local(v)]
    return []


def assert_same_tensors(what: str, a: dict[str, Any], b: dict[str, Any]) -> int:
    assert sorted(a, key=str) == sorted(b, key=str), f"{what}: keys differ"
    count = 0
    for key in a:
        for x, y in zip(local(a[key]), local(b[key]), strict=True):
            assert torch.equal(x, y), f"{what}: {key} differs (max {float((x - y).abs().max())})"
            count += 1
    return count


def run_case(case: str, ctx: DistContext, dataset: PreparedDataset) -> str:
    plain, piped = Arm(case, ctx, dataset, False), Arm(case, ctx, dataset, True)
    total = plain.reader.num_batches
    for arm in (plain, piped):
        arm.epoch(0)
        arm.epoch(1, stop_after=STOP_AFTER)
        arm.stopped_state = arm.reader.state_dict()
        resumed = EpochProgress(loss_sum=arm.seen[-1][0], steps=STOP_AFTER)
        arm.last_stats = arm.epoch(1, max_steps=2 * total - 2, resumed=resumed)
        arm.end_state = arm.reader.state_dict()
    assert len(plain.seen) == len(piped.seen) == 2 * total - 2, (len(plain.seen), len(piped.seen), total)
    for i, (a, b) in enumerate(zip(plain.seen, piped.seen, strict=True)):
        assert a == b, f"step {i}: plain saw {a[:2]}, pipelined {b[:2]} (or another reader state)"
    assert plain.stopped_state == piped.stopped_state, "reader after the interrupted epoch"
    assert plain.end_state == piped.end_state, "reader after max_steps"
    assert plain.trainer.step == piped.trainer.step == 2 * total - 2
    a, b = plain.last_stats, piped.last_stats
    assert (a.loss_sum, a.rows, a.steps) == (b.loss_sum, b.rows, b.steps), (a, b)
    tensors = assert_same_tensors("model", plain.trainer.model.state_dict(), piped.trainer.model.state_dict())
    tensors += assert_same_tensors(
        "optimizer", plain.trainer.optimizer.state_dict(), piped.trainer.optimizer.state_dict()
    )
    assert plain.strategy.state_dict() == piped.strategy.state_dict(), "strategy state"
    assert isinstance(piped.driver, SparseDistDriver)
    modules = piped.driver.pipelined_modules()
    assert modules == 2, f"the pipeline found {modules} sharded modules fed from the batch, expected 2 (user, item)"
    batch = next(iter(plain.reader)).to(ctx.device)  # the next epoch's first batch, same on both
    with torch.no_grad():
        plain.trainer.model.eval()
        piped.trainer.model.eval()
        assert torch.equal(plain.trainer.model(batch), piped.trainer.model(batch)), "forward after the pipeline"
    return f"OK {case} steps {plain.trainer.step} tensors {tensors} loss_sum {a.loss_sum!r}"


def main(ctx: DistContext) -> None:
    data_dir, *cases = sys.argv[1:]
    dataset = PreparedDataset.open(data_dir)
    for case in cases:
        line = run_case(case, ctx, dataset)
        if ctx.rank == 0:
            print(line, flush=True)


if __name__ == "__main__":
    run_rank(main)
