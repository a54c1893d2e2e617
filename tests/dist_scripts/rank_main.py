"""How a torchrun worker script of the tests runs its body on a rank: any exception prints its
traceback and ends the rank at once with exit code 1 (no teardown: a peer may be waiting in a
collective that will never complete), success leaves through ``shutdown_distributed(0)``."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from morec_dist.distributed import DistContext, init_distributed, shutdown_distributed


def run_rank(body: Callable[[DistContext], None]) -> None:
    ctx = init_distributed()
    try:
        body(ctx)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    shutdown_distributed(exit_code=0)
