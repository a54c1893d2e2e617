"""Quiet output: the library warnings a morec user cannot act on, filtered at the source.

A plain ``make run`` used to print, between its progress lines, screens of warnings that
are about how TorchRec, torch.distributed or Ray are built, not about the user's job:
deprecations inside torch's own checkpoint code, TorchRec planner advice for dry runs we do
not do, a once-per-process tracing note, Ray's default token-auth notice (morec always uses
token auth). ``install()`` filters exactly those, each by its message and the module or
logger that emits it, so any other warning (a new one after an upgrade, one of ours, a real
problem) still shows. ``morec_dist.cli.main`` calls it first, and the torchrun ranks run the
same ``main``, so every morec process is covered. (``train.launch.relaunch`` also gives
torchrun OMP_NUM_THREADS=1, the value it would choose itself, so that it does not print its
banner about choosing it.)

Set ``MOREC_LIBRARY_WARNINGS=1`` to see them all again (when upgrading a pinned library).
"""

from __future__ import annotations

import logging
import os
import warnings

SHOW_ALL_ENV = "MOREC_LIBRARY_WARNINGS"

# (category, start of the message, module the warning is attributed to): both are regexes,
# matched as warnings.filterwarnings does (message from its start, module in full).
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # torch.distributed.checkpoint touches TorchRec's ShardedTensor; the deprecation is
    # for TorchRec to act on, not for us (we never build a ShardedTensor ourselves).
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", r"torch\.distributed\..*"),
    # the planner's default storage reservation: its dry-run caveat does not apply (we
    # plan on real ranks, with memory that is materialised).
    (
        FutureWarning,
        r"HeuristicalStorageReservation is known to cause issues",
        r"torchrec\.distributed\.planner\.planners",
    ),
)

# logger name -> starts of the messages dropped from that logger (only those records).
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "torchrec.distributed.planner.storage_reservations": (
        "There is a known issue with TorchRec's dense tensor size calculation in dry run",
    ),
    # printed once per rank when TorchRec's modules check for fx tracing
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true for both fx.symbolic_trace and torch.export",),
    # the local Ray that morec starts uses token auth on purpose (loopback + token)
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
}

_installed = False


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def install() -> None:
    """Install the filters in this process (idempotent; a no-op under MOREC_LIBRARY_WARNINGS=1)."""
    global _installed
    if _installed or os.environ.get(SHOW_ALL_ENV) == "1":
        return
    _installed = True
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(DropMessages(prefixes))
