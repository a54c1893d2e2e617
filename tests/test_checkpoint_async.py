"""The asynchronous save of train/checkpoint.py in one process: the state is copied at the
call (later in-place updates are not in the checkpoint), also into staging buffers kept from
the previous save, and the checkpoint does not exist until rank 0 commits it (meta.json
last, then the rename)."""

from __future__ import annotations

import torch

from morec_dist.train.checkpoint import (
    META,
    StagingBuffers,
    dcp_load,
    latest_checkpoint,
    read_meta,
    start_checkpoint,
)


def _load(path) -> torch.Tensor:
    loaded = {"table": torch.zeros(3, 4), "step": torch.tensor(0)}
    dcp_load(loaded, path)
    return loaded["table"]


def test_async_save_copies_at_the_call_and_exists_only_once_committed(tmp_path):
    root = tmp_path / "checkpoints"
    state = {"table": torch.arange(12.0).reshape(3, 4), "step": torch.tensor(7)}
    buffers = StagingBuffers()
    pending = start_checkpoint(root / "step-7", state, {"step": 7}, {"rank": 0}, buffers)
    state["table"].add_(100.0)  # training goes on while the save runs
    pending.wait()
    assert latest_checkpoint(root) is None and not (root / "step-7.tmp" / META).exists()
    pending.commit()
    assert latest_checkpoint(root) == root / "step-7" and read_meta(root / "step-7") == {"step": 7}
    assert torch.equal(_load(root / "step-7"), torch.arange(12.0).reshape(3, 4))
    # the next save copies into the same buffers: the new values, the old checkpoint intact
    staged = buffers.state_dict_cache
    pending = start_checkpoint(root / "step-8", state, {"step": 8}, {"rank": 0}, buffers)
    state["table"].zero_()
    pending.commit()
    assert buffers.state_dict_cache is staged
    assert torch.equal(_load(root / "step-8"), torch.arange(12.0).reshape(3, 4) + 100.0)
    assert torch.equal(_load(root / "step-7"), torch.arange(12.0).reshape(3, 4))
