"""The asynchronous save of train/checkpoint.py in one process: the state is copied at the
call (later in-place updates are not in the checkpoint), and the checkpoint does not exist
until rank 0 commits it (meta.json last, then the rename)."""

from __future__ import annotations

import torch

from morec_dist.train.checkpoint import META, dcp_load, latest_checkpoint, read_meta, start_checkpoint


def test_async_save_copies_at_the_call_and_exists_only_once_committed(tmp_path):
    root = tmp_path / "checkpoints"
    state = {"table": torch.arange(12.0).reshape(3, 4), "step": torch.tensor(7)}
    pending = start_checkpoint(root / "step-7", state, {"step": 7}, {"rank": 0})
    state["table"].add_(100.0)  # training goes on while the save runs
    pending.wait()
    assert latest_checkpoint(root) is None and not (root / "step-7.tmp" / META).exists()
    pending.commit()
    assert latest_checkpoint(root) == root / "step-7" and read_meta(root / "step-7") == {"step": 7}
    loaded = {"table": torch.zeros(3, 4), "step": torch.tensor(0)}
    dcp_load(loaded, root / "step-7")
    assert torch.equal(loaded["table"], torch.arange(12.0).reshape(3, 4)) and int(loaded["step"]) == 7
