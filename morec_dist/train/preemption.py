"""Graceful preemption: the SIGTERM flag every rank agrees on at a step boundary.

The handler only sets a flag; after each step the ranks agree on it with an all_reduce (so
all stop at the same step), the job checkpoints and exits with ``EXIT_PREEMPTED``
(143, "terminated by SIGTERM"). A second SIGTERM, or a rank stuck past ``SIGTERM_GRACE_S``
(a peer died inside a collective), leaves at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from morec_dist.distributed import DistContext, any_rank

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a launcher sees a preemption, not a success
# After SIGTERM a rank that cannot reach its step boundary (a peer died inside a collective)
# leaves after this long anyway; a checkpoint cut short stays a harmless .tmp.
SIGTERM_GRACE_S = 25.0


class PreemptionFlag:
    """SIGTERM sets a flag (nothing else happens in the handler); ``agreed`` makes every
    rank see the same answer at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
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
