"""Graceful preemption: the SIGTERM flag every rank agrees on at a step boundary.

The handler only sets a flag; after each step the ranks agree on it with an all_reduce (so
all stop at the same step), the job checkpoints and exits with ``EXIT_PREEMPTED``
(143, "terminated by SIGTERM"). A second SIGTERM, or a rank stuck past ``SIGTERM_GRACE_S``
(a peer died inside a collective), leaves at once.

Evaluation and the sampler's signal updates are not steps: they poll ``sigterm_requested``
between batches, agree on it collectively and raise ``EvaluationInterrupted`` on every
rank. After the epoch-end evaluation the runner then checkpoints the epoch's last step
(``runner.checkpoint_last_step_and_exit``) and exits 143; anywhere else (a signal update, the
evaluations before and after training) the job exits 143 without a new checkpoint, the last
step checkpoint being the resume point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, NoReturn

from morec_dist.distributed import DistContext, any_rank

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a launcher sees a preemption, not a success
# After SIGTERM a rank that cannot reach its step boundary (a peer died inside a collective)
# leaves after this long anyway; a checkpoint cut short stays a harmless .tmp.
SIGTERM_GRACE_S = 25.0


# The installed flag of this process (SIGTERM's handler is process-wide, so is its flag).
_installed: PreemptionFlag | None = None


def sigterm_requested() -> bool:
    """This rank's SIGTERM flag (local: evaluation agrees on it between its batches)."""
    return _installed is not None and _installed.requested


class PreemptionFlag:
    """SIGTERM sets a flag (nothing else happens in the handler); ``agreed`` makes every
    rank see the same answer at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False

    def install(self) -> PreemptionFlag:
        global _installed
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
            _installed = self
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second SIGTERM: stop waiting for the step boundary
            raise SystemExit(EXIT_PREEMPTED)
        self.requested = True
        print("SIGTERM: checkpointing at the next step boundary, then exiting", file=sys.stderr, flush=True)
        timer = threading.Timer(SIGTERM_GRACE_S, os._exit, args=(EXIT_PREEMPTED,))
        timer.daemon = True
        timer.start()

    def agreed(self, ctx: DistContext) -> bool:
        """Collective: True on every rank when any rank got SIGTERM."""
        return any_rank(self.requested, ctx)


def exit_interrupted(ctx: DistContext, what: str) -> NoReturn:
    """After ``EvaluationInterrupted`` (every rank raised it at the same batch): leave with
    EXIT_PREEMPTED and no new checkpoint; the last step checkpoint is the resume point."""
    from morec_dist.distributed import shutdown_distributed
    from morec_dist.train.launch import report_preempted

    report_preempted()  # for the launcher: torchrun's own exit code does not say 143
    if ctx.rank == 0:
        print(
            f"SIGTERM during {what}: stopped; the last step checkpoint is the resume point; exiting {EXIT_PREEMPTED}",
            file=sys.stderr,
            flush=True,
        )
    shutdown_distributed(exit_code=EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)  # not reached: shutdown_distributed leaves through os._exit
