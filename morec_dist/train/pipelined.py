"""Steps through TorchRec's ``TrainPipelineSparseDist``: which driver a job runs
(``train.pipeline``), and the pipelined driver itself.

The pipeline keeps two batches ahead of the step it computes: while step i runs its forward,
backward and optimizer step, batch i+1's input distribution (the sharded tables' id
all-to-all) is in flight and batch i+2 has been drawn and copied to the device (on CUDA on
side streams; on CPU the same calls run in order). It fx-traces the model once to find the
sharded modules fed straight from the batch (``Batch`` is ``Pipelineable``), calls the step's
forward, one backward of its loss and the optimizer step itself.

- **The step's forward** (``StepForward``, the pipeline's ``custom_model_fwd``): the model's
  scores, the per-row loss and the strategy's ``step_loss`` on them, so the pipeline's single
  backward is exactly the strategy's loss. The model given to ``shard`` is unchanged (no
  wrapper module: checkpoints keep their keys).
- **Which strategies** (``pipeline_blocker``): batch i+2 is drawn before step i's forward, so
  only a strategy whose draws do not depend on its own steps and whose loss needs one
  backward stays exact: it says so with ``pipeline_exact = True`` (pretraining, static and
  MGDA weighting on uniform data). Any other runs the plain loop, with one line saying why.
- **Checkpoints and stops** (``LookaheadReader``): the reader is ahead of the trained steps,
  so a step checkpoint takes the reader's state as it was before the first batch not yet
  trained (recorded at each draw), and an epoch stopped early (``train.max_steps``, SIGTERM)
  drops its in-flight batches and puts the reader back there: the reader then stands
  exactly where the plain loop leaves it.
- Between epochs the model is detached from the pipeline (its sharded modules get their own
  forwards back), so evaluation, signals and checkpoints see the plain model; the next
  epoch's first step attaches it again.

``select_pipeline`` (the ``auto`` rule: sparse_dist on CUDA, none on CPU) is pure, for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any

import torch

from morec_dist.config import TRAIN_PIPELINES, Config
from morec_dist.data.batch import Batch
from morec_dist.distributed import DistContext
from morec_dist.train.loop import PlainDriver, StepDriver, StepResult, Strategy, progress
from morec_dist.train.trainer import Trainer

SPARSE_DIST = "sparse_dist"
NONE = "none"


# ---------------------------------------------------------------------- selection


def select_pipeline(setting: str, device_type: str) -> str:
    """``train.pipeline`` on a device type -> "sparse_dist" or "none" (auto: sparse_dist on
    CUDA, where the overlap hides host-to-device copies and NCCL all-to-alls; none on CPU)."""
    if setting not in TRAIN_PIPELINES:
        raise ValueError(f"train.pipeline: {setting!r} is not one of {TRAIN_PIPELINES}")
    if setting == "auto":
        return SPARSE_DIST if device_type == "cuda" else NONE
    return setting


def pipeline_blocker(strategy: Any) -> str | None:
    """Why ``strategy`` cannot run under the pipeline exactly, or None if it can."""
    if getattr(strategy, "pipeline_exact", False) is True:
        return None
    reason = getattr(strategy, "pipeline_refusal", None)
    return reason or (
        f"strategy {getattr(strategy, 'name', type(strategy).__name__)!r} does not declare pipeline_exact "
        "(the pipeline draws each batch two steps ahead and runs one backward of the step's loss)"
    )


def make_driver(config: Config, ctx: DistContext, trainer: Trainer, strategy: Strategy) -> StepDriver:
    """The job's step driver: the pipelined one where ``train.pipeline`` picks it and the
    strategy stays exact under it, else the plain loop (with one line saying why, when the
    pipeline was asked for or picked by auto)."""
    setting = config.train.pipeline
    if select_pipeline(setting, ctx.device.type) == NONE:
        return PlainDriver()
    reason = pipeline_blocker(strategy)
    if reason is not None:
        progress(ctx.rank, f"train.pipeline = {setting!r}: running the plain step loop, because {reason}")
        return PlainDriver()
    return SparseDistDriver(trainer, strategy)


# ---------------------------------------------------------------- reader position


class LookaheadReader:
    """The reader as the trained steps see it, while the pipeline draws ahead.

    ``draws`` yields the epoch's batches and records, before each draw, the reader's state
    (its position at that batch); ``trained`` drops the oldest record once its batch was
    trained. ``state_dict`` is then the position of the first batch not yet trained (what a
    step checkpoint must hold), and ``step`` the epoch's trained position.
    """

    def __init__(self, reader: Any):
        self.reader = reader
        self.pending: deque[dict[str, Any]] = deque()  # states before each drawn, untrained batch
        self.waited = 0.0
        self._step = reader.step

    # what the runner and the checkpoints read
    @property
    def num_batches(self) -> int:
        return int(self.reader.num_batches)

    @property
    def step(self) -> int:
        return self._step

    def state_dict(self) -> dict[str, Any]:
        return dict(self.pending[0]) if self.pending else self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending.clear()
        self.reader.load_state_dict(state)
        self._step = self.reader.step

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)
        self._step = self.reader.step

    # what the pipelined epoch uses
    def draws(self, batches: Iterator[Batch]) -> Generator[Batch, None, None]:
        while True:
            state = self.reader.state_dict()
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - t0
            if batch is None:
                return
            self.pending.append(state)
            yield batch

    def trained(self) -> None:
        state = self.pending.popleft()
        self._step = int(state["step"]) + 1

    def rewind(self) -> None:
        """Back to the first untrained batch (an epoch stopped early): drops the records."""
        if self.pending:
            self.load_state_dict(self.pending[0])


# ---------------------------------------------------------------------- the driver


class StepForward:
    """The pipeline's forward of one step: (the strategy's loss, (per-row losses, batch))."""

    def __init__(self, trainer: Trainer, strategy: Strategy):
        self.trainer, self.strategy = trainer, strategy

    def __call__(self, batch: Batch | None) -> tuple[torch.Tensor, tuple[torch.Tensor, Batch]]:
        assert batch is not None, "the pipeline calls the forward with a batch"
        trainer = self.trainer
        scores = trainer.model(batch)
        per_row = trainer.loss_fn(scores)
        loss = self.strategy.step_loss(scores, per_row, batch, trainer.step)
        return loss, (per_row.detach(), batch)


class PipelinedSteps:
    """One epoch through the pipeline (``StepSource``)."""

    def __init__(self, driver: SparseDistDriver, view: LookaheadReader):
        self.driver, self.trainer, self.view, self.strategy = driver, driver.trainer, view, driver.strategy
        self.batches = iter(view.reader)
        self.draws = view.draws(self.batches)
        self.pipeline = driver.pipeline()
        self.started_wait = view.waited

    @property
    def waited(self) -> float:
        return self.view.waited - self.started_wait

    def next_step(self) -> StepResult | None:
        # before_step of a pipeline_exact strategy does not touch the draws (it may run after
        # the step's batch was drawn)
        self.strategy.before_step(self.trainer.step)
        t0, waited = time.perf_counter(), self.view.waited
        try:
            per_row, batch = self.pipeline.progress(self.draws)
        except StopIteration:
            return None
        self.trainer.step += 1  # the pipeline ran zero_grad, backward and the optimizer step
        self.view.trained()
        return StepResult(batch, per_row, t0, self.view.waited - waited)

    def close(self) -> None:
        self.draws.close()
        if hasattr(self.batches, "close"):
            self.batches.close()
        self.driver.release()
        self.view.rewind()


class SparseDistDriver:
    """``TrainPipelineSparseDist`` over the trainer's sharded model and optimizer (one per job:
    it rewrites the sharded modules' forwards once per epoch, and gives them back after it)."""

    name = SPARSE_DIST

    def __init__(self, trainer: Trainer, strategy: Strategy):
        self.trainer, self.strategy = trainer, strategy
        self.view: LookaheadReader | None = None
        self._pipeline: Any = None

    def reader_view(self, reader: Any) -> LookaheadReader:
        """What the runner's hook and the step checkpoints read instead of ``reader``."""
        if isinstance(reader, LookaheadReader):
            return reader
        if self.view is None or self.view.reader is not reader:
            self.view = LookaheadReader(reader)
        return self.view

    def pipeline(self) -> Any:
        if self._pipeline is None:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            trainer = self.trainer
            self._pipeline = TrainPipelineSparseDist(
                trainer.model,
                trainer.optimizer,
                trainer.ctx.device,
                execute_all_batches=True,
                custom_model_fwd=StepForward(trainer, self.strategy),
            )
        return self._pipeline

    def epoch(self, trainer: Trainer, reader: Any, strategy: Strategy) -> PipelinedSteps:
        if trainer is not self.trainer or strategy is not self.strategy:
            raise ValueError("SparseDistDriver: built for another trainer or strategy")
        return PipelinedSteps(self, self.reader_view(reader))

    def pipelined_modules(self) -> int:
        """How many sharded modules the pipeline found fed straight from the batch."""
        return len(self._pipeline._pipelined_modules) if self._pipeline is not None else 0

    def release(self) -> None:
        """The model back as built (its own forwards) and no batch in flight."""
        if self._pipeline is not None:
            self._pipeline.detach()
            self._pipeline.reset()
